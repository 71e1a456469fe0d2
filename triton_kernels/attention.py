"""Attention module / soft switch kernels: ``s = Σ_j softmax(z / τ)_j · x_j`` over J inputs of width D.

One program per row ``r`` (the leading dims flattened): the row's ``J`` logits stay on chip
(``BLOCK_J >= J``) and ``x[r]`` (J, D) streams through in ``BLOCK_D`` column chunks.

Forward: ``p = softmax`` of the allowed logits (``mask``; a row with nothing allowed has p = 0 and
gives s = 0), ``s[d] = Σ_j p_j x[j, d]``; writes ``s`` and the row's ``lse = log Σ_j exp(z_j/τ)``
(-inf for an empty row), never the probabilities.

Backward (from ``ds``, the saved ``s`` and ``lse``; one pass over ``x``):
``p_j = exp(z_j/τ - lse)``, ``dx[j, d] = p_j · ds[d]``,
``dz_j = p_j · (x_j·ds - s·ds) / τ``.

Math in ``ACC`` (float32, or float64 for float64 inputs); ``USE_INT64`` for offsets past 2**31.
``1/τ`` arrives as two float32 scalars (``hi + lo``: Triton passes Python floats as float32).
"""
import triton
import triton.language as tl


@triton.jit
def _row_logits(z_ptr, m_ptr, J, sz_r, sz_j, sm_r, sm_j, inv_tau_hi, inv_tau_lo,
                BLOCK_J: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr):
    """This program's row ``r``, the lanes ``offs_j``, ``1/τ``, and the row's logits ``z/τ`` with
    -inf where not allowed, with the allowed mask."""
    inv_tau = tl.zeros([], ACC) + inv_tau_hi + inv_tau_lo
    r = tl.program_id(0)
    if USE_INT64:
        r = r.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    allowed = offs_j < J
    if HAS_MASK:
        allowed = allowed & (tl.load(m_ptr + r * sm_r + offs_j * sm_j, mask=offs_j < J, other=0) != 0)
    z = tl.load(z_ptr + r * sz_r + offs_j * sz_j, mask=offs_j < J, other=0.0).to(ACC)
    return r, offs_j, inv_tau, tl.where(allowed, z * inv_tau, float("-inf")), allowed


@triton.jit
def attention_fwd_kernel(
    z_ptr, x_ptr, m_ptr, s_ptr, lse_ptr,
    J, D,
    sz_r, sz_j, sx_r, sx_j, sx_d, sm_r, sm_j, ss_r, ss_d,
    inv_tau_hi, inv_tau_lo,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    r, offs_j, inv_tau, logits, allowed = _row_logits(z_ptr, m_ptr, J, sz_r, sz_j, sm_r, sm_j, inv_tau_hi,
                                                      inv_tau_lo, BLOCK_J, HAS_MASK, ACC, USE_INT64)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.max(logits, axis=0)
    e = tl.where(allowed, tl.exp(logits - m), 0.0)
    total = tl.sum(e, axis=0)
    p = e * tl.where(total > 0, 1.0 / total, 0.0)  # an empty row: p = 0, s = 0
    tl.store(lse_ptr + r, m + tl.log(total))       # -inf for an empty row
    x_row = x_ptr + r * sx_r + offs_j[:, None] * sx_j
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        xt = tl.load(x_row + cols[None, :] * sx_d, mask=(offs_j[:, None] < J) & (cols[None, :] < D),
                     other=0.0).to(ACC)
        s = tl.sum(p[:, None] * xt, axis=0)
        tl.store(s_ptr + r * ss_r + cols * ss_d, s.to(s_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def attention_bwd_kernel(
    z_ptr, x_ptr, m_ptr, s_ptr, lse_ptr, ds_ptr, dz_ptr, dx_ptr,
    J, D,
    sz_r, sz_j, sx_r, sx_j, sx_d, sm_r, sm_j, ss_r, ss_d, sds_r, sds_d,
    sdz_r, sdz_j, sdx_r, sdx_j, sdx_d,
    inv_tau_hi, inv_tau_lo,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    r, offs_j, inv_tau, logits, allowed = _row_logits(z_ptr, m_ptr, J, sz_r, sz_j, sm_r, sm_j, inv_tau_hi,
                                                      inv_tau_lo, BLOCK_J, HAS_MASK, ACC, USE_INT64)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + r).to(ACC)
    lse_b = tl.zeros([BLOCK_J], ACC) + lse
    p = tl.where(allowed & (lse_b > float("-inf")), tl.exp(logits - lse_b), 0.0)  # empty row: 0
    a = tl.zeros([BLOCK_J], ACC)  # x_j · ds
    b = tl.zeros([BLOCK_D], ACC)  # s · ds, per lane
    row_j = offs_j[:, None] < J
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        in_d = cols < D
        ds = tl.load(ds_ptr + r * sds_r + cols * sds_d, mask=in_d, other=0.0).to(ACC)
        s = tl.load(s_ptr + r * ss_r + cols * ss_d, mask=in_d, other=0.0).to(ACC)
        tile = row_j & in_d[None, :]
        xt = tl.load(x_ptr + r * sx_r + offs_j[:, None] * sx_j + cols[None, :] * sx_d, mask=tile,
                     other=0.0).to(ACC)
        a += tl.sum(xt * ds[None, :], axis=1)
        b += s * ds
        dx = p[:, None] * ds[None, :]
        tl.store(dx_ptr + r * sdx_r + offs_j[:, None] * sdx_j + cols[None, :] * sdx_d,
                 dx.to(dx_ptr.dtype.element_ty), mask=tile)
    dz = p * (a - tl.sum(b, axis=0)) * inv_tau
    tl.store(dz_ptr + r * sdz_r + offs_j * sdz_j, dz.to(dz_ptr.dtype.element_ty), mask=offs_j < J)


#: What the compile tier requires of each kernel (mmkernels.testing.compile_tier).
EXPECTATIONS = {
    "attention_fwd_kernel": {"local_memory": 0},
    "attention_bwd_kernel": {"local_memory": 0},
}
