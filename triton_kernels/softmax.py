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

Odd row lengths (``ALIGN`` > 1, rows only, every tensor with the same row stride): a row that
starts off a 16-byte boundary is split into a head of fewer than ``ALIGN`` elements up to the
first boundary, an aligned body of whole ``ALIGN``-element groups — its mask constant over each
group, so its loads and stores are 128-bit — and a tail of the rest. ``ALIGN`` is 16 bytes in
elements of the narrowest dtype; 1 turns the split off (head and tail empty, the body the row).

Few long rows (rows layout, fewer row blocks than a wave): the looped kernels' work is split
along each row over ``SPLITS`` programs — ``softmax_split_partials_kernel`` writes each slice's
partial max / sum (or the backward's partial reduction), ``softmax_split_fwd_out_kernel`` /
``softmax_split_bwd_out_kernel`` combine a row's partials (the same order in every program:
deterministic) and write their slice.

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
def _split_rows(offs_i, N, s_i, ALIGN: tl.constexpr):
    """Per row [BLOCK_I]: (head length, body groups): the head runs from the row's first element
    to the first 16-byte boundary (``ALIGN`` elements), the body is that many whole groups."""
    if ALIGN > 1:
        head = tl.minimum((ALIGN - (offs_i * s_i) % ALIGN) % ALIGN, N)
        # what _part's multiple_of promises the compiler (a row shorter than its head has no body)
        tl.device_assert(((offs_i * s_i + head) % ALIGN == 0) | (head == N), "softmax: body start not aligned")
        return head, (N - head) // ALIGN
    return tl.zeros_like(offs_i), tl.zeros_like(offs_i) + N


@triton.jit
def _part(o, offs_i, cols, s_o, s_n, s_i, head, ALIGN: tl.constexpr):
    """Element offsets of a [BLOCK_I, len(cols)] tile of row positions ``head + cols``; the body's
    row starts are aligned (``head`` reaches the boundary), which ``multiple_of`` tells the compiler."""
    if ALIGN > 1:
        return tl.multiple_of(offs_i * s_i + head, ALIGN)[:, None] + cols[None, :]
    return o * s_o + offs_i[:, None] * s_i + cols[None, :] * s_n


