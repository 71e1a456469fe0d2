"""Sigma-pi / bilinear kernels: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·W[j,h,i] (+ bias[j])``.

Shapes: ``z`` (N, B), ``x`` (N, C), ``W`` (D, B, C), ``y`` (N, D) -- ``torch.nn.functional.bilinear``.
The op is a GEMM over ``K = B·C`` whose left operand is the outer product ``A[n, (h,i)] = z[n,h]·x[n,i]``;
no kernel here writes ``A`` or ``G = dy·Wᵀ`` (N × B·C) to memory. Every kernel is a GEMM in shape:
its innermost loop is one tile load a step (or two) and one ``tl.dot``, the outer-product operand
built in registers from a contiguous tile of ``x`` scaled by a column of ``z``:

* ``bilinear_fwd_kernel`` — program = (n-block, d-block; h-split ``program_id(1)``). Loops: i-block
  (outer; the ``x[n-block, i-block]`` tile loaded once, one vector load) -> h (inner, the pipelined
  main loop): ``a = x_tile · z[n-block, h]`` (a column of z scales the tile's rows, in registers,
  rounded once to the dot's dtype) and ``acc += a @ W[d-block, h, i-block]ᵀ``. With one h-split the
  epilogue adds the bias and stores y; with several (small N: enough programs for a wave), each
  writes its partial sums (ACC) to plane ``split`` of a workspace and ``bilinear_sum_planes_kernel``
  adds them in order (deterministic) with the bias.
* ``bilinear_bwd_dzdx_kernel`` — program = (n-block, i-block; j-chunk; h-split). The
  ``dy[n-block, j-chunk]`` tile is loaded once and is the dot's left operand for every h; for each h
  of its split (the pipelined main loop): ``G = dy_tile @ W[j-chunk, h, i-block]`` (one dot over the
  whole chunk), then ``dx[n-block, i-block] += z[n-block, h] · G`` (rows scaled) and
  ``dz[n-block, h] = Σ_i G · x[n-block, i-block]`` (one column). Both are linear in G, so the
  j-chunks (d wider than one tile) and the h-splits (small N: enough programs for a wave) are
  independent partial sums: dz has one per (j-chunk, i-block), dx one per (j-chunk, h-split), each
  in its plane (or straight in the output when there is one), summed in order by
  ``bilinear_sum_planes_kernel``. No atomics; every element has one writer.
* ``bilinear_bwd_dw_kernel`` — program = (h, i-block, d-block; n-split): ``dW[d-block, h, i-block]
  = Σ_n dy[n, d-block]ᵀ @ (x[n, i-block] · z[n, h])``: the main loop over whole n-blocks streams
  the dy and x tiles (contiguous rows, pointer increments, loop-invariant masks), scales the x
  tile's rows by ``z[n-block, h]`` and feeds the dot (dyᵀ the left operand, a transposed view of
  its shared-memory tile); a partial last n-block is one masked step after the loop. Several
  n-splits (a reduction over many rows with few output tiles) write planes summed in order.
* ``bilinear_sum_planes_kernel`` — ``out[r, c] = Σ_s planes[s, r, c] (+ bias[c])``, s in order.

``TRIANGULAR`` (the quadratic layer, ``z = x``, ``B = C``): W is packed, ``W[j, p(h, i)]`` for
``i >= h`` with ``p(h, i) = h·C - h(h-1)/2 + (i - h)`` (``torch.triu_indices`` order); entries below
the diagonal are zero and never stored: the forward and dz/dx mask them and skip i-blocks wholly
below ``h``; dW writes only ``i >= h``.

Conventions: every tensor comes with its strides (no copies for transposed / sliced / permuted
inputs); ``USE_INT64`` switches index arithmetic to int64 for tensors that can pass 2**31 elements;
``DOT_F32`` feeds ``tl.dot`` fp32 operands (the launchers set it for bf16 under Triton's
interpreter, whose bf16 dot is wrong; never on a GPU); accumulation in ``ACC`` (fp32; fp64 for
float64); ``PRECISION`` is ``tl.dot``'s ``input_precision`` ("tf32" or "ieee": fp32 operands only);
outputs are stored in their pointer's dtype.
"""
import triton
import triton.language as tl


