"""Sigma-pi / bilinear kernels: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·W[j,h,i] (+ bias[j])``.

Shapes: ``z`` (N, B), ``x`` (N, C), ``W`` (D, B, C), ``y`` (N, D) -- ``torch.nn.functional.bilinear``.
The op is a GEMM over ``K = B·C`` whose left operand is the outer product ``A[n, (h,i)] = z[n,h]·x[n,i]``;
no kernel here ever writes ``A`` (N×B·C) or the ``G = dy·Wᵀ`` tile (N×B·C) to memory.

Index conventions shared by the kernels:

* the flattened index ``k = h·C + i`` (row-major over (h, i), as ``W.reshape(D, B*C)``). Where the
  kernels walk ``K`` in flat blocks (forward, dW), ``h = k // C`` and ``i = k - h·C`` are computed
  per block (a [BLOCK_K] vector, shared by every row of the tile), so no lane is wasted whatever
  ``C`` is. ``W_FLAT`` (the launcher's check ``stride_h == C·stride_i``, true for a contiguous W)
  addresses W by ``k·stride_i`` instead, which keeps the W tile's addresses visibly contiguous for
  vector loads;
* the outer-product tile is regenerated in registers from two gathers, ``z[n, h(k)]`` and
  ``x[n, i(k)]`` (L1-resident: each z / x element is re-read by the lanes that share it), multiplied
  in fp32 and rounded once to the dot's operand dtype;
* every tensor comes with its strides (no copies for transposed / sliced / permuted inputs);
  ``USE_INT64`` switches the index arithmetic to int64 for tensors that can pass 2**31 elements;
* ``DOT_F32`` feeds ``tl.dot`` fp32 operands (the outer product unrounded): the launchers set it
  for bf16 under Triton's interpreter, whose bf16 dot is wrong (never on a GPU: it would leave
  the tensor cores);
* accumulation is in ``ACC`` (fp32; fp64 for float64 tensors); ``PRECISION`` is ``tl.dot``'s
  ``input_precision`` ("ieee" or "tf32"; it only matters for fp32 operands); outputs are stored in their pointer's dtype.

Kernels:

* ``bilinear_fwd_kernel``: program = (n-block, d-block) tile of y; k-loop over flat K blocks;
  A tile [BLOCK_N, BLOCK_K] built in registers and fed to ``tl.dot`` against the W tile
  [BLOCK_K, BLOCK_D]; bias added in the epilogue.
* ``bilinear_bwd_dzdx_kernel``: program = one n-block, deterministic, no atomics. Loops: i-block
  (outer) -> h-block -> d-block (the GEMM's reduction). For each (h-block, i-block) pair the tile
  ``G[n, (h,i)] = Σ_j dy[n,j]·W[j,h,i]`` ([BLOCK_N, BLOCK_H·BLOCK_I], fp32, tl.dot) is reduced
  at once: ``dz[n,h] += Σ_i G·x[n,i]`` and ``dx[n,i] += Σ_h G·z[n,h]``. The program owns its rows
  of dz and dx exclusively. dx of the current i-block accumulates in registers over every h-block
  and is stored once. dz of an h-block is complete after the last i-block: with a single i-block
  (``C <= BLOCK_I``, the common case the resolver aims for) it is stored once, directly; with
  several (``MULTI_I``), the partial sums are carried in an fp32 buffer ``dzacc`` (the fp32 dz itself, or a
  workspace) that only this program reads and writes, in a fixed order (a barrier orders the
  re-read after the previous i-block's writes), and the last i-block writes dz in its dtype.
* ``bilinear_bwd_dw_kernel``: program = (flat k-block, d-block) tile of ``dWᵀ``: a GEMM with
  reduction over N, ``dW[j,k] = Σ_n A[n,k]·dy[n,j]`` computed as ``Aᵀ[k,n] @ dy[n,j]`` with the
  outer-product tile Aᵀ [BLOCK_K, BLOCK_N] regenerated in registers per n-block (the register
  operand of the dot) and dy the shared-memory one. dW is written flat (``k·stride_k``), as the
  launcher allocates it contiguous.
"""
import triton
import triton.language as tl


@triton.jit
def _hi(k, C, USE_INT64: tl.constexpr):
    """Flat k -> (h, i) for ``k = h·C + i``. The division stays int32 (``B·C < 2**31`` always: the
    launcher checks it): int64 division is a SASS subroutine with a stack frame."""
    h = k // C
    i = k - h * C
    if USE_INT64:
        h = h.to(tl.int64)
        i = i.to(tl.int64)
    return h, i


