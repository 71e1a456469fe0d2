"""Fused cross-entropy kernels: logits -> per-row loss and log-sum-exp, and the gradient in one pass.

One program per row of ``C`` logits (``u``, any row / column strides), the row read in
``BLOCK_C`` chunks. The loss terms, each compiled in only when present:

    z    = cap · tanh(u / cap)                              (SOFTCAP; else z = u)
    lse  = log Σ_c exp(z_c)                                 (online: a running max and rescaled sum per lane)
    ce   = a · lse - (1 - eps) · w_t · z_t - (eps / C) · Σ_c w_c z_c,   a = (1 - eps) · w_t + (eps / C) · W
    loss = ce + zs · lse²                                    (0 where t == ignore_index)
    dz_c = (a + 2 · zs · lse) · exp(z_c - lse) - (1 - eps) · w_t · [c == t] - (eps / C) · w_c
    du_c = g · dz_c · (1 - (z_c / cap)²)                    (SOFTCAP; 0 in an ignored row)

``t`` the row's target, ``eps`` the label smoothing, ``w`` the class weights (HAS_WEIGHT; else all
1, ``W = Σ_c w_c`` = C), ``zs`` the z-loss scale (Z_LOSS). This is ``F.cross_entropy`` with
``weight=`` and ``label_smoothing=`` (the weighted target term plus ``eps`` times the weighted mean
over the classes), a z-loss ``zs · lse²`` (PaLM) and Gemma-style logit soft-capping.

The forward writes ``loss``, ``lse`` (float32, or float64 for float64 logits) and, when asked
(TARGET_LOGP), the target's log-probability ``z_t - lse`` (0 in an ignored row); never the
probabilities. The backward reads ``u`` and ``lse`` once and writes ``du`` — which may be ``u``'s
own storage (each element is read before it is written, by the same program). ``g`` is the row's
incoming gradient (stride 0 for a broadcast scalar: the mean / sum reductions). ``W`` reaches the
kernels as a 1-element tensor (summed on the device: no host read).

Floats that float64 logits need to ~48 bits (``eps``, ``zs``, ``cap``) arrive as two float32
scalars ``hi + lo`` (Triton passes Python floats as float32).

The smoothing and target terms are compiled in only when they are present (``SMOOTH``,
``TARGET``), so that ``0 · (-inf)`` never makes a NaN of a row holding ``-inf`` logits.
Targets outside ``[0, C)`` that are not ``ignore_index`` fail a device assert on CUDA; the host
checks CPU tensors before launching.
"""
import triton
import triton.language as tl


