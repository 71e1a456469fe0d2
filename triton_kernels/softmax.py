"""Softmax-family kernels: softmax, log-softmax and softmin, forward and backward.

Every kernel sees its tensors as a 3-D index space ``(O, N, I)``: ``N`` is the reduced dimension,
``O`` and ``I`` are the other dimensions collapsed into two groups, each with its own stride per
tensor. A program owns one ``o`` and a block of ``BLOCK_I`` consecutive ``i`` and works on a tile
``[BLOCK_I, BLOCK_N]``; the reduction runs along tile axis 1. The same code serves

* rows (reduced dim contiguous): ``O = 1``, ``I`` = the rows, ``stride_n == 1``;
* a reduced dim that is not the innermost: ``I`` = the dims inside it (``stride_i == 1``),

so a reduction over a non-last ``dim`` needs no transpose-and-copy. Triton specialises strides
equal to 1, which makes the contiguous tile axis visible to the compiler for vectorised loads.

Math runs in ``ACC`` (float32, or float64 for float64 tensors); loads and stores convert.
``USE_INT64`` switches index arithmetic to int64 for tensors that can pass 2**31 elements.

Kinds: softmax ``y = exp(x - m) / s``; log-softmax ``y = x - m - log(s)``; softmin is softmax of
``-x`` (``NEG``). Backward (``KIND`` 0 softmax, 1 log-softmax, 2 softmin):
``dx = y * (dy - Σ y·dy)``, ``dx = dy - exp(y) · Σ dy``, ``dx = y * (Σ y·dy - dy)``.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_offsets(pid, I, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, USE_INT64: tl.constexpr):
    """Program id -> (o, i offsets [BLOCK_I], n offsets [BLOCK_N]) in int32 or int64."""
    num_ib = tl.cdiv(I, BLOCK_I)
    o = pid // num_ib
    offs_i = (pid % num_ib) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    if USE_INT64:
        o = o.to(tl.int64)
        offs_i = offs_i.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    return o, offs_i, offs_n


@triton.jit
def softmax_fwd_fused_kernel(
    x_ptr, y_ptr,
    N, I,
    sx_o, sx_n, sx_i,
    sy_o, sy_n, sy_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    LOG: tl.constexpr, NEG: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    """One pass: the whole reduced dim (N <= BLOCK_N) is loaded once and y written once."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask = (offs_i[:, None] < I) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + o * sx_o + offs_i[:, None] * sx_i + offs_n[None, :] * sx_n,
                mask=mask, other=0.0).to(ACC)
    if NEG:
        x = -x
    x = tl.where(mask, x, float("-inf"))
    z = x - tl.max(x, axis=1)[:, None]
    e = tl.where(mask, tl.exp(z), 0.0)
    s = tl.sum(e, axis=1)
    if LOG:
        y = z - tl.log(s)[:, None]
    elif ACC == tl.float64:
        # no fp64 division: its SASS slow-path subroutine keeps a stack frame (local memory)
        y = tl.exp(z - tl.log(s)[:, None])
    else:
        y = e * (1.0 / s)[:, None]
    tl.store(y_ptr + o * sy_o + offs_i[:, None] * sy_i + offs_n[None, :] * sy_n,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_fwd_online_kernel(
    x_ptr, y_ptr,
    N, I,
    sx_o, sx_n, sx_i,
    sy_o, sy_n, sy_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    LOG: tl.constexpr, NEG: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Rows longer than the on-chip limit: pass 1 keeps a running max and rescaled sum per tile
    lane (online softmax, no cross-lane reduction inside the loop), pass 2 writes y."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i[:, None] < I
    x_base = x_ptr + o * sx_o + offs_i[:, None] * sx_i
    m_l = tl.full([BLOCK_I, BLOCK_N], float("-inf"), ACC)
    s_l = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        mask = mask_i & (cols[None, :] < N)
        x = tl.load(x_base + cols[None, :] * sx_n, mask=mask, other=0.0).to(ACC)
        if NEG:
            x = -x
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m_l, x)
        empty = m_new == float("-inf")  # every value seen in this lane is -inf: keep the sum at 0
        alpha = tl.where(empty, 0.0, tl.exp(m_l - m_new))
        s_l = s_l * alpha + tl.where(empty, 0.0, tl.exp(x - m_new))
        m_l = m_new
    m = tl.max(m_l, axis=1)
    s = tl.sum(tl.where(m_l == float("-inf"), 0.0, s_l * tl.exp(m_l - m[:, None])), axis=1)
    # A row of only -inf gives m = -inf and s = 0: the outputs below are NaN, as in torch.
    log_s = tl.log(s)
    inv_s = 1.0 / s.to(tl.float32)  # fp32 division (fp64's subroutine keeps a stack frame)
    y_base = y_ptr + o * sy_o + offs_i[:, None] * sy_i
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        mask = mask_i & (cols[None, :] < N)
        x = tl.load(x_base + cols[None, :] * sx_n, mask=mask, other=0.0).to(ACC)
        if NEG:
            x = -x
        z = x - m[:, None]
        if LOG:
            y = z - log_s[:, None]
        elif ACC == tl.float64:
            y = tl.exp(z - log_s[:, None])
        else:
            y = tl.exp(z) * inv_s[:, None]
        tl.store(y_base + cols[None, :] * sy_n, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_math(y, dy, red, KIND: tl.constexpr):
    """dx from y, dy and the row reduction `red` (Σ y·dy, or Σ dy for log-softmax)."""
    if KIND == 0:
        dx = y * (dy - red[:, None])
    elif KIND == 1:
        dx = dy - tl.exp(y) * red[:, None]
    else:
        dx = y * (red[:, None] - dy)
    return dx


@triton.jit
def softmax_bwd_fused_kernel(
    y_ptr, dy_ptr, dx_ptr,
    N, I,
    sy_o, sy_n, sy_i,
    sdy_o, sdy_n, sdy_i,
    sdx_o, sdx_n, sdx_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    KIND: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    """One kernel, three tensor passes: read y and dy once, write dx once."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask = (offs_i[:, None] < I) & (offs_n[None, :] < N)
    y = tl.load(y_ptr + o * sy_o + offs_i[:, None] * sy_i + offs_n[None, :] * sy_n,
                mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + o * sdy_o + offs_i[:, None] * sdy_i + offs_n[None, :] * sdy_n,
                 mask=mask, other=0.0).to(ACC)
    if KIND == 1:
        red = tl.sum(dy, axis=1)
    else:
        red = tl.sum(y * dy, axis=1)
    dx = _bwd_math(y, dy, red, KIND)
    tl.store(dx_ptr + o * sdx_o + offs_i[:, None] * sdx_i + offs_n[None, :] * sdx_n,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_looped_kernel(
    y_ptr, dy_ptr, dx_ptr,
    N, I,
    sy_o, sy_n, sy_i,
    sdy_o, sdy_n, sdy_i,
    sdx_o, sdx_n, sdx_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    KIND: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Rows longer than the on-chip limit: pass 1 reduces, pass 2 re-reads y, dy and writes dx."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i[:, None] < I
    y_base = y_ptr + o * sy_o + offs_i[:, None] * sy_i
    dy_base = dy_ptr + o * sdy_o + offs_i[:, None] * sdy_i
    acc = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        mask = mask_i & (cols[None, :] < N)
        dy = tl.load(dy_base + cols[None, :] * sdy_n, mask=mask, other=0.0).to(ACC)
        if KIND == 1:
            acc += dy
        else:
            y = tl.load(y_base + cols[None, :] * sy_n, mask=mask, other=0.0).to(ACC)
            acc += y * dy
    red = tl.sum(acc, axis=1)
    dx_base = dx_ptr + o * sdx_o + offs_i[:, None] * sdx_i
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        mask = mask_i & (cols[None, :] < N)
        y = tl.load(y_base + cols[None, :] * sy_n, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_base + cols[None, :] * sdy_n, mask=mask, other=0.0).to(ACC)
        dx = _bwd_math(y, dy, red, KIND)
        tl.store(dx_base + cols[None, :] * sdx_n, dx.to(dx_ptr.dtype.element_ty), mask=mask)


#: What the compile tier checks for each kernel at every config it can launch with
#: (mmkernels/testing/compile_tier.py): no spills to local memory, and no tensor-core
#: instructions are expected of a reduction kernel.
EXPECTATIONS = {
    "softmax_fwd_fused_kernel": {"local_memory": 0},
    "softmax_fwd_online_kernel": {"local_memory": 0},
    "softmax_bwd_fused_kernel": {"local_memory": 0},
    "softmax_bwd_looped_kernel": {"local_memory": 0},
}