@triton.jit
def _block(start, ar, size, USE_INT64: tl.constexpr):
    """Offsets ``start + ar`` (int64 when asked) and their mask ``< size``."""
    offs = start + ar
    if USE_INT64:
        offs = offs.to(tl.int64)
    return offs, offs < size


@triton.jit
def bilinear_fwd_kernel(
    z_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    N, B, C, D,
    s_zn, s_zh,
    s_xn, s_xi,
    s_wj, s_wh, s_wi,
    s_b,
    s_yn, s_yj,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_FLAT: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """y[n-block, d-block] = A[n-block, :] @ W_flat[:, d-block] (+ bias), A = z⊗x in registers."""
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_n = pid // num_d
    pid_d = pid % num_d
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    mask_n = offs_n < N
    mask_d = offs_d < D
    K = B * C
    z_rows = z_ptr + offs_n[:, None] * s_zn
    x_rows = x_ptr + offs_n[:, None] * s_xn
    w_cols = w_ptr + offs_d[None, :] * s_wj
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        h, i = _hi(k, C, USE_INT64)
        mask_a = mask_n[:, None] & mask_k[None, :]
        zt = tl.load(z_rows + h[None, :] * s_zh, mask=mask_a, other=0.0).to(ACC)
        xt = tl.load(x_rows + i[None, :] * s_xi, mask=mask_a, other=0.0).to(ACC)
        a = zt * xt
        if not DOT_F32:
            a = a.to(w_ptr.dtype.element_ty)
        if W_FLAT:
            if USE_INT64:
                k = k.to(tl.int64)
            w_ptrs = w_cols + k[:, None] * s_wi
        else:
            w_ptrs = w_cols + h[:, None] * s_wh + i[:, None] * s_wi
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if DOT_F32:
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_b, mask=mask_d, other=0.0).to(ACC)
        acc += bias[None, :]
    tl.store(y_ptr + offs_n[:, None] * s_yn + offs_d[None, :] * s_yj,
             acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def bilinear_bwd_dzdx_kernel(
    z_ptr, x_ptr, w_ptr, dy_ptr, dz_ptr, dzacc_ptr, dx_ptr,
    N, B, C, D,
    s_zn, s_zh,
    s_xn, s_xi,
    s_wj, s_wh, s_wi,
    s_dyn, s_dyj,
    s_dzn, s_dzh,
    s_an, s_ah,
    s_dxn, s_dxi,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DX: tl.constexpr, MULTI_I: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """dz and dx of one n-block from the tile G = dy @ W_flat, reduced against x and z in registers."""
    BLOCK_K: tl.constexpr = BLOCK_H * BLOCK_I
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    kh = kk // BLOCK_I  # position of the flat tile column inside the (h-block, i-block) pair
    ki = kk % BLOCK_I
    ar_h = tl.arange(0, BLOCK_H)
    ar_i = tl.arange(0, BLOCK_I)
    ar_j = tl.arange(0, BLOCK_J)
    if MULTI_I:
        num_ib = tl.cdiv(C, BLOCK_I)
    else:  # C <= BLOCK_I: one i-block, dz stored once (no carried partial sums)
        num_ib = 1
    dy_rows = dy_ptr + offs_n[:, None] * s_dyn
    for ib in range(0, num_ib):
        i0 = ib * BLOCK_I
        offs_i = i0 + ar_i
        mask_i = offs_i < C
        xt = tl.load(x_ptr + offs_n[:, None] * s_xn + offs_i[None, :] * s_xi,
                     mask=mask_n[:, None] & mask_i[None, :], other=0.0).to(ACC)
        if NEED_DZ and MULTI_I:
            if ib > 0:
                tl.debug_barrier()  # the previous i-block's dzacc writes, before they are re-read
        dx_acc = tl.zeros([BLOCK_N, BLOCK_I], dtype=ACC)
        for h0 in range(0, B, BLOCK_H):
            # W tile [BLOCK_J, BLOCK_K]: column kk is (h0 + kh, i0 + ki)
            hw = h0 + kh
            iw = i0 + ki
            if USE_INT64:
                hw = hw.to(tl.int64)
                iw = iw.to(tl.int64)
            mask_k = (hw < B) & (iw < C)
            w_cols = w_ptr + hw[None, :] * s_wh + iw[None, :] * s_wi
            g = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
            for j0 in range(0, D, BLOCK_J):
                offs_j, mask_j = _block(j0, ar_j, D, USE_INT64)
                dyt = tl.load(dy_rows + offs_j[None, :] * s_dyj,
                              mask=mask_n[:, None] & mask_j[None, :], other=0.0)
                wt = tl.load(w_cols + offs_j[:, None] * s_wj,
                             mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                if DOT_F32:
                    g = tl.dot(dyt.to(tl.float32), wt.to(tl.float32), g, input_precision=PRECISION, out_dtype=ACC)
                else:
                    g = tl.dot(dyt.to(w_ptr.dtype.element_ty), wt, g, input_precision=PRECISION, out_dtype=ACC)
            g3 = tl.reshape(g, [BLOCK_N, BLOCK_H, BLOCK_I])
            offs_h = h0 + ar_h
            mask_h = offs_h < B
            if NEED_DX:
                zt = tl.load(z_ptr + offs_n[:, None] * s_zn + offs_h[None, :] * s_zh,
                             mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(ACC)
                dx_acc += tl.sum(g3 * zt[:, :, None], axis=1)
            if NEED_DZ:
                dz_part = tl.sum(g3 * xt[:, None, :], axis=2)
                mask_zh = mask_n[:, None] & mask_h[None, :]
                dz_ptrs = dz_ptr + offs_n[:, None] * s_dzn + offs_h[None, :] * s_dzh
                if MULTI_I:
                    acc_ptrs = dzacc_ptr + offs_n[:, None] * s_an + offs_h[None, :] * s_ah
                    if ib > 0:
                        dz_part += tl.load(acc_ptrs, mask=mask_zh, other=0.0)
                    if ib == num_ib - 1:
                        tl.store(dz_ptrs, dz_part.to(dz_ptr.dtype.element_ty), mask=mask_zh)
                    else:
                        tl.store(acc_ptrs, dz_part, mask=mask_zh)
                else:
                    tl.store(dz_ptrs, dz_part.to(dz_ptr.dtype.element_ty), mask=mask_zh)
        if NEED_DX:
            tl.store(dx_ptr + offs_n[:, None] * s_dxn + offs_i[None, :] * s_dxi,
                     dx_acc.to(dx_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_i[None, :])


@triton.jit
def bilinear_bwd_dw_kernel(
    z_ptr, x_ptr, dy_ptr, dw_ptr,
    N, B, C, D,
    s_zn, s_zh,
    s_xn, s_xi,
    s_dyn, s_dyj,
    s_dwj, s_dwk,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, USE_INT64: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """dWᵀ[k-block, d-block] = Aᵀ[k-block, :] @ dy[:, d-block], Aᵀ = (z⊗x)ᵀ regenerated per n-block."""
    pid = tl.program_id(0)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_k = pid // num_d
    pid_d = pid % num_d
    K = B * C
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if USE_INT64:
        offs_d = offs_d.to(tl.int64)
    mask_k = k < K
    mask_d = offs_d < D
    h, i = _hi(k, C, USE_INT64)
    z_cols = z_ptr + h[:, None] * s_zh
    x_cols = x_ptr + i[:, None] * s_xi
    dy_cols = dy_ptr + offs_d[None, :] * s_dyj
    ar_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n, mask_n = _block(n0, ar_n, N, USE_INT64)
        mask_a = mask_k[:, None] & mask_n[None, :]
        zt = tl.load(z_cols + offs_n[None, :] * s_zn, mask=mask_a, other=0.0).to(ACC)
        xt = tl.load(x_cols + offs_n[None, :] * s_xn, mask=mask_a, other=0.0).to(ACC)
        dyt = tl.load(dy_cols + offs_n[:, None] * s_dyn,
                      mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        a_t = zt * xt
        if DOT_F32:
            dyt = dyt.to(tl.float32)
        else:
            a_t = a_t.to(dy_ptr.dtype.element_ty)
        acc = tl.dot(a_t, dyt, acc, input_precision=PRECISION, out_dtype=ACC)
    if USE_INT64:
        k = k.to(tl.int64)
    tl.store(dw_ptr + k[:, None] * s_dwk + offs_d[None, :] * s_dwj,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])


#: What the compile tier checks for each kernel at every config it can launch with
#: (mmkernels/testing/compile_tier.py): no spills to local memory anywhere, and wgmma (HGMMA) on
#: sm_90 for the tensor-core builds. The compile tier's bilinear jobs lift the ``mma`` requirement
#: for the fp32 builds with ``input_precision="ieee"`` (torch's default: ``allow_tf32`` off), which
#: run on FMA units by design.
EXPECTATIONS = {
    "bilinear_fwd_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "bilinear_bwd_dzdx_kernel": {"local_memory": 0, "mma": "HGMMA"},
    "bilinear_bwd_dw_kernel": {"local_memory": 0, "mma": "HGMMA"},
}
