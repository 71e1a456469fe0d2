"""Gated fusion network (gated multimodal units; docs/modules.md): ``g = σ([a, b]·Wᵀ + c)``, ``out = g·a + (1 - g)·b``.

The gate's linear layer runs as two GEMMs on the caller's BLAS (``a·W_aᵀ + b·W_bᵀ``: the
concatenation ``[a, b]`` is never built); the blend is one fused kernel forward and one backward.

Order in this file: config -> launchers and the CPU path -> torch.library ops ->
autograd.Function -> public functional. Kernels live in ``triton_kernels/gating.py``
(``mmkernels._triton.gating``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_same as _check_same
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._layout import INT32_LIMIT, max_offset
from mmkernels.ops._util import acc_dtype, cdiv, math_dtype

#: Elements per program of the blend kernels (memory bound: 8 per thread at 8 warps).
BLOCK = 2048
NUM_WARPS = 8


def launch_configs():
    """The one config of the blend kernels (the compile tier's coverage)."""
    return [(BLOCK, NUM_WARPS)]


def _int64(*ts: torch.Tensor) -> bool:
    return max(max_offset(t) for t in ts) + BLOCK * 2 >= INT32_LIMIT or ts[0].numel() + BLOCK >= INT32_LIMIT


def triton_forward(pre, a, b) -> torch.Tensor:
    from mmkernels._triton import gating as K

    R, D = a.shape
    out = torch.empty((R, D), dtype=a.dtype, device=a.device)
    K.gated_blend_fwd_kernel[(cdiv(R * D, BLOCK),)](
        pre_ptr=pre, a_ptr=a, b_ptr=b, out_ptr=out, R=R, D=D,
        sp_r=pre.stride(0), sp_d=pre.stride(1), sa_r=a.stride(0), sa_d=a.stride(1),
        sb_r=b.stride(0), sb_d=b.stride(1), so_r=out.stride(0), so_d=out.stride(1),
        BLOCK=BLOCK, ACC=acc_dtype(a.dtype), USE_INT64=_int64(a, b, pre, out), num_warps=NUM_WARPS,
    )
    return out


def triton_backward(dout, pre, a, b) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mmkernels._triton import gating as K

    R, D = a.shape
    da = torch.empty((R, D), dtype=a.dtype, device=a.device)
    db = torch.empty((R, D), dtype=b.dtype, device=b.device)
    dpre = torch.empty((R, D), dtype=pre.dtype, device=pre.device)
    K.gated_blend_bwd_kernel[(cdiv(R * D, BLOCK),)](
        dout_ptr=dout, pre_ptr=pre, a_ptr=a, b_ptr=b, da_ptr=da, db_ptr=db, dpre_ptr=dpre, R=R, D=D,
        sdo_r=dout.stride(0), sdo_d=dout.stride(1), sp_r=pre.stride(0), sp_d=pre.stride(1),
        sa_r=a.stride(0), sa_d=a.stride(1), sb_r=b.stride(0), sb_d=b.stride(1),
        BLOCK=BLOCK, ACC=acc_dtype(a.dtype), USE_INT64=_int64(a, b, pre, dout, da), num_warps=NUM_WARPS,
    )
    return da, db, dpre


def _math(t: torch.Tensor) -> torch.Tensor:
    return t.to(math_dtype(t.dtype))


def _cpp_blend(*ts: torch.Tensor):
    """``torch.ops.mmkernels_cpu`` when the C++ blend (csrc/gating.cpp) is selected, built and
    takes these tensors: contiguous float32 / float64 / bfloat16 of one dtype and shape (one pass
    forward, one backward; bfloat16 in float math); None for the torch composition."""
    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "gated_blend_forward"):
        return None
    ok = all(t.is_contiguous() and t.dtype == ts[0].dtype and t.shape == ts[0].shape for t in ts)
    return cpp if ok and ts[0].dtype in (torch.float32, torch.float64, torch.bfloat16) else None


def _cpu_forward(pre, a, b) -> torch.Tensor:
    cpp = _cpp_blend(pre, a, b)
    if cpp is not None:
        return cpp.gated_blend_forward(pre, a, b)
    return torch.lerp(_math(b), _math(a), torch.sigmoid(_math(pre))).to(a.dtype)


def _cpu_backward(dout, pre, a, b):
    cpp = _cpp_blend(dout, pre, a, b)
    if cpp is not None:
        return cpp.gated_blend_backward(dout, pre, a, b)
    g = torch.sigmoid(_math(pre))
    dout = _math(dout)
    da = dout * g
    dpre = da * (_math(a) - _math(b)) * (1 - g)
    return da.to(a.dtype), (dout - da).to(b.dtype), dpre.to(pre.dtype)


def _forward(pre, a, b):
    if a.numel() and _backend.resolve(a) is _backend.Impl.TRITON:
        return triton_forward(pre, a, b)
    return _cpu_forward(pre, a, b)