@triton.jit
def _capped(u, cap, SOFTCAP: tl.constexpr):
    """``cap · tanh(u / cap)``, or ``u``. tanh: its odd Taylor polynomial to v¹⁵ for |v| < 1/8
    (relative error < 1e-17), else ``1 - 2 / (exp(2|v|) + 1)`` with the sign (exact at ±inf)."""
    if SOFTCAP:
        v = u / cap
        a = tl.abs(v)
        v2 = v * v
        poly = tl.full([], -929569.0 / 638512875.0, v.dtype)  # coefficients in the math dtype
        poly = poly * v2 + tl.full([], 21844.0 / 6081075.0, v.dtype)
        poly = poly * v2 - tl.full([], 1382.0 / 155925.0, v.dtype)
        poly = poly * v2 + tl.full([], 62.0 / 2835.0, v.dtype)
        poly = poly * v2 - tl.full([], 17.0 / 315.0, v.dtype)
        poly = poly * v2 + tl.full([], 2.0 / 15.0, v.dtype)
        poly = poly * v2 - tl.full([], 1.0 / 3.0, v.dtype)
        small = v + v * v2 * poly
        big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        return cap * tl.where(a < 0.125, small, tl.where(v < 0, -big, big))
    return u


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr, t_ptr, w_ptr, wsum_ptr, loss_ptr, lse_ptr, tlp_ptr,
    C, sx_n, sx_c, st, sw,
    ignore_index, eps_hi, eps_lo, zs_hi, zs_lo, cap_hi, cap_lo,
    BLOCK_C: tl.constexpr, SMOOTH: tl.constexpr, TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, TARGET_LOGP: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    eps = tl.zeros([], ACC) + eps_hi + eps_lo
    cap = tl.zeros([], ACC) + cap_hi + cap_lo
    row = tl.program_id(0)
    if USE_INT64:
        row = row.to(tl.int64)
    base = x_ptr + row * sx_n
    offs = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    s = tl.zeros([BLOCK_C], ACC)
    total = tl.zeros([BLOCK_C], ACC)   # Σ_c w_c z_c (SMOOTH)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(base + cols * sx_c, mask=mask, other=float("-inf")).to(ACC)
        if SOFTCAP:  # the cap maps the padding's -inf to -cap: put it back
            x = tl.where(mask, _capped(x, cap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, x)
        empty = m_new == float("-inf")  # every value of this lane so far is -inf: keep the sum at 0
        s = s * tl.where(empty, 0.0, tl.exp(m - m_new)) + tl.where(empty, 0.0, tl.exp(x - m_new))
        m = m_new
        if SMOOTH:
            if HAS_WEIGHT:
                wc = tl.load(w_ptr + cols * sw, mask=mask, other=0.0).to(ACC)
                total += tl.where(mask, wc * x, 0.0)
            else:
                total += tl.where(mask, x, 0.0)
    big = tl.max(m, axis=0)
    lse = big + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - big)), axis=0))
    t = tl.load(t_ptr + row * st).to(tl.int64)
    valid = t != ignore_index
    tl.device_assert(~valid | ((t >= 0) & (t < C)), "cross_entropy: target out of [0, C)")
    t_safe = tl.where(valid, t, 0)
    w_t = 1.0
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe * sw).to(ACC)
    x_t = _capped(tl.load(base + t_safe * sx_c).to(ACC), cap, SOFTCAP)
    loss = tl.zeros([], ACC)
    if TARGET:
        loss += (1.0 - eps) * w_t * (lse - x_t)
    if SMOOTH:
        w_all = C * 1.0
        if HAS_WEIGHT:
            w_all = tl.load(wsum_ptr).to(ACC)
        loss += (eps / C) * (w_all * lse - tl.sum(total, axis=0))
    if Z_LOSS:
        loss += (tl.zeros([], ACC) + zs_hi + zs_lo) * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0).to(loss_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
    if TARGET_LOGP:
        tl.store(tlp_ptr + row, tl.where(valid, x_t - lse, 0.0).to(tlp_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_bwd_kernel(
    x_ptr, t_ptr, w_ptr, wsum_ptr, lse_ptr, g_ptr, dx_ptr,
    C, sx_n, sx_c, st, sw, sg, sdx_n, sdx_c,
    ignore_index, eps_hi, eps_lo, zs_hi, zs_lo, cap_hi, cap_lo,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    eps = tl.zeros([], ACC) + eps_hi + eps_lo
    cap = tl.zeros([], ACC) + cap_hi + cap_lo
    row = tl.program_id(0)
    if USE_INT64:
        row = row.to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    t = tl.load(t_ptr + row * st).to(tl.int64)
    valid = t != ignore_index
    g = tl.where(valid, tl.load(g_ptr + row * sg).to(ACC), 0.0)
    lse = tl.load(lse_ptr + row).to(ACC)
    w_t = 1.0
    w_all = C * 1.0
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tl.where(valid, t, 0) * sw).to(ACC)
        w_all = tl.load(wsum_ptr).to(ACC)
    a = (1.0 - eps) * w_t + (eps / C) * w_all
    if Z_LOSS:
        a += 2.0 * (tl.zeros([], ACC) + zs_hi + zs_lo) * lse
    x_base = x_ptr + row * sx_n
    dx_base = dx_ptr + row * sdx_n
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = _capped(tl.load(x_base + cols * sx_c, mask=mask, other=0.0).to(ACC), cap, SOFTCAP)
        w_c = 1.0
        if HAS_WEIGHT:
            w_c = tl.load(w_ptr + cols * sw, mask=mask, other=0.0).to(ACC)
        d = a * tl.exp(x - lse) - tl.where(cols == t, (1.0 - eps) * w_t, 0.0) - (eps / C) * w_c
        if SOFTCAP:
            d = d * (1.0 - (x / cap) * (x / cap))
        # an ignored row (g = 0) is written as exact zeros, whatever its logits
        dx = tl.where(valid, g * d, 0.0)
        tl.store(dx_base + cols * sdx_c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_cross_entropy_stats_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, cw_ptr, m_ptr, s_ptr, zt_ptr, zw_ptr,
    T, V, H, V_SPLIT, sx_t, sx_h, sw_v, sw_h, st, scw,
    ignore_index, cap_hi, cap_lo,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, HAS_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_H: tl.constexpr, DOT_F32: tl.constexpr, USE_INT64: tl.constexpr,
):
    """An output layer's logits ``u = x·Wᵀ + b`` as a GEMM whose epilogue keeps, per token, the
    running max ``m`` and rescaled sum ``s`` of ``exp z`` (``z`` capped with SOFTCAP), the target's
    ``z_t`` and (SMOOTH) ``Σ_c w_c z_c`` — the logits never reach memory.

    Grid ``(cdiv(T, BLOCK_T), splits)``: program ``(i, j)`` takes tokens ``[i·BLOCK_T, ...)`` and
    the vocabulary slice ``[j·V_SPLIT, (j+1)·V_SPLIT)`` in BLOCK_V steps, each a BLOCK_T × BLOCK_V
    tile accumulated over H in BLOCK_H steps (``tl.dot``: tensor cores for 16-bit and TF32). It
    writes its four partials at ``[j, token]`` of the (splits, T) float32 outputs; the launcher
    combines the splits (a fixed-order reduction: deterministic). ``z_t`` is 0 in a split that
    does not hold the target. EVEN_H: ``H`` is a multiple of BLOCK_H (no mask along H). DOT_F32:
    fp32 dot operands (bf16 under the interpreter only)."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    if USE_INT64:
        pid_t = pid_t.to(tl.int64)
        split = split.to(tl.int64)
    cap = cap_hi + cap_lo
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    t = tl.load(t_ptr + rows * st, mask=rmask, other=ignore_index).to(tl.int64)
    tl.device_assert((t == ignore_index) | ((t >= 0) & (t < V)), "linear_cross_entropy: target out of [0, C)")
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    zt = tl.zeros([BLOCK_T], tl.float32)
    zw = tl.zeros([BLOCK_T], tl.float32)
    v_lo = split * V_SPLIT
    v_hi = tl.minimum(V, v_lo + V_SPLIT)
    hs = tl.arange(0, BLOCK_H)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_hi
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        x_ptrs = x_ptr + rows[:, None] * sx_t + hs[None, :] * sx_h
        w_ptrs = w_ptr + cols[:, None] * sw_v + hs[None, :] * sw_h  # a (BLOCK_V, BLOCK_H) tile: H contiguous
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:  # the masks are loop-invariant
                xa = tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
                wb = tl.load(w_ptrs, mask=cmask[:, None], other=0.0)
            else:
                hmask = hs < H - h0
                xa = tl.load(x_ptrs, mask=rmask[:, None] & hmask[None, :], other=0.0)
                wb = tl.load(w_ptrs, mask=cmask[:, None] & hmask[None, :], other=0.0)
            if DOT_F32:
                xa = xa.to(tl.float32)
                wb = wb.to(tl.float32)
            acc = tl.dot(xa, tl.trans(wb), acc, input_precision=PRECISION, out_dtype=tl.float32)
            x_ptrs += BLOCK_H * sx_h
            w_ptrs += BLOCK_H * sw_h
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # the logits as the unfused composition has them: rounded to the input's dtype (not under
        # the interpreter, DOT_F32, whose float32 -> bfloat16 conversion truncates: a bias)
        if not DOT_F32:
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        z = _capped(acc, cap, SOFTCAP)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        empty = m_new == float("-inf")  # nothing but -inf so far in this row: keep the sum at 0
        scale = tl.where(empty, 0.0, tl.exp(m - m_new))
        e = tl.where(empty[:, None], 0.0, tl.exp(z - m_new[:, None]))
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where((cols[None, :] == t[:, None]) & cmask[None, :], z, 0.0), axis=1)
        if SMOOTH:
            if HAS_WEIGHT:
                wc = tl.load(cw_ptr + cols * scw, mask=cmask, other=0.0).to(tl.float32)
                zw += tl.sum(tl.where(cmask[None, :], z * wc[None, :], 0.0), axis=1)
            else:
                zw += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
    out = split * T + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)
    if SMOOTH:
        tl.store(zw_ptr + out, zw, mask=rmask)


#: What the compile tier requires of each kernel (mmkernels.testing.compile_tier).
EXPECTATIONS = {
    "cross_entropy_fwd_kernel": {"local_memory": 0},
    "cross_entropy_bwd_kernel": {"local_memory": 0},
    "linear_cross_entropy_stats_kernel": {"local_memory": 0, "mma": "HGMMA"},  # not for IEEE fp32
}
