"""MoE expert kernels: grouped GEMMs over the expert-ordered rows of a routing, forward and backward.

Rows. Row ``r < offsets[E]`` of the expert-ordered view is slot ``s = sorted_slots[r]`` of token
``s // K``; a routing's tile table cuts each expert's rows into ``BLOCK_M`` tiles
(``tile_experts[i]``, ``tile_row_starts[i]``; -1 past the tiles in use), so a grouped GEMM is one
launch over ``(tiles, column blocks)`` whose programs exit on a -1 tile. Activations are never
permuted in memory: the first GEMM gathers its A rows (tokens) through ``sorted_slots``.

Forward, for expert ``e`` on its rows (``x_r`` = the row's token):

1. ``experts_up_kernel``: ``h = x_r · gate_up_eᵀ (+ b1_e)``; the epilogue writes the pre-activation
   ``h`` (rows × 2I, gate columns then up columns; kept for the backward) and
   ``a = act(gate) · up`` (rows × I);
2. ``experts_rows_kernel``: ``y = w_r · (a · down_eᵀ (+ b2_e))`` — the routing weight in the
   epilogue (rows × H);
3. ``experts_combine_kernel``: ``out[t] = Σ_j y[row(t, j)]`` in the fixed order j = 0 .. k-1 over
   the kept slots: deterministic, no atomics.

Backward (``dout`` the incoming gradient):

4. ``experts_dact_kernel``: ``g = dout_r · down_e`` (rows × I); epilogue: the row's partial
   ``Σ_i g·a`` (for the routing weight's gradient) per column block, and
   ``dh = (d gate, d up)`` of ``act(gate)·up`` for ``w_r · g``, in gate_up's row order;
5. ``experts_rows_kernel`` again: ``dx_r = dh · gate_up_e`` (rows × H), then the combine kernel sums the
   rows of each token;
6. ``experts_dweight_kernel``: per expert, ``d gate_up_e = dhᵀ · x_rows`` and
   ``d down_e = (w·dout)ᵀ · a`` with the expert's rows as the reduction — one program per output
   tile, no atomics; the biases' gradients are the column sums of the left operands;
   ``experts_gather_kernel`` first copies x's rows and ``w · dout``'s rows into expert order (with
   the gather inside its reduction loop, d gate_up measured 400 TFLOP/s on an H200; the same kernel
   on contiguous rows, d down, 650);
7. ``experts_dw_kernel``: ``d w[t, j] = Σ partials + dout_t · b2_e``.

Math in ``ACC`` (float32; float64 for float64); ``tl.dot`` with ``PRECISION`` ("ieee" for fp32 and
fp64 storage, bf16 / fp16 operands with fp32 accumulation otherwise).
"""
import triton
import triton.language as tl

# The gated activations by code (``ACT``): the activation's index in
# ``mmkernels.ops.experts.ACTIVATIONS``, as the C++ kernels (csrc/experts.cpp) take it too.
SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
RELU = tl.constexpr(3)
SWIGLU_OAI = tl.constexpr(4)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gated(g, u, ACT: tl.constexpr, alpha, limit):
    """act(g) · u (gpt-oss: (clamp(u) + 1) · g'·σ(α g'), g' = min(g, limit))."""
    if ACT == SILU:
        a = g * _sigmoid(g) * u
    elif ACT == GELU:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    elif ACT == GELU_TANH:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 * _sigmoid(2.0 * inner)) * u  # 1 + tanh(z) = 2 σ(2z)
    elif ACT == RELU:
        a = tl.maximum(g, 0.0) * u
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a = (uc + 1.0) * gc * _sigmoid(gc * alpha)
    return a