@triton.jit
def _masks(mask_i, offs_a, offs_n, N, head, groups, ALIGN: tl.constexpr):
    """(head mask [BLOCK_I, ALIGN], body mask [BLOCK_I, BLOCK_N], tail mask [BLOCK_I, ALIGN]); the
    body's is constant over each ALIGN-group of columns (a group is in or out)."""
    body = mask_i[:, None] & ((offs_n // ALIGN)[None, :] < groups[:, None])
    if ALIGN > 1:
        head_m = mask_i[:, None] & (offs_a[None, :] < head[:, None])
        tail_m = mask_i[:, None] & (offs_a[None, :] < (N - head - groups * ALIGN)[:, None])
    else:  # constant false: the compiler drops the head's and tail's loads, stores and math
        head_m = tl.zeros([mask_i.shape[0], ALIGN], tl.int1)
        tail_m = head_m
    return head_m, body, tail_m


@triton.jit
def _plan(offs_i, offs_n, I, N, s_i, ALIGN: tl.constexpr):
    """A program's rows split as :func:`_split_rows` says: (head/tail column offsets [ALIGN],
    head lengths, body groups, tail starts, head mask, body mask, tail mask)."""
    offs_a = tl.arange(0, ALIGN)
    head, groups = _split_rows(offs_i, N, s_i, ALIGN)
    mh, mb, mt = _masks(offs_i < I, offs_a, offs_n, N, head, groups, ALIGN)
    return offs_a, head, groups, head + groups * ALIGN, mh, mb, mt


@triton.jit
def _ends(ptr, o, offs_i, offs_a, s_o, s_n, s_i, tail0, mh, mt, ACC: tl.constexpr, ALIGN: tl.constexpr):
    """The head and tail tiles [BLOCK_I, ALIGN] of ``ptr``'s rows, in ACC (0 where masked)."""
    h = tl.load(ptr + _part(o, offs_i, offs_a, s_o, s_n, s_i, tl.zeros_like(tail0), ALIGN), mask=mh, other=0.0)
    t = tl.load(ptr + _part(o, offs_i, offs_a, s_o, s_n, s_i, tail0, ALIGN), mask=mt, other=0.0)
    return h.to(ACC), t.to(ACC)


@triton.jit
def _store_ends(ptr, o, offs_i, offs_a, s_o, s_n, s_i, tail0, mh, mt, h, t, ALIGN: tl.constexpr):
    """Store the head and tail tiles of ``ptr``'s rows (converted to its dtype)."""
    out = ptr.dtype.element_ty
    tl.store(ptr + _part(o, offs_i, offs_a, s_o, s_n, s_i, tl.zeros_like(tail0), ALIGN), h.to(out), mask=mh)
    tl.store(ptr + _part(o, offs_i, offs_a, s_o, s_n, s_i, tail0, ALIGN), t.to(out), mask=mt)


@triton.jit
def softmax_fwd_fused_kernel(
    x_ptr, y_ptr,
    N, I,
    sx_o, sx_n, sx_i,
    sy_o, sy_n, sy_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    LOG: tl.constexpr, NEG: tl.constexpr,
    ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """One pass: the whole reduced dim (N <= BLOCK_N) is loaded once and y written once (as head,
    aligned body and tail with ALIGN > 1)."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, mb, mt = _plan(offs_i, offs_n, I, N, sx_i, ALIGN)
    xb = tl.load(x_ptr + _part(o, offs_i, offs_n, sx_o, sx_n, sx_i, head, ALIGN), mask=mb, other=0.0).to(ACC)
    xb = tl.where(mb, -xb if NEG else xb, float("-inf"))
    m = tl.max(xb, axis=1)
    if ALIGN > 1:
        xh, xt = _ends(x_ptr, o, offs_i, offs_a, sx_o, sx_n, sx_i, tail0, mh, mt, ACC, ALIGN)
        xh = tl.where(mh, -xh if NEG else xh, float("-inf"))
        xt = tl.where(mt, -xt if NEG else xt, float("-inf"))
        m = tl.maximum(m, tl.maximum(tl.max(xh, axis=1), tl.max(xt, axis=1)))
    zb = xb - m[:, None]
    eb = tl.where(mb, tl.exp(zb), 0.0)
    s = tl.sum(eb, axis=1)
    if ALIGN > 1:
        zh = xh - m[:, None]
        zt = xt - m[:, None]
        eh = tl.where(mh, tl.exp(zh), 0.0)
        et = tl.where(mt, tl.exp(zt), 0.0)
        s += tl.sum(eh, axis=1) + tl.sum(et, axis=1)
    out = y_ptr.dtype.element_ty
    tl.store(y_ptr + _part(o, offs_i, offs_n, sy_o, sy_n, sy_i, head, ALIGN),
             _normalised(zb, eb, s, LOG, ACC).to(out), mask=mb)
    if ALIGN > 1:
        _store_ends(y_ptr, o, offs_i, offs_a, sy_o, sy_n, sy_i, tail0, mh, mt,
                    _normalised(zh, eh, s, LOG, ACC), _normalised(zt, et, s, LOG, ACC), ALIGN)


@triton.jit
def _normalised(z, e, s, LOG: tl.constexpr, ACC: tl.constexpr):
    """y from ``z = x - max``, ``e = exp(z)`` (0 where masked) and the row sum ``s``."""
    if LOG:
        return z - tl.log(s)[:, None]
    if ACC == tl.float64:
        # no fp64 division: its SASS slow-path subroutine keeps a stack frame (local memory)
        return tl.exp(z - tl.log(s)[:, None])
    return e * (1.0 / s)[:, None]


@triton.jit
def _online_step(m_l, s_l, x, mask):
    """One tile of the online max / rescaled sum, per lane."""
    x = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m_l, x)
    empty = m_new == float("-inf")  # every value seen in this lane is -inf: keep the sum at 0
    alpha = tl.where(empty, 0.0, tl.exp(m_l - m_new))
    return m_new, s_l * alpha + tl.where(empty, 0.0, tl.exp(x - m_new))


@triton.jit
def _lane_total(m_l, s_l, m):
    return tl.sum(tl.where(m_l == float("-inf"), 0.0, s_l * tl.exp(m_l - m[:, None])), axis=1)


@triton.jit
def _fwd_out(x, m, log_s, inv_s, LOG: tl.constexpr, NEG: tl.constexpr, ACC: tl.constexpr):
    if NEG:
        x = -x
    z = x - m[:, None]
    if LOG:
        y = z - log_s[:, None]
    elif ACC == tl.float64:
        y = tl.exp(z - log_s[:, None])
    else:
        y = tl.exp(z) * inv_s[:, None]
    return y


@triton.jit
def _row_stats(x_ptr, o, offs_i, offs_n, offs_a, mask_i, s_o, s_n, s_i, head, groups, tail0, mh, mt, lo, hi,
               BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, NEG: tl.constexpr, ACC: tl.constexpr,
               ALIGN: tl.constexpr):
    """(max, Σ exp(x - max)) of each row over the body columns ``[lo, hi)`` and the head / tail
    where their masks say: an online max and rescaled sum per tile lane (no cross-lane reduction
    inside the loop), combined at the end."""
    xh, xt = _ends(x_ptr, o, offs_i, offs_a, s_o, s_n, s_i, tail0, mh, mt, ACC, ALIGN)
    if NEG:
        xh, xt = -xh, -xt
    m_l = tl.full([BLOCK_I, BLOCK_N], float("-inf"), ACC)
    s_l = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        mask = mask_i[:, None] & ((cols // ALIGN)[None, :] < groups[:, None])
        x = tl.load(x_ptr + _part(o, offs_i, cols, s_o, s_n, s_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
        m_l, s_l = _online_step(m_l, s_l, -x if NEG else x, mask)
    me_l, se_l = _online_step(tl.full([BLOCK_I, ALIGN], float("-inf"), ACC), tl.zeros([BLOCK_I, ALIGN], ACC), xh, mh)
    me_l, se_l = _online_step(me_l, se_l, xt, mt)
    m = tl.maximum(tl.max(m_l, axis=1), tl.max(me_l, axis=1))
    return m, _lane_total(m_l, s_l, m) + _lane_total(me_l, se_l, m)


@triton.jit
def _write_fwd(x_ptr, y_ptr, o, offs_i, offs_n, offs_a, mask_i, sx_o, sx_n, sx_i, sy_o, sy_n, sy_i, head, groups,
               tail0, mh, mt, lo, hi, m, s, BLOCK_N: tl.constexpr, LOG: tl.constexpr, NEG: tl.constexpr,
               ACC: tl.constexpr, ALIGN: tl.constexpr):
    """y over the body columns ``[lo, hi)`` and the head / tail where their masks say, from each
    row's max and sum (a row of only -inf has m = -inf and s = 0: NaN, as in torch)."""
    log_s = tl.log(s)
    inv_s = 1.0 / s.to(tl.float32)  # fp32 division (fp64's subroutine keeps a stack frame)
    xh, xt = _ends(x_ptr, o, offs_i, offs_a, sx_o, sx_n, sx_i, tail0, mh, mt, ACC, ALIGN)
    _store_ends(y_ptr, o, offs_i, offs_a, sy_o, sy_n, sy_i, tail0, mh, mt,
                _fwd_out(xh, m, log_s, inv_s, LOG, NEG, ACC), _fwd_out(xt, m, log_s, inv_s, LOG, NEG, ACC), ALIGN)
    out = y_ptr.dtype.element_ty
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        mask = mask_i[:, None] & ((cols // ALIGN)[None, :] < groups[:, None])
        x = tl.load(x_ptr + _part(o, offs_i, cols, sx_o, sx_n, sx_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + _part(o, offs_i, cols, sy_o, sy_n, sy_i, head, ALIGN),
                 _fwd_out(x, m, log_s, inv_s, LOG, NEG, ACC).to(out), mask=mask)


@triton.jit
def softmax_fwd_online_kernel(
    x_ptr, y_ptr,
    N, I,
    sx_o, sx_n, sx_i,
    sy_o, sy_n, sy_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    LOG: tl.constexpr, NEG: tl.constexpr,
    ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Rows longer than the on-chip limit: pass 1 keeps a running max and rescaled sum per tile
    lane (online softmax, no cross-lane reduction inside the loop), pass 2 writes y. With
    ALIGN > 1 the loops run over the aligned body; head and tail are one small tile each."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, _, mt = _plan(offs_i, offs_n, I, N, sx_i, ALIGN)
    m, s = _row_stats(x_ptr, o, offs_i, offs_n, offs_a, mask_i, sx_o, sx_n, sx_i, head, groups, tail0, mh, mt,
                      0, N, BLOCK_I, BLOCK_N, NEG, ACC, ALIGN)
    _write_fwd(x_ptr, y_ptr, o, offs_i, offs_n, offs_a, mask_i, sx_o, sx_n, sx_i, sy_o, sy_n, sy_i, head, groups,
               tail0, mh, mt, 0, N, m, s, BLOCK_N, LOG, NEG, ACC, ALIGN)


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
def _bwd_terms(y, dy, KIND: tl.constexpr):
    """What the backward's row reduction sums: dy (log-softmax) or y·dy."""
    if KIND == 1:
        return dy
    return y * dy


@triton.jit
def _row_reduce(y_ptr, dy_ptr, o, offs_i, offs_n, offs_a, mask_i, sy_o, sy_n, sy_i, sdy_o, sdy_n, sdy_i, head,
                groups, tail0, mh, mt, lo, hi, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, KIND: tl.constexpr,
                ACC: tl.constexpr, ALIGN: tl.constexpr):
    """The backward's row reduction (Σ dy for log-softmax, else Σ y·dy) over the body columns
    ``[lo, hi)`` and the head / tail where their masks say."""
    yh, yt = _ends(y_ptr, o, offs_i, offs_a, sy_o, sy_n, sy_i, tail0, mh, mt, ACC, ALIGN)
    gh, gt = _ends(dy_ptr, o, offs_i, offs_a, sdy_o, sdy_n, sdy_i, tail0, mh, mt, ACC, ALIGN)
    acc = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        mask = mask_i[:, None] & ((cols // ALIGN)[None, :] < groups[:, None])
        dy = tl.load(dy_ptr + _part(o, offs_i, cols, sdy_o, sdy_n, sdy_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
        if KIND == 1:
            acc += dy
        else:
            y = tl.load(y_ptr + _part(o, offs_i, cols, sy_o, sy_n, sy_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
            acc += y * dy
    return (tl.sum(acc, axis=1) + tl.sum(_bwd_terms(yh, gh, KIND), axis=1)
            + tl.sum(_bwd_terms(yt, gt, KIND), axis=1))


@triton.jit
def _write_bwd(y_ptr, dy_ptr, dx_ptr, o, offs_i, offs_n, offs_a, mask_i, sy_o, sy_n, sy_i, sdy_o, sdy_n, sdy_i,
               sdx_o, sdx_n, sdx_i, head, groups, tail0, mh, mt, lo, hi, red, BLOCK_N: tl.constexpr,
               KIND: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr):
    """dx over the body columns ``[lo, hi)`` and the head / tail where their masks say."""
    out = dx_ptr.dtype.element_ty
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        mask = mask_i[:, None] & ((cols // ALIGN)[None, :] < groups[:, None])
        y = tl.load(y_ptr + _part(o, offs_i, cols, sy_o, sy_n, sy_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + _part(o, offs_i, cols, sdy_o, sdy_n, sdy_i, head, ALIGN), mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + _part(o, offs_i, cols, sdx_o, sdx_n, sdx_i, head, ALIGN),
                 _bwd_math(y, dy, red, KIND).to(out), mask=mask)
    yh, yt = _ends(y_ptr, o, offs_i, offs_a, sy_o, sy_n, sy_i, tail0, mh, mt, ACC, ALIGN)
    gh, gt = _ends(dy_ptr, o, offs_i, offs_a, sdy_o, sdy_n, sdy_i, tail0, mh, mt, ACC, ALIGN)
    _store_ends(dx_ptr, o, offs_i, offs_a, sdx_o, sdx_n, sdx_i, tail0, mh, mt,
                _bwd_math(yh, gh, red, KIND), _bwd_math(yt, gt, red, KIND), ALIGN)


@triton.jit
def softmax_bwd_fused_kernel(
    y_ptr, dy_ptr, dx_ptr,
    N, I,
    sy_o, sy_n, sy_i,
    sdy_o, sdy_n, sdy_i,
    sdx_o, sdx_n, sdx_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    KIND: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """One kernel, three tensor passes: read y and dy once, write dx once."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, mb, mt = _plan(offs_i, offs_n, I, N, sy_i, ALIGN)
    yb = tl.load(y_ptr + _part(o, offs_i, offs_n, sy_o, sy_n, sy_i, head, ALIGN), mask=mb, other=0.0).to(ACC)
    yh, yt = _ends(y_ptr, o, offs_i, offs_a, sy_o, sy_n, sy_i, tail0, mh, mt, ACC, ALIGN)
    gb = tl.load(dy_ptr + _part(o, offs_i, offs_n, sdy_o, sdy_n, sdy_i, head, ALIGN), mask=mb, other=0.0).to(ACC)
    gh, gt = _ends(dy_ptr, o, offs_i, offs_a, sdy_o, sdy_n, sdy_i, tail0, mh, mt, ACC, ALIGN)
    red = (tl.sum(_bwd_terms(yb, gb, KIND), axis=1) + tl.sum(_bwd_terms(yh, gh, KIND), axis=1)
           + tl.sum(_bwd_terms(yt, gt, KIND), axis=1))
    tl.store(dx_ptr + _part(o, offs_i, offs_n, sdx_o, sdx_n, sdx_i, head, ALIGN),
             _bwd_math(yb, gb, red, KIND).to(dx_ptr.dtype.element_ty), mask=mb)
    _store_ends(dx_ptr, o, offs_i, offs_a, sdx_o, sdx_n, sdx_i, tail0, mh, mt,
                _bwd_math(yh, gh, red, KIND), _bwd_math(yt, gt, red, KIND), ALIGN)


@triton.jit
def softmax_bwd_looped_kernel(
    y_ptr, dy_ptr, dx_ptr,
    N, I,
    sy_o, sy_n, sy_i,
    sdy_o, sdy_n, sdy_i,
    sdx_o, sdx_n, sdx_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    KIND: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Rows longer than the on-chip limit: pass 1 reduces, pass 2 re-reads y, dy and writes dx
    (the aligned body in the loops, head and tail one small tile each)."""
    o, offs_i, offs_n = _tile_offsets(tl.program_id(0), I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, _, mt = _plan(offs_i, offs_n, I, N, sy_i, ALIGN)
    red = _row_reduce(y_ptr, dy_ptr, o, offs_i, offs_n, offs_a, mask_i, sy_o, sy_n, sy_i, sdy_o, sdy_n, sdy_i, head,
                      groups, tail0, mh, mt, 0, N, BLOCK_I, BLOCK_N, KIND, ACC, ALIGN)
    _write_bwd(y_ptr, dy_ptr, dx_ptr, o, offs_i, offs_n, offs_a, mask_i, sy_o, sy_n, sy_i, sdy_o, sdy_n, sdy_i,
               sdx_o, sdx_n, sdx_i, head, groups, tail0, mh, mt, 0, N, red, BLOCK_N, KIND, ACC, ALIGN)


@triton.jit
def _split_program(pid, SPLITS, I, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, USE_INT64: tl.constexpr):
    """A split kernel's program id -> (split, o, i offsets, n offsets): ``SPLITS`` consecutive
    programs share the rows of one row block, each taking one slice of them."""
    o, offs_i, offs_n = _tile_offsets(pid // SPLITS, I, BLOCK_I, BLOCK_N, USE_INT64)
    return pid % SPLITS, o, offs_i, offs_n


@triton.jit
def softmax_split_partials_kernel(
    a_ptr, b_ptr, part_ptr,
    N, I, SLICE, SPLITS,
    sa_o, sa_n, sa_i,
    sb_o, sb_n, sb_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, NEG: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Few long rows, pass 1: program ``(row block, j)`` reduces slice ``j`` of its rows (the body
    columns ``[j·SLICE, (j+1)·SLICE)``; the head goes with slice 0, the tail with the last) and
    writes its partials at ``part[row, j]``: MODE 0 (forward) the max and rescaled sum of ``a``
    (``-a`` with NEG), two floats; MODE 1 (log-softmax backward) ``Σ b``; MODE 2 (softmax /
    softmin backward) ``Σ a·b``."""
    split, o, offs_i, offs_n = _split_program(tl.program_id(0), SPLITS, I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, _, mt = _plan(offs_i, offs_n, I, N, sa_i, ALIGN)
    mh = mh & (split == 0)
    mt = mt & (split == SPLITS - 1)
    lo = split * SLICE
    if MODE == 0:
        m, s = _row_stats(a_ptr, o, offs_i, offs_n, offs_a, mask_i, sa_o, sa_n, sa_i, head, groups, tail0, mh, mt,
                          lo, lo + SLICE, BLOCK_I, BLOCK_N, NEG, ACC, ALIGN)
        out = (offs_i * SPLITS + split) * 2
        tl.store(part_ptr + out, m, mask=mask_i)
        tl.store(part_ptr + out + 1, s, mask=mask_i)
    else:  # a = y, b = dy
        red = _row_reduce(a_ptr, b_ptr, o, offs_i, offs_n, offs_a, mask_i, sa_o, sa_n, sa_i, sb_o, sb_n, sb_i, head,
                          groups, tail0, mh, mt, lo, lo + SLICE, BLOCK_I, BLOCK_N, 1 if MODE == 1 else 0, ACC, ALIGN)
        tl.store(part_ptr + offs_i * SPLITS + split, red, mask=mask_i)


@triton.jit
def _split_partials(part_ptr, offs_i, mask_i, SPLITS, SPLITS_PAD: tl.constexpr, FIELDS: tl.constexpr,
                    field: tl.constexpr):
    """Every split's partial ``field`` of each row, [BLOCK_I, SPLITS_PAD] (padding: -inf for a
    forward max, else 0), and the mask of the real ones."""
    js = tl.arange(0, SPLITS_PAD)
    mask = mask_i[:, None] & (js[None, :] < SPLITS)
    return tl.load(part_ptr + (offs_i[:, None] * SPLITS + js[None, :]) * FIELDS + field, mask=mask,
                   other=float("-inf") if field == 0 and FIELDS == 2 else 0.0), mask


@triton.jit
def softmax_split_fwd_out_kernel(
    x_ptr, y_ptr, part_ptr,
    N, I, SLICE, SPLITS,
    sx_o, sx_n, sx_i,
    sy_o, sy_n, sy_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr,
    LOG: tl.constexpr, NEG: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Few long rows, pass 2 of the forward: each program combines its rows' partials — every
    program of a row the same way, in the same order (deterministic) — and writes y over its slice."""
    split, o, offs_i, offs_n = _split_program(tl.program_id(0), SPLITS, I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, _, mt = _plan(offs_i, offs_n, I, N, sx_i, ALIGN)
    mh = mh & (split == 0)
    mt = mt & (split == SPLITS - 1)
    pm, pmask = _split_partials(part_ptr, offs_i, mask_i, SPLITS, SPLITS_PAD, 2, 0)
    ps, _ = _split_partials(part_ptr, offs_i, mask_i, SPLITS, SPLITS_PAD, 2, 1)
    m = tl.max(pm, axis=1)
    s = tl.sum(tl.where(pmask & (pm != float("-inf")), ps * tl.exp(pm - m[:, None]), 0.0), axis=1)
    _write_fwd(x_ptr, y_ptr, o, offs_i, offs_n, offs_a, mask_i, sx_o, sx_n, sx_i, sy_o, sy_n, sy_i, head, groups,
               tail0, mh, mt, split * SLICE, split * SLICE + SLICE, m, s, BLOCK_N, LOG, NEG, ACC, ALIGN)


@triton.jit
def softmax_split_bwd_out_kernel(
    y_ptr, dy_ptr, dx_ptr, part_ptr,
    N, I, SLICE, SPLITS,
    sy_o, sy_n, sy_i,
    sdy_o, sdy_n, sdy_i,
    sdx_o, sdx_n, sdx_i,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr,
    KIND: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
):
    """Few long rows, pass 2 of the backward: the row reduction is the sum of the slices'
    partials (the same order in every program), then dx over this program's slice."""
    split, o, offs_i, offs_n = _split_program(tl.program_id(0), SPLITS, I, BLOCK_I, BLOCK_N, USE_INT64)
    mask_i = offs_i < I
    offs_a, head, groups, tail0, mh, _, mt = _plan(offs_i, offs_n, I, N, sy_i, ALIGN)
    mh = mh & (split == 0)
    mt = mt & (split == SPLITS - 1)
    red = tl.sum(_split_partials(part_ptr, offs_i, mask_i, SPLITS, SPLITS_PAD, 1, 0)[0], axis=1)
    _write_bwd(y_ptr, dy_ptr, dx_ptr, o, offs_i, offs_n, offs_a, mask_i, sy_o, sy_n, sy_i, sdy_o, sdy_n, sdy_i,
               sdx_o, sdx_n, sdx_i, head, groups, tail0, mh, mt, split * SLICE, split * SLICE + SLICE, red, BLOCK_N,
               KIND, ACC, ALIGN)


#: What the compile tier checks for each kernel at every config it can launch with
#: (mmkernels/testing/compile_tier.py): no spills to local memory, and no tensor-core
#: instructions are expected of a reduction kernel.
EXPECTATIONS = {
    "softmax_fwd_fused_kernel": {"local_memory": 0},
    "softmax_fwd_online_kernel": {"local_memory": 0},
    "softmax_bwd_fused_kernel": {"local_memory": 0},
    "softmax_bwd_looped_kernel": {"local_memory": 0},
    "softmax_split_partials_kernel": {"local_memory": 0},
    "softmax_split_fwd_out_kernel": {"local_memory": 0},
    "softmax_split_bwd_out_kernel": {"local_memory": 0},
}