@triton.jit
def _block(start, ar, size, USE_INT64: tl.constexpr):
    """Offsets ``start + ar`` (int64 when asked) and their mask ``< size``."""
    offs = start + ar
    if USE_INT64:
        offs = offs.to(tl.int64)
    return offs, offs < size


@triton.jit
def _idx(v, USE_INT64: tl.constexpr):
    """A loop index or block number in int64 when asked (then every offset made from it is)."""
    if USE_INT64:
        v = v + tl.zeros([], tl.int64)  # (loop indices are Python ints under the interpreter)
    return v


@triton.jit
def _w_row(h, C, s_wh, s_wi, TRIANGULAR: tl.constexpr):
    """Offset of W's (h, i = 0) element: ``h·s_wh``, or in the packed upper triangle
    ``p(h, 0)·s_wi`` with ``p(h, 0) = h·C - h(h-1)/2 - h`` (then add ``i·s_wi``, valid for
    ``i >= h``)."""
    if TRIANGULAR:
        return (h * C - (h * (h - 1)) // 2 - h) * s_wi
    return h * s_wh


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr):
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def bilinear_fwd_kernel(
    z_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    N, B, C, D, H_SPLIT,
    s_zn, s_zh, s_xn, s_xi, s_wj, s_wh, s_wi, s_b, s_yn, s_yj, s_ys,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
    HAS_BIAS: tl.constexpr, TRIANGULAR: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """y[n-block, d-block] (or its partial over this program's h-split, in plane ``program_id(1)``
    of y, ``s_ys`` apart) = Σ_h (x[n-block, :] · z[n-block, h]) @ W[d-block, h, :]ᵀ (+ bias)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_d = tl.cdiv(D, BLOCK_D)
    offs_n, mask_n = _block((pid // num_d) * BLOCK_N, tl.arange(0, BLOCK_N), N, USE_INT64)
    offs_d, mask_d = _block((pid % num_d) * BLOCK_D, tl.arange(0, BLOCK_D), D, USE_INT64)
    ar_i = tl.arange(0, BLOCK_I)
    split = _idx(split, USE_INT64)
    h_lo = split * H_SPLIT
    h_hi = tl.minimum(B, h_lo + H_SPLIT)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for i0 in range(0, C, BLOCK_I):
        offs_i, mask_i = _block(i0, ar_i, C, USE_INT64)
        xt = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_i[None, :] * s_xi,
                     mask=mask_n[:, None] & mask_i[None, :], other=0.0).to(ACC)
        w_cols = w_ptr + offs_d[None, :] * s_wj + offs_i[:, None] * s_wi
        h_end = h_hi
        if TRIANGULAR:  # rows h past this i-block's last column have no entry in it
            h_end = tl.minimum(h_hi, i0 + BLOCK_I)
        for h in range(h_lo, h_end):
            zc = tl.load(z_ptr + offs_n * s_zn + h * s_zh, mask=mask_n, other=0.0).to(ACC)
            a = xt * zc[:, None]
            if not DOT_F32:
                a = a.to(w_ptr.dtype.element_ty)
            wmask = mask_i[:, None] & mask_d[None, :]
            if TRIANGULAR:
                wmask = wmask & (offs_i[:, None] >= h)
            wt = tl.load(w_cols + _w_row(h, C, s_wh, s_wi, TRIANGULAR), mask=wmask, other=0.0)
            acc = _dot(a, wt, acc, PRECISION, DOT_F32, ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d * s_b, mask=mask_d, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + split * s_ys + offs_n[:, None] * s_yn + offs_d[None, :] * s_yj,
             acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _dzdx_step(h, dyt, xt, w_tile, z_col, dz_col, dx_acc, mask_n, mask_i, mask_j, offs_i, C, s_wh, s_wi, s_zh, s_dzh,
               BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, EVEN: tl.constexpr, NEED_DZ: tl.constexpr,
               NEED_DX: tl.constexpr, TRIANGULAR: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
               ACC: tl.constexpr):
    """One h of dz/dx: G = dy_tile @ W[j-chunk, h, i-block]; dz[:, h] stored; dx_acc += z[:, h]·G."""
    if EVEN:
        wt = tl.load(w_tile + _w_row(h, C, s_wh, s_wi, TRIANGULAR))
    else:
        wmask_i = mask_i
        if TRIANGULAR:
            wmask_i = wmask_i & (offs_i >= h)
        wt = tl.load(w_tile + _w_row(h, C, s_wh, s_wi, TRIANGULAR), mask=mask_j[:, None] & wmask_i[None, :], other=0.0)
    g = _dot(dyt, wt, tl.zeros([BLOCK_N, BLOCK_I], dtype=ACC), PRECISION, DOT_F32, ACC)
    if NEED_DZ:
        tl.store(dz_col + h * s_dzh, tl.sum(g * xt.to(ACC), axis=1).to(dz_col.dtype.element_ty), mask=mask_n)
    if NEED_DX:
        dx_acc += g * tl.load(z_col + h * s_zh, mask=mask_n, other=0.0).to(ACC)[:, None]
    return dx_acc


@triton.jit
def bilinear_bwd_dzdx_kernel(
    z_ptr, x_ptr, w_ptr, dy_ptr, dz_ptr, dx_ptr,
    N, B, C, D, H_SPLIT,
    s_zn, s_zh, s_xn, s_xi, s_wj, s_wh, s_wi, s_dyn, s_dyj,
    s_dzn, s_dzh, s_dzs, s_dxn, s_dxi, s_dxs,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, EVEN: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DX: tl.constexpr, TRIANGULAR: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """Program (n-block, i-block; j-chunk ``program_id(1)``; h-split ``program_id(2)``). The
    ``dy[n-block, j-chunk]`` tile is loaded once; for each h of the split (the main loop):
    ``G = dy_tile @ W[j-chunk, h, i-block]``, ``dx[n-block, i-block] += z[n-block, h]·G`` and
    ``dz[n-block, h] = Σ_i G·x[n-block, i-block]``. dz's partial of this (j-chunk, i-block) goes to
    plane ``j-chunk · i-blocks + i-block`` (``s_dzs`` apart), dx's of this (j-chunk, h-split) to
    plane ``j-chunk · h-splits + h-split`` (``s_dxs`` apart); a plane stride of 0: the output.
    ``EVEN``: C and D are multiples of BLOCK_I and BLOCK_J (not triangular): W tiles load unmasked."""
    pid = tl.program_id(0)
    jc = _idx(tl.program_id(1), USE_INT64)
    split = _idx(tl.program_id(2), USE_INT64)
    num_ib = tl.cdiv(C, BLOCK_I)
    ib = _idx(pid % num_ib, USE_INT64)
    offs_n, mask_n = _block((pid // num_ib) * BLOCK_N, tl.arange(0, BLOCK_N), N, USE_INT64)
    offs_i, mask_i = _block(ib * BLOCK_I, tl.arange(0, BLOCK_I), C, USE_INT64)
    offs_j, mask_j = _block(jc * BLOCK_J, tl.arange(0, BLOCK_J), D, USE_INT64)
    h_lo = split * H_SPLIT
    h_hi = tl.minimum(B, h_lo + H_SPLIT)
    if TRIANGULAR:  # rows h past this i-block's last column have no entry in it
        h_hi = tl.minimum(h_hi, ib * BLOCK_I + BLOCK_I)
    dyt = tl.load(dy_ptr + offs_n[:, None] * s_dyn + offs_j[None, :] * s_dyj,
                  mask=mask_n[:, None] & mask_j[None, :], other=0.0)
    xt = dyt  # (unused without dz)
    if NEED_DZ:  # (kept in its storage dtype: registers for the two accumulators)
        xt = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_i[None, :] * s_xi,
                     mask=mask_n[:, None] & mask_i[None, :], other=0.0)
    w_tile = w_ptr + offs_j[:, None] * s_wj + offs_i[None, :] * s_wi
    z_col = z_ptr + offs_n * s_zn
    dz_col = dz_ptr + (jc * num_ib + ib) * s_dzs + offs_n * s_dzn
    dx_acc = tl.zeros([BLOCK_N, BLOCK_I], dtype=ACC)
    h_pairs = h_lo + (h_hi - h_lo) // 2 * 2
    for h in range(h_lo, h_pairs, 2):  # two h a step (the loop's own overhead amortised)
        dx_acc = _dzdx_step(h, dyt, xt, w_tile, z_col, dz_col, dx_acc, mask_n, mask_i, mask_j, offs_i, C, s_wh, s_wi,
                            s_zh, s_dzh, BLOCK_N, BLOCK_I, EVEN, NEED_DZ, NEED_DX, TRIANGULAR, PRECISION, DOT_F32, ACC)
        dx_acc = _dzdx_step(h + 1, dyt, xt, w_tile, z_col, dz_col, dx_acc, mask_n, mask_i, mask_j, offs_i, C, s_wh,
                            s_wi, s_zh, s_dzh, BLOCK_N, BLOCK_I, EVEN, NEED_DZ, NEED_DX, TRIANGULAR, PRECISION,
                            DOT_F32, ACC)
    if h_pairs < h_hi:
        dx_acc = _dzdx_step(h_pairs, dyt, xt, w_tile, z_col, dz_col, dx_acc, mask_n, mask_i, mask_j, offs_i, C, s_wh,
                            s_wi, s_zh, s_dzh, BLOCK_N, BLOCK_I, EVEN, NEED_DZ, NEED_DX, TRIANGULAR, PRECISION,
                            DOT_F32, ACC)
    if NEED_DX:
        plane = jc * tl.num_programs(2) + split
        tl.store(dx_ptr + plane * s_dxs + offs_n[:, None] * s_dxn + offs_i[None, :] * s_dxi,
                 dx_acc.to(dx_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_i[None, :])


@triton.jit
def _dw_step(dy_ptrs, x_ptrs, z_ptrs, acc, mask_d, mask_i, mask_n, MASK_N: tl.constexpr,
             PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr):
    """One n-block of dW: ``acc += dy_tileᵀ @ (x_tile · z_column)`` (rows of the x tile scaled by
    z, rounded once to the dot's dtype); ``MASK_N``: the last, partial block (else only the
    loop-invariant column masks)."""
    if MASK_N:
        dyt = tl.load(dy_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=mask_n[:, None] & mask_i[None, :], other=0.0)
        zc = tl.load(z_ptrs, mask=mask_n, other=0.0)
    else:
        dyt = tl.load(dy_ptrs, mask=mask_d[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=mask_i[None, :], other=0.0)
        zc = tl.load(z_ptrs)
    b = xt.to(ACC) * zc.to(ACC)[:, None]
    if not DOT_F32:
        b = b.to(dy_ptrs.dtype.element_ty)
    return _dot(tl.trans(dyt), b, acc, PRECISION, DOT_F32, ACC)


@triton.jit
def bilinear_bwd_dw_kernel(
    z_ptr, x_ptr, dy_ptr, dw_ptr,
    N, B, C, D, N_SPLIT,
    s_zn, s_zh, s_xn, s_xi, s_dyn, s_dyj, s_dwj, s_dwh, s_dwi, s_dws,
    BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, TRIANGULAR: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """dW[d-block, h, i-block] = Σ_n dy[n, d-block]ᵀ @ (x[n, i-block] · z[n, h]) over this
    program's n-split (plane ``program_id(1)``, ``s_dws`` apart; 0: dW itself); program 0's index
    is ``(h · i-blocks + i-block) · d-blocks + d-block``. The main loop walks whole n-blocks with
    pointer increments and loop-invariant masks; a partial last block is one masked step after it."""
    pid = tl.program_id(0)
    split = _idx(tl.program_id(1), USE_INT64)
    num_d = tl.cdiv(D, BLOCK_D)
    num_ib = tl.cdiv(C, BLOCK_I)
    h = _idx(pid // (num_ib * num_d), USE_INT64)
    ib = (pid // num_d) % num_ib
    offs_i, mask_i = _block(ib * BLOCK_I, tl.arange(0, BLOCK_I), C, USE_INT64)
    offs_d, mask_d = _block((pid % num_d) * BLOCK_D, tl.arange(0, BLOCK_D), D, USE_INT64)
    if TRIANGULAR:
        mask_i = mask_i & (offs_i >= h)
    n_lo = split * N_SPLIT
    n_hi = tl.minimum(N, n_lo + N_SPLIT)
    if TRIANGULAR:  # an i-block wholly below the diagonal has nothing to write
        if ib * BLOCK_I + BLOCK_I <= h:
            n_hi = n_lo
    offs_n, mask_n = _block(n_lo, tl.arange(0, BLOCK_N), n_hi, USE_INT64)
    dy_ptrs = dy_ptr + offs_n[:, None] * s_dyn + offs_d[None, :] * s_dyj
    x_ptrs = x_ptr + offs_n[:, None] * s_xn + offs_i[None, :] * s_xi
    z_ptrs = z_ptr + offs_n * s_zn + h * s_zh
    step_dy = _idx(s_dyn, USE_INT64) * BLOCK_N
    step_x = _idx(s_xn, USE_INT64) * BLOCK_N
    step_z = _idx(s_zn, USE_INT64) * BLOCK_N
    n_full = n_lo + (n_hi - n_lo) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=ACC)
    for _ in range(n_lo, n_full, BLOCK_N):
        acc = _dw_step(dy_ptrs, x_ptrs, z_ptrs, acc, mask_d, mask_i, mask_n, False, PRECISION, DOT_F32, ACC)
        dy_ptrs += step_dy
        x_ptrs += step_x
        z_ptrs += step_z
    if n_full < n_hi:
        mask_n = n_full + tl.arange(0, BLOCK_N) < n_hi
        acc = _dw_step(dy_ptrs, x_ptrs, z_ptrs, acc, mask_d, mask_i, mask_n, True, PRECISION, DOT_F32, ACC)
    # (triangular: an i-block wholly below the diagonal has every lane masked: nothing is written)
    tl.store(dw_ptr + split * s_dws + _w_row(h, C, s_dwh, s_dwi, TRIANGULAR) + offs_d[:, None] * s_dwj
             + offs_i[None, :] * s_dwi, acc.to(dw_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_i[None, :])


@triton.jit
def bilinear_sum_planes_kernel(
    planes_ptr, bias_ptr, out_ptr,
    R, K, S,
    s_pr, s_pk, s_ps, s_b, s_or, s_ok,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """``out[r, k] = Σ_{s < S} planes[s, r, k] (+ bias[k])``, the planes summed in order s = 0 ..
    S-1 (deterministic): the second pass of the split kernels."""
    offs_r, mask_r = _block(tl.program_id(0) * BLOCK_R, tl.arange(0, BLOCK_R), R, USE_INT64)
    offs_k, mask_k = _block(tl.program_id(1) * BLOCK_K, tl.arange(0, BLOCK_K), K, USE_INT64)
    mask = mask_r[:, None] & mask_k[None, :]
    ptrs = planes_ptr + offs_r[:, None] * s_pr + offs_k[None, :] * s_pk
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=ACC)
    for s in range(0, S):
        acc += tl.load(ptrs + _idx(s, USE_INT64) * s_ps, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_k * s_b, mask=mask_k, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + offs_r[:, None] * s_or + offs_k[None, :] * s_ok, acc.to(out_ptr.dtype.element_ty), mask=mask)


#: What the compile tier checks for each kernel at every config it can launch with
#: (mmkernels/testing/compile_tier.py): no spills to local memory anywhere, and wgmma (HGMMA) on
#: sm_90 for the tensor-core builds. The compile tier's bilinear jobs lift the ``mma`` requirement
#: for the fp32 builds with ``input_precision="ieee"`` (torch's default: ``allow_tf32`` off) and
#: float64, which run on FMA units by design.
EXPECTATIONS = {
    "bilinear_fwd_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "bilinear_bwd_dzdx_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "bilinear_bwd_dw_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "bilinear_sum_planes_kernel": {"local_memory": 0},
}