@triton.jit
def _gated_backward(g, u, da, ACT: tl.constexpr, alpha, limit):
    """(d g, d u) of act(g) · u for the incoming ``da``."""
    if ACT == SILU:
        s = _sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == GELU_TANH:
        c = 0.7978845608028654
        th = 2.0 * _sigmoid(2.0 * c * (g + 0.044715 * g * g * g)) - 1.0
        act = 0.5 * g * (1.0 + th)
        dact = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == RELU:
        act = tl.maximum(g, 0.0)
        dact = tl.where(g > 0, 1.0, 0.0)
    if ACT == SWIGLU_OAI:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(gc * alpha)
        glu = gc * s
        dglu = tl.where(g <= limit, s + gc * alpha * s * (1.0 - s), 0.0)
        dg = da * (uc + 1.0) * dglu
        du = tl.where((u >= -limit) & (u <= limit), da * glu, 0.0)
    else:
        dg = da * u * dact
        du = da * act
    return dg, du


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_F32: tl.constexpr):
    """``acc + a·b``; ``DOT_F32``: the operands in fp32 first (Triton's interpreter computes bf16
    dots wrongly; only ever set under the interpreter)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _grouped_pid(pid, NUM_TILES, NUM_COLS, GROUP: tl.constexpr):
    """(tile, column block) of program ``pid`` of a 1-D grid over ``NUM_TILES x NUM_COLS``: the
    programs walk ``GROUP`` tiles at a time, tile fastest, then the column blocks — so the programs
    running together share their A rows (GROUP tiles) and their weight columns (the few column
    blocks a wave spans) in L2 instead of streaming every A row once per column block."""
    width = GROUP * NUM_COLS
    first = (pid // width) * GROUP
    size = tl.minimum(NUM_TILES - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _tile_rows(tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr, tile, K, BLOCK_M: tl.constexpr):
    """(expert, rows [BLOCK_M], row mask, tokens, slots) of tile ``tile``; expert -1: no tile."""
    e = tl.load(tile_experts_ptr + tile)
    start = tl.load(tile_starts_ptr + tile)
    e_ok = tl.maximum(e, 0)
    end = tl.load(offsets_ptr + e_ok + 1)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = (rows < end) & (e >= 0)
    slots = tl.load(sorted_ptr + rows, mask=rmask, other=0)
    return e, e_ok, rows, rmask, slots // K, slots


@triton.jit
def experts_up_kernel(
    x_ptr, gu_ptr, b1_ptr, h_ptr, a_ptr,
    tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
    H, I, K,
    s_xt, s_xh, s_ge, s_gn, s_gh,
    alpha, limit,
    NUM_TILES, NUM_COLS,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_H: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Grouped GEMM 1 on (tile, column block ``col``) of program ``program_id(0)`` (see
    :func:`_grouped_pid`), columns ``col·BLOCK_N`` of I:
    ``h = x_rows · gate_up_eᵀ (+ b1)`` (A rows gathered through ``sorted_slots``); writes ``h``
    (rows × 2I: gate | up; when ``SAVE_H``) and ``a = act(gate)·up`` (rows × I)."""
    tile, col = _grouped_pid(tl.program_id(0), NUM_TILES, NUM_COLS, GROUP)
    e, e_ok, rows, rmask, tok, _ = _tile_rows(tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
                                              tile, K, BLOCK_M)
    if e >= 0:
        n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        if INTERLEAVED:
            g_row, u_row = 2 * n, 2 * n + 1
        else:
            g_row, u_row = n, I + n
        kk = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        w_base = gu_ptr + e_ok * s_ge
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + kk) < H
            a = tl.load(x_ptr + tok[:, None] * s_xt + (k0 + kk)[None, :] * s_xh,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(w_base + g_row[None, :] * s_gn + (k0 + kk)[:, None] * s_gh,
                         mask=kmask[:, None] & nmask[None, :], other=0.0)
            bu = tl.load(w_base + u_row[None, :] * s_gn + (k0 + kk)[:, None] * s_gh,
                         mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc_g = _dot(a, bg, acc_g, PRECISION, ACC, DOT_F32)
            acc_u = _dot(a, bu, acc_u, PRECISION, ACC, DOT_F32)
        if HAS_BIAS:
            acc_g += tl.load(b1_ptr + e_ok * 2 * I + g_row, mask=nmask, other=0.0).to(ACC)[None, :]
            acc_u += tl.load(b1_ptr + e_ok * 2 * I + u_row, mask=nmask, other=0.0).to(ACC)[None, :]
        omask = rmask[:, None] & nmask[None, :]
        if SAVE_H:
            tl.store(h_ptr + rows[:, None] * (2 * I) + n[None, :], acc_g.to(h_ptr.dtype.element_ty), mask=omask)
            tl.store(h_ptr + rows[:, None] * (2 * I) + I + n[None, :], acc_u.to(h_ptr.dtype.element_ty), mask=omask)
        act = _gated(acc_g, acc_u, ACT, alpha, limit)
        tl.store(a_ptr + rows[:, None] * I + n[None, :], act.to(a_ptr.dtype.element_ty), mask=omask)


@triton.jit
def experts_rows_kernel(
    a_ptr, wm_ptr, b_ptr, w_ptr, out_ptr,
    tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
    N, KD, K, KD_SPLIT, s_split,
    s_me, s_mn, s_mk, s_wt, s_wj,
    NUM_TILES, NUM_COLS,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHTED: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """A grouped GEMM over contiguous expert rows on (tile, column block ``col``) of program
    ``program_id(0)``: ``out_rows = a_rows · M_eᵀ (+ b_e) (· w_row)``, ``a`` rows × KD, the
    expert's matrix ``M_e[n, kd]`` at ``wm + e·s_me + n·s_mn + kd·s_mk``, columns ``col·BLOCK_N``
    of N; ``WEIGHTED``: times the row's routing weight.

    Split-K (decode, where the tiles x column blocks are under one wave): program
    ``program_id(1) = s`` sums the reduction's ``KD_SPLIT`` columns from ``s·KD_SPLIT`` (a multiple
    of BLOCK_K) and writes its partial to plane ``s`` of ``out`` (planes ``s_split`` elements apart,
    in ACC); the bias is plane 0's; the combine kernel sums the planes in order (deterministic).
    Without split: one plane, ``KD_SPLIT >= KD``.

    Forward GEMM 2: ``y = w_row · (a · down_eᵀ + b2_e)`` (M = down, N = H, KD = I). Backward:
    ``dx_rows = dh · gate_up_e`` (M = gate_upᵀ by strides, N = H, KD = 2I: ``dh`` is in gate_up's
    row order; the combine kernel then sums each token's rows)."""
    tile, col = _grouped_pid(tl.program_id(0), NUM_TILES, NUM_COLS, GROUP)
    split = tl.program_id(1)
    e, e_ok, rows, rmask, tok, slots = _tile_rows(tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
                                                  tile, K, BLOCK_M)
    if e >= 0:
        n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        m_base = wm_ptr + e_ok * s_me
        k_lo = split * KD_SPLIT
        k_hi = tl.minimum(KD, k_lo + KD_SPLIT)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kmask = (k0 + kk) < k_hi
            a = tl.load(a_ptr + rows[:, None] * KD + (k0 + kk)[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            b = tl.load(m_base + n[None, :] * s_mn + (k0 + kk)[:, None] * s_mk,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, b, acc, PRECISION, ACC, DOT_F32)
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(b_ptr + e_ok * N + n, mask=nmask, other=0.0).to(ACC)[None, :]
        if WEIGHTED:
            w = tl.load(w_ptr + tok * s_wt + (slots - tok * K) * s_wj, mask=rmask, other=0.0).to(ACC)
            acc = acc * w[:, None]
        tl.store(out_ptr + split * s_split + rows[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def experts_combine_kernel(
    y_ptr, slot_rows_ptr, offsets_ptr, out_ptr,
    T, H, K, E, SPLITS, s_split,
    s_ot, s_oh,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):
    """``out[t, :] = Σ_{j < K, row(t, j) kept} Σ_{s < SPLITS} y[s, row(t, j), :]`` summed in the
    order j = 0 .. K-1, then s (the planes of a split-K GEMM, ``s_split`` elements apart): fixed,
    so deterministic."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = t < T
    hmask = hh < H
    kept = tl.load(offsets_ptr + E)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
    for j in range(K):
        row = tl.load(slot_rows_ptr + t * K + j, mask=tmask, other=0)
        ok = tmask & (row < kept)
        for s in range(SPLITS):
            acc += tl.load(y_ptr + s * s_split + row[:, None] * H + hh[None, :], mask=ok[:, None] & hmask[None, :],
                           other=0.0).to(ACC)
    tl.store(out_ptr + t[:, None] * s_ot + hh[None, :] * s_oh, acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & hmask[None, :])


@triton.jit
def experts_dact_kernel(
    dout_ptr, d_ptr, b2_ptr, h_ptr, a_ptr, w_ptr, dh_ptr, dwp_ptr,
    tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
    H, I, K, NB_I,
    s_ot, s_oh, s_de, s_dh, s_di, s_wt, s_wj,
    alpha, limit,
    NUM_TILES, NUM_COLS,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Backward of both GEMMs' activation on (tile, column block ``col``) of program
    ``program_id(0)``, columns ``col·BLOCK_N`` of I: ``g = dout_rows · down_e``; writes ``dh``
    (rows × 2I) = (d gate, d up) of ``act(gate)·up`` for ``w·g`` in gate_up's row order (gate
    columns then up columns; ``INTERLEAVED``: alternating), and the row partial ``Σ_i g·a`` of the
    routing weight's gradient into ``dwp[row, col]`` (column block 0 adds ``dout_row · b2_e``)."""
    tile, col = _grouped_pid(tl.program_id(0), NUM_TILES, NUM_COLS, GROUP)
    e, e_ok, rows, rmask, tok, slots = _tile_rows(tile_experts_ptr, tile_starts_ptr, offsets_ptr, sorted_ptr,
                                                  tile, K, BLOCK_M)
    if e >= 0:
        n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        kk = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + tok * s_wt + (slots - tok * K) * s_wj, mask=rmask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        bias_dot = tl.zeros([BLOCK_M], dtype=ACC)
        d_base = d_ptr + e_ok * s_de
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + kk) < H
            go = tl.load(dout_ptr + tok[:, None] * s_ot + (k0 + kk)[None, :] * s_oh,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(d_base + (k0 + kk)[:, None] * s_dh + n[None, :] * s_di,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(go, b, acc, PRECISION, ACC, DOT_F32)
            if HAS_BIAS:
                if col == 0:
                    bb = tl.load(b2_ptr + e_ok * H + k0 + kk, mask=kmask, other=0.0).to(ACC)
                    bias_dot += tl.sum(go.to(ACC) * bb[None, :], axis=1)
        omask = rmask[:, None] & nmask[None, :]
        a = tl.load(a_ptr + rows[:, None] * I + n[None, :], mask=omask, other=0.0).to(ACC)
        tl.store(dwp_ptr + rows * NB_I + col, tl.sum(acc * a, axis=1) + bias_dot, mask=rmask)
        hg = tl.load(h_ptr + rows[:, None] * (2 * I) + n[None, :], mask=omask, other=0.0).to(ACC)
        hu = tl.load(h_ptr + rows[:, None] * (2 * I) + I + n[None, :], mask=omask, other=0.0).to(ACC)
        dg, du = _gated_backward(hg, hu, acc * w[:, None], ACT, alpha, limit)
        if INTERLEAVED:
            g_col, u_col = 2 * n, 2 * n + 1
        else:
            g_col, u_col = n, I + n
        tl.store(dh_ptr + rows[:, None] * (2 * I) + g_col[None, :], dg.to(dh_ptr.dtype.element_ty), mask=omask)
        tl.store(dh_ptr + rows[:, None] * (2 * I) + u_col[None, :], du.to(dh_ptr.dtype.element_ty), mask=omask)


@triton.jit
def experts_dweight_kernel(
    lhs_ptr, rhs_ptr, grad_ptr, dbias_ptr,
    offsets_ptr,
    M, N,
    s_ge, s_gm, s_gn,
    NUM_M, NUM_N,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Per-expert weight gradient ``grad_e = lhs_rowsᵀ · rhs_rows`` (M × N): expert
    ``program_id(1)``, output tile ``(pm, pn)`` of the ``NUM_M x NUM_N`` tiles from
    ``program_id(0)`` (grouped as :func:`_grouped_pid`: the programs running together are one
    expert's, sharing its rows in L2), reduced over the expert's rows, no atomics. ``lhs`` (rows ×
    M) and ``rhs`` (rows × N) are contiguous, in expert order (gathered operands come from
    :func:`experts_gather_kernel`: an index load in this loop measured ~40% slower).

    ``d gate_up_e``: lhs = dh (rows × 2I, gate_up's row order), rhs = x's rows. ``d down_e``:
    lhs = ``w·dout``'s rows (rows × H), rhs = a (rows × I). ``dbias[e, m]`` = the column sums of
    lhs (``HAS_BIAS``; written by the programs with ``pn == 0``)."""
    e = tl.program_id(1)
    pm, pn = _grouped_pid(tl.program_id(0), NUM_M, NUM_N, GROUP)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    bsum = tl.zeros([BLOCK_M], dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + rr
        rmask = rows < end
        lt = tl.load(lhs_ptr + rows[:, None] * M + m[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        rt = tl.load(rhs_ptr + rows[:, None] * N + n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(tl.trans(lt), rt, acc, PRECISION, ACC, DOT_F32)
        if HAS_BIAS:
            bsum += tl.sum(lt.to(ACC), axis=0)
    tl.store(grad_ptr + e * s_ge + m[:, None] * s_gm + n[None, :] * s_gn, acc.to(grad_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
    if HAS_BIAS:
        if pn == 0:
            tl.store(dbias_ptr + e * M + m, bsum.to(dbias_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def experts_gather_kernel(
    src_ptr, sorted_ptr, offsets_ptr, w_ptr, dst_ptr,
    H, K, E,
    s_st, s_sh, s_wt, s_wj,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SCALE: tl.constexpr, ACC: tl.constexpr,
):
    """``dst[r, :] = src[t, :]`` (``SCALE``: ``w[t, j] · src[t, :]``) for the kept rows ``r <
    offsets[E]`` in expert order, slot ``sorted_slots[r] = t·K + j`` — the backward's operands
    of the weight gradients (x's rows; the weighted output gradient's rows)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = r < tl.load(offsets_ptr + E)
    hmask = hh < H
    slots = tl.load(sorted_ptr + r, mask=rmask, other=0)
    tok = slots // K
    m2 = rmask[:, None] & hmask[None, :]
    v = tl.load(src_ptr + tok[:, None] * s_st + hh[None, :] * s_sh, mask=m2, other=0.0)
    if SCALE:
        w = tl.load(w_ptr + tok * s_wt + (slots - tok * K) * s_wj, mask=rmask, other=0.0).to(ACC)
        v = (v.to(ACC) * w[:, None]).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + r[:, None] * H + hh[None, :], v, mask=m2)


@triton.jit
def experts_dw_kernel(
    dwp_ptr, slot_rows_ptr, offsets_ptr, dw_ptr,
    T, K, E, NB_I,
    BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr,
):
    """``d w[t, j] = Σ_p dwp[row(t, j), p]`` for kept slots, 0 for dropped ones. The partials are
    added in order, ``p = 0, 1, ..``, as ``route_bwd_kernel`` adds them when it reads them itself
    (``PARTIALS``): the same bits either way."""
    s = tl.program_id(0) * BLOCK_T * K_PAD + tl.arange(0, BLOCK_T * K_PAD)
    t = s // K_PAD
    j = s % K_PAD
    smask = (t < T) & (j < K)
    row = tl.load(slot_rows_ptr + t * K + j, mask=smask, other=0)
    ok = smask & (row < tl.load(offsets_ptr + E))
    acc = tl.zeros([BLOCK_T * K_PAD], dtype=ACC)
    for p in range(NB_I):
        acc += tl.load(dwp_ptr + row * NB_I + p, mask=ok, other=0.0).to(ACC)
    tl.store(dw_ptr + t * K + j, acc.to(dw_ptr.dtype.element_ty), mask=smask)


EXPECTATIONS = {
    "experts_up_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "experts_rows_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "experts_dact_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "experts_dweight_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "experts_combine_kernel": {"local_memory": 0},
    "experts_gather_kernel": {"local_memory": 0},
    "experts_dw_kernel": {"local_memory": 0},
}
