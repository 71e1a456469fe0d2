"""Attention module / soft switch ``s = Σ_j softmax(z/τ)_j · x_j``, and the hard switch.

Order in this file: config resolver -> launchers and the CPU path -> torch.library ops ->
autograd.Functions -> public functionals. Kernels live in ``triton_kernels/attention.py``
(``mmkernels._triton.attention``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_same as _check_same
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._layout import INT32_LIMIT, max_offset, split_float
from mmkernels.ops._util import acc_dtype, graph_grads, math_dtype, next_pow2

# ----------------------------------------------------------------------------------------------
# Config resolver
# ----------------------------------------------------------------------------------------------

#: Most inputs J the fused kernels hold on chip; more run the torch composition (on any device).
MAX_J = 1024
#: Elements of the (J, D) tile a program holds per loop step.
TILE = 4096


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_j: int
    block_d: int
    num_warps: int


#: Column chunk for narrow inputs (D <= this); wider ones take the whole tile.
NARROW_D = 64


def resolve_config(J: int, D: int) -> AttentionConfig:
    """All of J on chip; D in chunks so that the tile holds at most TILE elements: the widest
    chunk for D > NARROW_D, else NARROW_D columns (two chunk widths per J: few configs to build)."""
    bj = next_pow2(J)
    bd = max(1, TILE // bj)
    if D <= NARROW_D:
        bd = min(bd, NARROW_D)
    return AttentionConfig(bj, bd, max(1, min(8, bj * bd // 512)))


def launch_configs():
    """Every config :func:`resolve_config` returns for J <= MAX_J (the compile tier's coverage)."""
    seen = []
    for pj in range(0, int(math.log2(MAX_J)) + 1):
        for pd in range(0, 13):
            cfg = resolve_config(1 << pj, 1 << pd)
            if cfg not in seen:
                seen.append(cfg)
    return seen


# ----------------------------------------------------------------------------------------------
# Launchers (Triton) and the composition (CPU path; also CUDA past MAX_J)
# ----------------------------------------------------------------------------------------------

def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    if mask is None:
        return like, 0, 0  # never read (HAS_MASK=False)
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1)


