"""Fused cross-entropy kernels: logits -> per-row loss and log-sum-exp, and the gradient in one pass.

One program per row of ``C`` logits (``x``, any row / column strides), the row read in
``BLOCK_C`` chunks. With ``t`` the row's target and ``eps`` the label smoothing:

    lse  = log Σ_c exp(x_c)                        (online: a running max and rescaled sum per lane)
    loss = lse - (1 - eps) · x_t - (eps / C) · Σ_c x_c        (0 where t == ignore_index)
    dx_c = g · (exp(x_c - lse) - (1 - eps) · [c == t] - eps / C)   (0 in an ignored row)

The forward writes ``loss`` and ``lse`` (float32, or float64 for float64 logits), never the
probabilities; the backward reads ``x`` and ``lse`` once and writes ``dx`` — which may be ``x``'s
own storage (each element is read before it is written, by the same program). ``g`` is the
row's incoming gradient (stride 0 for a broadcast scalar: the mean / sum reductions).

``eps`` arrives as two float32 scalars (Triton passes Python floats as float32), ``eps_hi +
eps_lo``, so that float64 logits get it to ~48 bits.

The smoothing and target terms are compiled in only when they are present (``SMOOTH``,
``TARGET``), so that ``0 · (-inf)`` never makes a NaN of a row holding ``-inf`` logits.
Targets outside ``[0, C)`` that are not ``ignore_index`` fail a device assert on CUDA; the host
checks CPU tensors before launching.
"""
import triton
import triton.language as tl


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr, t_ptr, loss_ptr, lse_ptr,
    C, sx_n, sx_c, st,
    ignore_index, eps_hi, eps_lo,
    BLOCK_C: tl.constexpr, SMOOTH: tl.constexpr, TARGET: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    eps = tl.zeros([], ACC) + eps_hi + eps_lo
    row = tl.program_id(0)
    if USE_INT64:
        row = row.to(tl.int64)
    base = x_ptr + row * sx_n
    offs = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    s = tl.zeros([BLOCK_C], ACC)
    total = tl.zeros([BLOCK_C], ACC)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(base + cols * sx_c, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        empty = m_new == float("-inf")  # every value of this lane so far is -inf: keep the sum at 0
        s = s * tl.where(empty, 0.0, tl.exp(m - m_new)) + tl.where(empty, 0.0, tl.exp(x - m_new))
        m = m_new
        if SMOOTH:
            total += tl.where(mask, x, 0.0)
    big = tl.max(m, axis=0)
    lse = big + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big)), axis=0))
    t = tl.load(t_ptr + row * st).to(tl.int64)
    valid = t != ignore_index
    tl.device_assert(~valid | ((t >= 0) & (t < C)), "cross_entropy: target out of [0, C)")
    loss = lse
    if TARGET:
        x_t = tl.load(base + tl.where(valid, t, 0) * sx_c).to(ACC)
        loss = loss - (1.0 - eps) * x_t
    if SMOOTH:
        loss = loss - (eps / C) * tl.sum(total, axis=0)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0).to(loss_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_bwd_kernel(
    x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr,
    C, sx_n, sx_c, st, sg, sdx_n, sdx_c,
    ignore_index, eps_hi, eps_lo,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    eps = tl.zeros([], ACC) + eps_hi + eps_lo
    row = tl.program_id(0)
    if USE_INT64:
        row = row.to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    t = tl.load(t_ptr + row * st).to(tl.int64)
    valid = t != ignore_index
    g = tl.where(valid, tl.load(g_ptr + row * sg).to(ACC), 0.0)
    lse = tl.load(lse_ptr + row).to(ACC)
    x_base = x_ptr + row * sx_n
    dx_base = dx_ptr + row * sdx_n
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_base + cols * sx_c, mask=mask, other=0.0).to(ACC)
        d = tl.exp(x - lse) - tl.where(cols == t, 1.0 - eps, 0.0) - eps / C
        # an ignored row (g = 0) is written as exact zeros, whatever its logits
        dx = tl.where(valid, g * d, 0.0)
        tl.store(dx_base + cols * sdx_c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


#: What the compile tier requires of each kernel (mmkernels.testing.compile_tier).
EXPECTATIONS = {
    "cross_entropy_fwd_kernel": {"local_memory": 0},
    "cross_entropy_bwd_kernel": {"local_memory": 0},
}
