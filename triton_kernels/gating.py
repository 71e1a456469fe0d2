"""Gated fusion kernels: the gate blend ``out = g·a + (1 - g)·b``, ``g = σ(pre)``.

``pre`` is the gate's pre-activation ``[a, b] · Wᵀ + c`` (a GEMM the caller's BLAS computes); these
kernels fuse the rest. The tensors are seen as ``(R, D)`` rows with their own row and column
strides; one program covers ``BLOCK`` consecutive elements of the row-major ``(R, D)`` index space.

Forward: read pre, a, b; write out (4 tensor passes).
Backward: read dout, pre, a, b; write ``da = dout·g``, ``db = dout·(1 - g)`` (the direct parts)
and ``dpre = dout·(a - b)·g·(1 - g)`` (7 passes). Math in ``ACC`` (float32, or float64).
"""
import triton
import triton.language as tl


@triton.jit
def _offsets(pid, R, D, BLOCK: tl.constexpr, USE_INT64: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if USE_INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs // D, offs % D, offs < R * D


@triton.jit
def gated_blend_fwd_kernel(
    pre_ptr, a_ptr, b_ptr, out_ptr,
    R, D,
    sp_r, sp_d, sa_r, sa_d, sb_r, sb_d, so_r, so_d,
    BLOCK: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    r, c, mask = _offsets(tl.program_id(0), R, D, BLOCK, USE_INT64)
    pre = tl.load(pre_ptr + r * sp_r + c * sp_d, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + r * sa_r + c * sa_d, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + r * sb_r + c * sb_d, mask=mask, other=0.0).to(ACC)
    g = 1.0 / (1.0 + tl.exp(-pre))
    tl.store(out_ptr + r * so_r + c * so_d, (b + g * (a - b)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_blend_bwd_kernel(
    dout_ptr, pre_ptr, a_ptr, b_ptr, da_ptr, db_ptr, dpre_ptr,
    R, D,
    sdo_r, sdo_d, sp_r, sp_d, sa_r, sa_d, sb_r, sb_d,
    BLOCK: tl.constexpr, ACC: tl.constexpr, USE_INT64: tl.constexpr,
):
    """da, db and dpre are written contiguous (R, D)."""
    r, c, mask = _offsets(tl.program_id(0), R, D, BLOCK, USE_INT64)
    dout = tl.load(dout_ptr + r * sdo_r + c * sdo_d, mask=mask, other=0.0).to(ACC)
    pre = tl.load(pre_ptr + r * sp_r + c * sp_d, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + r * sa_r + c * sa_d, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + r * sb_r + c * sb_d, mask=mask, other=0.0).to(ACC)
    g = 1.0 / (1.0 + tl.exp(-pre))
    da = dout * g
    out = r * D + c
    tl.store(da_ptr + out, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + out, (dout - da).to(db_ptr.dtype.element_ty), mask=mask)
    tl.store(dpre_ptr + out, (da * (a - b) * (1.0 - g)).to(dpre_ptr.dtype.element_ty), mask=mask)


#: What the compile tier requires of each kernel (mmkernels.testing.compile_tier).
EXPECTATIONS = {
    "gated_blend_fwd_kernel": {"local_memory": 0},
    "gated_blend_bwd_kernel": {"local_memory": 0},
}