def triton_forward(z, x, mask, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:

    from mmkernels._triton import attention as K

    R, J, D = x.shape
    s = torch.empty((R, D), dtype=x.dtype, device=x.device)
    lse = torch.empty(R, dtype=math_dtype(x.dtype), device=x.device)
    cfg = resolve_config(J, D)
    m, sm_r, sm_j = _mask_args(mask, z)
    K.attention_fwd_kernel[(R,)](
        z_ptr=z, x_ptr=x, m_ptr=m, s_ptr=s, lse_ptr=lse, J=J, D=D,
        sz_r=z.stride(0), sz_j=z.stride(1), sx_r=x.stride(0), sx_j=x.stride(1), sx_d=x.stride(2),
        sm_r=sm_r, sm_j=sm_j, ss_r=s.stride(0), ss_d=s.stride(1), **split_float("inv_tau", 1.0 / tau),
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, HAS_MASK=mask is not None,
        ACC=acc_dtype(lse.dtype),
        USE_INT64=max(max_offset(x), max_offset(z), max_offset(s)) + TILE * 8 >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return s, lse


def triton_backward(z, x, mask, s, lse, ds, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:

    from mmkernels._triton import attention as K

    R, J, D = x.shape
    dz = torch.empty((R, J), dtype=z.dtype, device=z.device)
    dx = torch.empty((R, J, D), dtype=x.dtype, device=x.device)
    cfg = resolve_config(J, D)
    m, sm_r, sm_j = _mask_args(mask, z)
    K.attention_bwd_kernel[(R,)](
        z_ptr=z, x_ptr=x, m_ptr=m, s_ptr=s, lse_ptr=lse, ds_ptr=ds, dz_ptr=dz, dx_ptr=dx, J=J, D=D,
        sz_r=z.stride(0), sz_j=z.stride(1), sx_r=x.stride(0), sx_j=x.stride(1), sx_d=x.stride(2),
        sm_r=sm_r, sm_j=sm_j, ss_r=s.stride(0), ss_d=s.stride(1), sds_r=ds.stride(0), sds_d=ds.stride(1),
        sdz_r=dz.stride(0), sdz_j=dz.stride(1), sdx_r=dx.stride(0), sdx_j=dx.stride(1), sdx_d=dx.stride(2),
        **split_float("inv_tau", 1.0 / tau),
        BLOCK_J=cfg.block_j, BLOCK_D=cfg.block_d, HAS_MASK=mask is not None,
        ACC=acc_dtype(lse.dtype),
        USE_INT64=max(max_offset(x), max_offset(dx), max_offset(ds)) + TILE * 8 >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return dz, dx


def _torch_probs(z, mask, lse: Optional[torch.Tensor], tau: float):
    """(p, lse) in the math dtype: the softmax of the allowed logits, 0 in an empty row."""
    logits = z.to(math_dtype(z.dtype)) / tau
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - lse[:, None])
    return torch.where(torch.isneginf(lse)[:, None], 0.0, p), lse


def _torch_forward(z, x, mask, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    p, lse = _torch_probs(z, mask, None, tau)
    s = torch.bmm(p.unsqueeze(1), x.to(p.dtype)).squeeze(1)
    return s.to(x.dtype), lse


def _torch_backward(z, x, mask, s, lse, ds, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    p, _ = _torch_probs(z, mask, lse, tau)
    ds = ds.to(p.dtype)
    a = torch.bmm(x.to(p.dtype), ds.unsqueeze(2)).squeeze(2)       # x_j · ds
    b = (s.to(p.dtype) * ds).sum(dim=1, keepdim=True)               # s · ds
    dz = p * (a - b) / tau
    dx = p.unsqueeze(2) * ds.unsqueeze(1)
    return dz.to(z.dtype), dx.to(x.dtype)


def _fused(x: torch.Tensor) -> bool:
    return x.shape[1] <= MAX_J and _backend.resolve(x) is _backend.Impl.TRITON


def _cpp_attention(z: torch.Tensor, x: torch.Tensor):
    """``torch.ops.mmkernels_cpu`` when the C++ attention module (csrc/attention.cpp) is selected,
    built and takes these tensors — float32 / float64 CPU tensors, ``x`` contiguous (one pass
    over it each way) — else None: the torch composition."""
    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "attention_forward"):
        return None
    ok = x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
    return cpp if ok and z.dtype == x.dtype else None


def _cpu_forward(z, x, mask, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    cpp = _cpp_attention(z, x)
    if cpp is not None:
        return cpp.attention_forward(z, x, mask, tau)
    return _torch_forward(z, x, mask, tau)


def _cpu_backward(z, x, mask, s, lse, ds, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    cpp = _cpp_attention(z, x)
    if cpp is not None and s.is_contiguous() and ds.dtype == x.dtype:
        return cpp.attention_backward(z, x, mask, s, lse, ds, tau)
    return _torch_backward(z, x, mask, s, lse, ds, tau)


def _forward(z, x, mask, tau: float):
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        return _torch_forward(z, x, mask, tau)
    if _fused(x):
        return triton_forward(z, x, mask, tau)
    return _cpu_forward(z, x, mask, tau) if x.is_cpu else _torch_forward(z, x, mask, tau)


def _backward(z, x, mask, s, lse, ds, tau: float):
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        return _torch_backward(z, x, mask, s, lse, ds, tau)
    if _fused(x):
        return triton_backward(z, x, mask, s, lse, ds, tau)
    return (_cpu_backward if x.is_cpu else _torch_backward)(z, x, mask, s, lse, ds, tau)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::attention_fwd", mutates_args=())
def attention_fwd_op(z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                     tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s (R, D), lse (R,)) of the attention module on flattened rows."""
    return _forward(z, x, mask, tau)


@attention_fwd_op.register_fake
def _(z, x, mask, tau):
    R, J, D = x.shape
    return x.new_empty((R, D)), x.new_empty((R,), dtype=math_dtype(x.dtype))


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def attention_bwd_op(z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], s: torch.Tensor,
                     lse: torch.Tensor, ds: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dz (R, J), dx (R, J, D)) from ds, the saved output s and the row log-sum-exps."""
    return _backward(z, x, mask, s, lse, ds, tau)


@attention_bwd_op.register_fake
def _(z, x, mask, s, lse, ds, tau):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

class AttentionFunction(torch.autograd.Function):
    """Saves z, x, the output s and one log-sum-exp per row (never the probabilities). Under
    ``create_graph`` the backward differentiates :func:`_torch_forward` (torch ops) instead of
    running the kernels, so that its gradients have a graph (a double backward)."""

    @staticmethod
    def forward(ctx, z, x, mask, tau: float):
        direct = _backend.direct_call_ok(*(t for t in (z, x, mask) if t is not None))
        s, lse = _forward(z, x, mask, tau) if direct else attention_fwd_op(z, x, mask, tau)
        ctx.save_for_backward(z, x, mask, s, lse)
        ctx.tau = tau
        return s

    @staticmethod
    def backward(ctx, ds):
        z, x, mask, s, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            tau = ctx.tau
            dz, dx = graph_grads(lambda z_, x_: _torch_forward(z_, x_, mask, tau)[0], (z, x),
                                 ctx.needs_input_grad[:2], ds)
            return dz, dx, None, None
        if _backend.direct_call_ok(*(t for t in (z, x, mask, s, lse, ds) if t is not None)):
            dz, dx = _backward(z, x, mask, s, lse, ds, ctx.tau)
        else:
            dz, dx = attention_bwd_op(z, x, mask, s, lse, ds, ctx.tau)
        return dz, dx, None, None


def _hard_switch_dx(x: torch.Tensor, idx: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """The hard switch's dx (R, J, D): ``ds`` (R, D) at the chosen ``idx`` (R,), 0 elsewhere; one
    write in C++ on the CPU path (csrc/attention.cpp) when nothing traces the call and no graph is
    recorded, zeros then a scatter (differentiable in ``ds``) otherwise."""
    if (x.is_cpu and not torch.is_grad_enabled() and _backend.resolve(x) is _backend.Impl.CPU
            and _backend.direct_call_ok(x, idx, ds)):
        cpp = _cpp.ops()
        if cpp is not None and hasattr(cpp, "hard_switch_backward"):
            return cpp.hard_switch_backward(idx, ds, x.shape[1])
    dx = torch.zeros_like(x)
    return dx.scatter_(1, idx[:, None, None].expand(-1, 1, x.shape[2]), ds.unsqueeze(1))


class HardSwitchFunction(torch.autograd.Function):
    """Forward: x[..., argmax z, :]. Backward: the selected input gets ds, the others 0; z gets the
    soft switch's gradient at temperature τ when straight-through, else none. Under
    ``create_graph`` both as torch ops (the scatter; :func:`_torch_forward`'s gradient)."""

    @staticmethod
    def forward(ctx, z, x, straight_through: bool, tau: float):
        idx = z.argmax(dim=1)
        out = x.gather(1, idx[:, None, None].expand(-1, 1, x.shape[2])).squeeze(1)
        ctx.save_for_backward(z, x, idx)
        ctx.straight_through, ctx.tau = straight_through, tau
        return out

    @staticmethod
    def backward(ctx, ds):
        z, x, idx = ctx.saved_tensors
        dx = _hard_switch_dx(x, idx, ds.to(x.dtype))  # a scatter with its graph under create_graph
        dz = None
        if ctx.straight_through and ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # a double backward: the soft switch's gradient with its graph
                tau = ctx.tau
                (dz,) = graph_grads(lambda z_: _torch_forward(z_, x, None, tau)[0], (z,), (True,), ds)
            else:
                s_soft, lse = _forward(z, x, None, ctx.tau)
                dz, _ = _backward(z, x, None, s_soft, lse, ds, ctx.tau)
        return dz, dx, None, None


# ----------------------------------------------------------------------------------------------
# Public functionals
# ----------------------------------------------------------------------------------------------

def _rows(name_z: str, z: torch.Tensor, x: torch.Tensor):
    """Argument checks shared by the switches; (z as (R, J), x as (R, J, D), leading shape)."""
    _check_tensor(name_z, z)
    _check_tensor("x", x)
    if z.dtype not in _FLOATS or x.dtype not in _FLOATS:
        raise TypeError(f"{name_z} and x must be floating-point (float16, bfloat16, float32, float64), got "
                        f"{z.dtype} and {x.dtype}")
    _check_same((name_z, "x"), (z, x), "dtype")
    _check_same((name_z, "x"), (z, x), "device")
    if z.dim() < 1 or x.dim() != z.dim() + 1 or x.shape[:-1] != z.shape:
        raise ValueError(f"{name_z} must be (..., J) and x (..., J, D) with the same leading dims and J, got "
                         f"{name_z} {tuple(z.shape)} and x {tuple(x.shape)}")
    lead = tuple(z.shape[:-1])
    J, D = z.shape[-1], x.shape[-1]
    R = math.prod(lead)
    return z.reshape(R, J), x.reshape(R, J, D), lead


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or a ValueError naming it (the attention module's and the
    switches' argument check)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (1e-30 <= float(temperature) < math.inf):
        raise ValueError(f"temperature must be a positive finite float (>= 1e-30), got {temperature!r}")
    return float(temperature)


def attention_module(z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     temperature: float = 1.0) -> torch.Tensor:
    r"""Attention module / soft switch: ``s = Σ_j softmax(z/τ)_j · x_j``, one fused kernel each way.

    The probabilities are never written: the forward keeps one log-sum-exp per row, and the
    backward rebuilds them from ``z`` in the same pass that reads ``x`` once:
    ``dx_j = p_j · ds``, ``dz_j = p_j · (x_j·ds - s·ds) / τ`` (``s`` the saved output).

    Args:
        z: ``(..., J)`` scores, float16 / bfloat16 / float32 / float64; math in float32
            (float64 for float64).
        x: ``(..., J, D)`` the J inputs, same dtype, device and leading dims as ``z``. Leading dims
            that do not collapse to one stride are copied (``reshape``).
        mask: optional bool, broadcastable to ``z``'s shape: True where ``j`` may be chosen. A row
            with nothing allowed gives ``s = 0`` and zero gradients (not NaN).
        temperature: ``τ > 0``; the weights are ``softmax(z / τ)``.

    Returns:
        ``s``: ``(..., D)`` in ``x``'s dtype.

    On CUDA (and under Triton's interpreter) the fused kernels run for ``J <= 1024`` (MAX_J);
    past that a composition of torch ops computes the same. On the CPU path the C++ kernels
    (csrc/attention.cpp: float32 / float64 with ``x`` contiguous) run, else the composition.

    Example:
        >>> z, x = torch.randn(8, 4), torch.randn(8, 4, 16)
        >>> s = mmkernels.attention_module(z, x)          # (8, 16)
    """
    z2, x2, lead = _rows("z", z, x)
    tau = check_temperature(temperature)
    m2 = None
    if mask is not None:
        _check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.device != z.device:
            raise ValueError(f"mask must be on z's device {z.device}, got {mask.device}")
        try:
            m2 = mask.expand(z.shape).reshape(-1, z.shape[-1])
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to z's shape "
                             f"{tuple(z.shape)}") from None
    s = AttentionFunction.apply(z2, x2, m2, tau)
    return s.reshape(*lead, x.shape[-1])


#: The soft switch of the seeds is the attention module.
soft_switch = attention_module


def hard_switch(z: torch.Tensor, x: torch.Tensor, straight_through: bool = False,
                temperature: float = 1.0) -> torch.Tensor:
    r"""Hard switch: ``s = x[..., argmax_j z_j, :]`` (ties to the lowest j).

    Backward: only the selected input receives the gradient (``dx`` is ``ds`` there, 0 elsewhere).
    ``z`` gets no gradient unless ``straight_through=True``: then it gets the soft switch's
    (:func:`attention_module` at ``temperature``), the straight-through estimator.

    Args:
        z: ``(..., J)`` scores; x: ``(..., J, D)`` the inputs (same dtype, device, leading dims).
        straight_through: give ``z`` the soft switch's gradient.
        temperature: ``τ`` of that soft switch.

    Returns:
        ``(..., D)`` in ``x``'s dtype.
    """
    z2, x2, lead = _rows("z", z, x)
    tau = check_temperature(temperature)
    if z2.shape[1] == 0:
        raise ValueError("hard_switch needs at least one input (J >= 1)")
    s = HardSwitchFunction.apply(z2, x2, bool(straight_through), tau)
    return s.reshape(*lead, x.shape[-1])