def _backward(dout, pre, a, b):
    if a.numel() and _backend.resolve(a) is _backend.Impl.TRITON:
        return triton_backward(dout, pre, a, b)
    return _cpu_backward(dout, pre, a, b)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::gated_blend_fwd", mutates_args=())
def gated_blend_fwd_op(pre: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """σ(pre)·a + (1 - σ(pre))·b on (R, D) rows."""
    return _forward(pre, a, b)


@gated_blend_fwd_op.register_fake
def _(pre, a, b):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("mmkernels::gated_blend_bwd", mutates_args=())
def gated_blend_bwd_op(dout: torch.Tensor, pre: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, dpre) of the blend."""
    return _backward(dout, pre, a, b)


@gated_blend_bwd_op.register_fake
def _(dout, pre, a, b):
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(b.shape, dtype=b.dtype, device=b.device),
            torch.empty(pre.shape, dtype=pre.dtype, device=pre.device))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

def _differentiable_backward(dout, pre, a, b):
    """(dpre, da, db) of the blend in torch ops (math dtype, cast back): what a double backward
    (``create_graph``) differentiates; the kernels' backward has no derivative of its own."""
    g = torch.sigmoid(_math(pre))
    dm = _math(dout)
    da = dm * g
    dpre = da * (_math(a) - _math(b)) * (1 - g)
    return dpre.to(pre.dtype), da.to(a.dtype), (dm - da).to(b.dtype)


class GatedBlendFunction(torch.autograd.Function):
    """The blend on (R, D) rows; saves pre, a, b (the gate is recomputed, never stored). Under
    ``create_graph`` the backward runs torch ops, so that a double backward sees its graph."""

    @staticmethod
    def forward(ctx, pre, a, b):
        out = _forward(pre, a, b) if _backend.direct_call_ok(pre, a, b) else gated_blend_fwd_op(pre, a, b)
        ctx.save_for_backward(pre, a, b)
        return out

    @staticmethod
    def backward(ctx, dout):
        pre, a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: the gradient as torch ops, differentiable
            return _differentiable_backward(dout, pre, a, b)
        if _backend.direct_call_ok(dout, pre, a, b):
            da, db, dpre = _backward(dout, pre, a, b)
        else:
            da, db, dpre = gated_blend_bwd_op(dout, pre, a, b)
        return dpre, da, db


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------

def gated_fusion(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Gated fusion of two pathways (docs/modules.md): ``g = σ([a, b]·Wᵀ + c)``, ``out = g·a + (1-g)·b``.

    The gate's pre-activation is ``a·W[:, :D]ᵀ + b·W[:, D:]ᵀ + c`` (two GEMMs, no concatenation);
    the blend is one fused kernel each way: forward reads ``pre, a, b`` and writes ``out``;
    backward reads ``dout, pre, a, b`` and writes ``da, db`` (direct parts) and ``dpre``, from which
    the GEMMs' backward adds the gate's share to ``da``, ``db`` and gives ``dW``, ``dc``.

    Args:
        a, b: ``(..., D)`` the two pathways, float16 / bfloat16 / float32 / float64 (same dtype,
            device and shape); math in float32 (float64 for float64). Leading dims that do not
            collapse to one stride are copied (``reshape``).
        weight: ``(D, 2D)``, the gate's linear layer on ``[a, b]`` (``nn.Linear(2D, D).weight``).
        bias: optional ``(D,)``.

    Returns:
        ``(..., D)`` in ``a``'s dtype.

    Example:
        >>> a, b = torch.randn(8, 32), torch.randn(8, 32)
        >>> out = mmkernels.gated_fusion(a, b, torch.randn(32, 64) / 8)   # (8, 32)
    """
    for name, t in (("a", a), ("b", b), ("weight", weight)):
        _check_tensor(name, t)
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be floating-point (float16, bfloat16, float32, float64), got {t.dtype}")
    names, tensors = ["a", "b", "weight"], [a, b, weight]
    if bias is not None:
        _check_tensor("bias", bias)
        names.append("bias")
        tensors.append(bias)
    _check_same(names, tensors, "dtype")
    _check_same(names, tensors, "device")
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"a and b must have the same shape (..., D), got {tuple(a.shape)} and {tuple(b.shape)}")
    D = a.shape[-1]
    if weight.shape != (D, 2 * D):
        raise ValueError(f"weight must be (D, 2D) = ({D}, {2 * D}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be (D,) = ({D},), got {tuple(bias.shape)}")
    lead = a.shape[:-1]
    a2, b2 = a.reshape(-1, D), b.reshape(-1, D)
    pre = torch.nn.functional.linear(a2, weight[:, :D], bias).addmm_(b2, weight[:, D:].t())  # no [a, b] copy
    return GatedBlendFunction.apply(pre, a2, b2).reshape(*lead, D)
