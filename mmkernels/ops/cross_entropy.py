"""Fused cross-entropy: logits -> loss without the probabilities, the gradient in one pass.

Order in this file: config resolver -> launchers and the CPU path -> torch.library ops ->
autograd.Function -> public functional. Kernels live in ``triton_kernels/cross_entropy.py``
(``mmkernels._triton.cross_entropy``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from mmkernels import _backend
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_scalar, check_softcap, class_weights
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._layout import INT32_LIMIT, max_offset, split_float
from mmkernels.ops._util import acc_dtype, math_dtype, next_pow2

REDUCTIONS = ("none", "mean", "sum")

# ----------------------------------------------------------------------------------------------
# Config resolver
# ----------------------------------------------------------------------------------------------

#: Largest chunk of a row one loop step holds on chip.
MAX_BLOCK_C = 4096
#: Rows per step of the CPU path: at most this many elements of float temporaries at a time.
CPU_CHUNK_ELEMS = 1 << 20


@dataclasses.dataclass(frozen=True)
class CrossEntropyConfig:
    block_c: int
    num_warps: int


def resolve_config(C: int, f64: bool = False) -> CrossEntropyConfig:
    """One program per row; the row in chunks of ``block_c`` (the whole row when it fits; half
    of MAX_BLOCK_C for float64, whose accumulators take twice the registers)."""
    block = min(MAX_BLOCK_C // 2 if f64 else MAX_BLOCK_C, next_pow2(C))
    return CrossEntropyConfig(block, max(1, min(16, block // 256)))


def launch_configs():
    """Every config :func:`resolve_config` can return (the compile tier's coverage)."""
    seen = []
    for p in range(0, 15):
        for f64 in (False, True):
            cfg = resolve_config(1 << p, f64)
            if cfg not in seen:
                seen.append(cfg)
    return seen


# ----------------------------------------------------------------------------------------------
# The row loss's terms
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossTerms:
    """The scalar options of one row's loss (see ``triton_kernels/cross_entropy.py`` for the math):
    ``eps`` label smoothing, ``z_loss`` the scale of ``lse²``, ``softcap`` the cap of
    ``cap·tanh(u/cap)`` (0: none). Class weights travel as a tensor beside it."""
    ignore_index: int = -100
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0


def mean_divisor(target: torch.Tensor, terms: LossTerms, weight: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """The mean reduction's divisor, as ``F.cross_entropy``: the number of rows not ignored, or the
    sum of their targets' class weights; 0-dim, on the device (no host read: 0 gives NaN)."""
    valid = target != terms.ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    return torch.where(valid, weight.to(dtype)[torch.where(valid, target, 0)], 0.0).sum()


def weight_sum(weight: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """``Σ_c w_c`` as a 1-element tensor on the device (the backward's label-smoothing term)."""
    return None if weight is None else weight.to(dtype).sum().reshape(1)


# ----------------------------------------------------------------------------------------------
# Launchers (Triton) and the CPU path
# ----------------------------------------------------------------------------------------------

def _scalars(terms: LossTerms) -> dict:
    return {"ignore_index": terms.ignore_index, **split_float("eps", terms.eps),
            **split_float("zs", terms.z_loss), **split_float("cap", terms.softcap)}


def triton_forward(x, target, terms: LossTerms, weight=None, want_target_logp: bool = False):
    """(loss, lse, target log-probability or None), each (N,) in the math dtype."""
    from mmkernels._triton import cross_entropy as K

    N, C = x.shape
    acc = math_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    lse = torch.empty(N, dtype=acc, device=x.device)
    tlp = torch.empty(N, dtype=acc, device=x.device) if want_target_logp else None
    cfg = resolve_config(C, acc == torch.float64)
    wsum = weight_sum(weight, acc) if terms.eps > 0 else None
    K.cross_entropy_fwd_kernel[(N,)](
        x_ptr=x, t_ptr=target, w_ptr=weight if weight is not None else lse,
        wsum_ptr=wsum if wsum is not None else lse, loss_ptr=loss, lse_ptr=lse,
        tlp_ptr=tlp if tlp is not None else lse,
        C=C, sx_n=x.stride(0), sx_c=x.stride(1), st=target.stride(0),
        sw=weight.stride(0) if weight is not None else 0, **_scalars(terms),
        BLOCK_C=cfg.block_c, SMOOTH=terms.eps > 0, TARGET=terms.eps < 1, HAS_WEIGHT=weight is not None,
        Z_LOSS=terms.z_loss != 0, SOFTCAP=terms.softcap != 0, TARGET_LOGP=want_target_logp,
        ACC=acc_dtype(acc),
        USE_INT64=max_offset(x) + cfg.block_c * abs(x.stride(1)) >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return loss, lse, tlp


def triton_backward(x, target, lse, g, terms: LossTerms, weight, dx: torch.Tensor) -> torch.Tensor:
    """``dx`` (may be ``x``) = ``g`` times d loss / d x, row by row."""
    from mmkernels._triton import cross_entropy as K

    N, C = x.shape
    cfg = resolve_config(C, lse.dtype == torch.float64)
    wsum = weight_sum(weight, lse.dtype)
    K.cross_entropy_bwd_kernel[(N,)](
        x_ptr=x, t_ptr=target, w_ptr=weight if weight is not None else lse,
        wsum_ptr=wsum if wsum is not None else lse, lse_ptr=lse, g_ptr=g, dx_ptr=dx,
        C=C, sx_n=x.stride(0), sx_c=x.stride(1), st=target.stride(0),
        sw=weight.stride(0) if weight is not None else 0, sg=g.stride(0),
        sdx_n=dx.stride(0), sdx_c=dx.stride(1), **_scalars(terms),
        BLOCK_C=cfg.block_c, HAS_WEIGHT=weight is not None, Z_LOSS=terms.z_loss != 0,
        SOFTCAP=terms.softcap != 0, ACC=acc_dtype(lse.dtype),
        USE_INT64=max(max_offset(x) + cfg.block_c * abs(x.stride(1)),
                      max_offset(dx) + cfg.block_c * abs(dx.stride(1))) >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return dx


def _chunks(N: int, C: int):
    rows = max(1, CPU_CHUNK_ELEMS // max(C, 1))
    for r0 in range(0, N, rows):
        yield r0, min(N, r0 + rows)


def _capped(u: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap·tanh(u/cap)`` in place in ``u`` (a temporary of the math dtype), or ``u``."""
    return u.div_(cap).tanh_().mul_(cap) if cap else u


def row_loss(lse, z_t, zw, target, terms: LossTerms, weight, C: int) -> torch.Tensor:
    """Each row's loss from its statistics: ``lse``, the target's (capped) logit ``z_t`` and, with
    label smoothing, ``zw = Σ_c w_c z_c`` (``Σ_c z_c`` without class weights); 0 in ignored rows."""
    eps = terms.eps
    valid = target != terms.ignore_index
    loss = torch.zeros_like(lse)
    if eps < 1:
        w_t = 1.0 if weight is None else weight.to(lse.dtype)[torch.where(valid, target, 0)]
        loss += (1.0 - eps) * (lse - z_t) * w_t
    if eps > 0:
        w_all = C if weight is None else weight.to(lse.dtype).sum()
        loss += (eps / C) * (w_all * lse - zw)
    if terms.z_loss:
        loss += terms.z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def _cpu_forward(x, target, terms: LossTerms, weight=None, want_target_logp: bool = False):
    """Row chunks of at most CPU_CHUNK_ELEMS elements: no full-size temporary."""
    N, C = x.shape
    acc = math_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc)
    lse = torch.empty(N, dtype=acc)
    tlp = torch.empty(N, dtype=acc) if want_target_logp else None
    valid = target != terms.ignore_index
    safe = torch.where(valid, target, 0).long()
    w = None if weight is None else weight.to(acc)
    for r0, r1 in _chunks(N, C):
        z = _capped(x[r0:r1].to(acc, copy=terms.softcap != 0), terms.softcap)
        lse_c = torch.logsumexp(z, dim=1)
        lse[r0:r1] = lse_c
        z_t = z.gather(1, safe[r0:r1, None]).squeeze(1)
        zw = None
        if terms.eps > 0:
            zw = z.sum(1) if w is None else z @ w
        loss[r0:r1] = row_loss(lse_c, z_t, zw, target[r0:r1], terms, w, C)
        if tlp is not None:
            tlp[r0:r1] = torch.where(valid[r0:r1], z_t - lse_c, 0.0)
    return loss, lse, tlp


def _cpu_backward(x, target, lse, g, terms: LossTerms, weight, dx: torch.Tensor) -> torch.Tensor:
    """dx chunk by chunk, computed in place in ``dx``'s rows when they hold the math dtype (else
    through one chunk-sized temporary); ``dx`` may be ``x`` itself."""
    N, C = x.shape
    acc = lse.dtype
    eps, cap = terms.eps, terms.softcap
    valid = target != terms.ignore_index
    safe = torch.where(valid, target, 0).long()
    w = None if weight is None else weight.to(acc)
    w_t = torch.ones((), dtype=acc) if w is None else w[safe]
    # d loss / d z_c = a·p_c - (1-ε)·w_t·[c == t] - (ε/C)·w_c, a = (1-ε)·w_t + (ε/C)·W + 2·zs·lse
    a = (1.0 - eps) * w_t + (eps / C) * (C if w is None else w.sum()) + 2.0 * terms.z_loss * lse
    scale = torch.where(valid, g.to(acc).expand(N), 0.0)
    scaled_a = scale * a
    target_term = -(1.0 - eps) * w_t * scale
    for r0, r1 in _chunks(N, C):
        out = dx[r0:r1]
        work = out if out.dtype == acc else torch.empty((r1 - r0, C), dtype=acc)
        chain = None
        if cap:
            z = _capped(x[r0:r1].to(acc, copy=True), cap)
            chain = torch.div(z, cap).square_().neg_().add_(1.0)   # d z / d u = 1 - (z/cap)²
        else:
            z = x[r0:r1].to(acc)
        torch.sub(z, lse[r0:r1, None], out=work)
        work.exp_().mul_(scaled_a[r0:r1, None])
        if eps > 0 and w is None:
            work.sub_(scale[r0:r1, None] * (eps / C))
        elif eps > 0:
            work.addcmul_(scale[r0:r1, None], w[None, :], value=-eps / C)
        if eps < 1:
            work.scatter_add_(1, safe[r0:r1, None], target_term[r0:r1, None])
        if chain is not None:
            work.mul_(chain)
        work.masked_fill_(~valid[r0:r1, None], 0.0)  # ignored rows: exact zeros, whatever the logits
        if work is not out:
            out.copy_(work)
    return dx


def check_targets_on_host(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Raise IndexError for a CPU target outside ``[0, C)`` that is not ``ignore_index`` (on CUDA
    the kernels' device assert does)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"target[{i}] = {int(target[i])} is out of range [0, {C}) and is not "
                         f"ignore_index={ignore_index}")


def row_forward(x, target, terms: LossTerms, weight=None, want_target_logp: bool = False):
    """Per-row (loss, lse, target log-probability or None) of ``(N, C)`` logits, on the backend
    of ``x``'s device (math dtype; the caller has checked the arguments)."""
    if x.shape[0] == 0:
        empty = torch.empty(0, dtype=math_dtype(x.dtype), device=x.device)
        return empty, empty.clone(), empty.clone() if want_target_logp else None
    if x.device.type == "cpu":
        check_targets_on_host(target, x.shape[1], terms.ignore_index)
    if _backend.resolve(x) is _backend.Impl.TRITON:
        return triton_forward(x, target, terms, weight, want_target_logp)
    return _cpu_forward(x, target, terms, weight, want_target_logp)


def row_backward(x, target, lse, g, terms: LossTerms, weight, dx: torch.Tensor) -> torch.Tensor:
    """``dx`` (may be ``x``'s own storage) = ``g[n]`` · d loss_n / d x[n], on ``x``'s backend."""
    if x.shape[0] == 0:
        return dx
    if _backend.resolve(x) is _backend.Impl.TRITON:
        return triton_backward(x, target, lse, g, terms, weight, dx)
    return _cpu_backward(x, target, lse, g, terms, weight, dx)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd_op(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                         eps: float, z_loss: float, softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row log-sum-exp), float32 (float64 for float64 logits)."""
    loss, lse, _ = row_forward(x, target, LossTerms(ignore_index, eps, z_loss, softcap), weight)
    return loss, lse


@cross_entropy_fwd_op.register_fake
def _(x, target, weight, ignore_index, eps, z_loss, softcap):
    acc = math_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@torch.library.custom_op("mmkernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd_op(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], lse: torch.Tensor,
                         g: torch.Tensor, ignore_index: int, eps: float, z_loss: float,
                         softcap: float) -> torch.Tensor:
    """d logits for the per-row incoming gradient ``g`` ((N,) or a broadcast 0-stride view)."""
    return row_backward(x, target, lse, g, LossTerms(ignore_index, eps, z_loss, softcap), weight, torch.empty_like(x))


@cross_entropy_bwd_op.register_fake
def _(x, target, weight, lse, g, ignore_index, eps, z_loss, softcap):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

def _row_grad(grad: torch.Tensor, reduction: str, count: Optional[torch.Tensor], N: int) -> torch.Tensor:
    """The incoming gradient of each row's loss as an (N,) view (stride 0 for the reductions)."""
    if reduction == "none":
        return grad
    g = grad.to(count.dtype) / count if reduction == "mean" else grad
    return g.reshape(1).expand(N)


class CrossEntropyFunction(torch.autograd.Function):
    """Saves the logits, targets and the row log-sum-exps (N floats); the backward is one kernel
    (read the logits, write d logits — in their own storage with ``inplace_backward``)."""

    @staticmethod
    def forward(ctx, x, target, weight, terms: LossTerms, reduction: str, inplace: bool):
        if _backend.direct_call_ok(*(t for t in (x, target, weight) if t is not None)):
            loss, lse, _ = row_forward(x, target, terms, weight)
        else:
            loss, lse = cross_entropy_fwd_op(x, target, weight, *dataclasses.astuple(terms))
        count = None
        if reduction == "mean":
            count = mean_divisor(target, terms, weight, loss.dtype)  # no host read: 0 rows give NaN
            out = loss.sum() / count
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        ctx.save_for_backward(x, target, weight, lse, count)
        ctx.args = (terms, reduction, inplace)
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable  # no torch-ops twin: a second derivative raises where the incoming gradient has a graph
    def backward(ctx, grad):
        x, target, weight, lse, count = ctx.saved_tensors
        terms, reduction, inplace = ctx.args
        g = _row_grad(grad, reduction, count, x.shape[0])
        if _backend.direct_call_ok(*(t for t in (x, target, weight, lse, g) if t is not None)):
            dx = row_backward(x, target, lse, g, terms, weight, x if inplace else torch.empty_like(x))
            if inplace:
                torch.autograd.graph.increment_version(x)  # a saved copy of the logits is now stale
        else:  # traced (torch.compile): the functional op, a new tensor even with inplace_backward
            dx = cross_entropy_bwd_op(x, target, weight, lse, g, *dataclasses.astuple(terms))
        return dx, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------

def cross_entropy(input: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss_scale: float = 0.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    r"""Cross-entropy of logits and class indices, like ``F.cross_entropy``, without the
    probabilities: ``loss_n = lse_n - (1-ε)·x[n, t_n] - (ε/C)·Σ_c x[n, c]`` with
    ``lse_n = log Σ_c exp x[n, c]`` and ``ε = label_smoothing``; rows with ``t_n == ignore_index``
    count as 0 and are left out of the mean. With class weights ``w`` the terms are weighted as
    ``F.cross_entropy`` weighs them (``(1-ε)·w_t·(lse - x_t) + (ε/C)·Σ_c w_c·(lse - x_c)``, the
    mean divided by ``Σ_n w_{t_n}``); ``z_loss_scale`` adds ``zs·lse_n²``; ``softcap`` replaces
    the logits by ``cap·tanh(x / cap)`` first.

    The forward reads the logits once and keeps one log-sum-exp per row; the backward reads the
    logits once and writes ``d x = g·(softmax(x) - (1-ε)·onehot(t) - ε/C)`` in one pass. On CUDA
    these are two Triton kernels; on CPU, torch ops over row chunks of at most ~1M elements (no
    full-size temporary besides the gradient itself).

    Args:
        input: ``(N, C)`` or ``(C,)`` logits, float16 / bfloat16 / float32 / float64, any strides;
            math in float32 (float64 for float64). For ``(N, C, d1, ...)`` logits move the class
            dim last and flatten: ``input.movedim(1, -1).reshape(-1, C)``.
        target: ``(N,)`` (or 0-dim for 1-D input) integer class indices in ``[0, C)`` or
            ``ignore_index``. Out-of-range targets raise ``IndexError`` on CPU and fail a device
            assert on CUDA (as torch).
        weight: optional ``(C,)`` class weights (any float dtype; not differentiated).
        ignore_index: target value whose rows are skipped (loss 0, gradient 0, not counted).
        reduction: ``"mean"`` (over the rows not ignored; NaN when every row is ignored, as
            torch), ``"sum"`` or ``"none"`` (``(N,)``).
        label_smoothing: ``ε`` in ``[0, 1]``.
        z_loss_scale: ``zs >= 0``; softcap: ``cap > 0`` or None (see above).
        inplace_backward: write the gradient into ``input``'s storage instead of a new tensor,
            saving a logits-sized allocation. ``input`` then holds the gradient after the
            backward; autograd's version counter is bumped, so any other op that saved the
            logits for its backward raises instead of reading them. ``input`` must not be a
            leaf that requires grad (its ``.grad`` would alias it). Under ``torch.compile`` the
            gradient is a new tensor.

    Returns:
        The loss in ``input``'s dtype: 0-dim for ``"mean"`` / ``"sum"``, ``(N,)`` for ``"none"``.

    Example:
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> loss = mmkernels.cross_entropy(logits, torch.tensor([1, 0, 9, -100]))
        >>> loss.backward()          # logits.grad: (4, 10), row 3 all zeros
    """
    _check_tensor("input", input)
    _check_tensor("target", target)
    if input.dtype not in _FLOATS:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype} (class probabilities "
                        f"are not supported: use F.cross_entropy)")
    if input.device != target.device:
        raise ValueError(f"input and target must be on the same device, got {input.device} and {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = check_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"for 1-D input (C,) target must be 0-dim, got shape {tuple(target.shape)}")
        x, t = input.unsqueeze(0), target.reshape(1)
    elif input.dim() == 2:
        if target.shape != input.shape[:1]:
            raise ValueError(f"target must have shape ({input.shape[0]},) for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        x, t = input, target
    else:
        raise ValueError(f"input must be (N, C) or (C,), got shape {tuple(input.shape)}; for (N, C, d1, ...) "
                         f"pass input.movedim(1, -1).reshape(-1, C) and target.reshape(-1)")
    if x.shape[1] == 0:
        raise ValueError("input must have at least one class (C >= 1)")
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise ValueError("inplace_backward=True needs input to be computed by an op (e.g. the output "
                         "layer), not a leaf that requires grad: its .grad would alias it")
    C = x.shape[1]
    weight = class_weights(weight, C, input)
    terms = LossTerms(int(ignore_index), float(label_smoothing), check_scalar("z_loss_scale", z_loss_scale, 0.0),
                      check_softcap(softcap))
    out = CrossEntropyFunction.apply(x, t, weight, terms, reduction, bool(inplace_backward))
    return out.reshape(()) if input.dim() == 1 and reduction == "none" else out
