"""Fused cross-entropy: logits -> loss without the probabilities, the gradient in one pass.

Order in this file: config resolver -> launchers and the CPU path -> torch.library ops ->
autograd.Function -> public functional. Kernels live in ``triton_kernels/cross_entropy.py``
(``mmkernels._triton.cross_entropy``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from mmkernels import _backend
from mmkernels.ops._checks import FLOATS as _FLOATS
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


def resolve_config(C: int) -> CrossEntropyConfig:
    """One program per row; the row in chunks of ``block_c`` (the whole row when it fits)."""
    block = min(MAX_BLOCK_C, next_pow2(C))
    return CrossEntropyConfig(block, max(1, min(16, block // 256)))


def launch_configs():
    """Every config :func:`resolve_config` can return (the compile tier's coverage)."""
    seen = []
    for p in range(0, 15):
        cfg = resolve_config(1 << p)
        if cfg not in seen:
            seen.append(cfg)
    return seen


# ----------------------------------------------------------------------------------------------
# Launchers (Triton) and the CPU path
# ----------------------------------------------------------------------------------------------

def triton_forward(x, target, ignore_index: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:

    from mmkernels._triton import cross_entropy as K

    N, C = x.shape
    acc = math_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc, device=x.device)
    lse = torch.empty(N, dtype=acc, device=x.device)
    cfg = resolve_config(C)
    K.cross_entropy_fwd_kernel[(N,)](
        x_ptr=x, t_ptr=target, loss_ptr=loss, lse_ptr=lse,
        C=C, sx_n=x.stride(0), sx_c=x.stride(1), st=target.stride(0),
        ignore_index=ignore_index, **split_float("eps", eps),
        BLOCK_C=cfg.block_c, SMOOTH=eps > 0, TARGET=eps < 1,
        ACC=acc_dtype(acc),
        USE_INT64=max_offset(x) + cfg.block_c * abs(x.stride(1)) >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return loss, lse


def triton_backward(x, target, lse, g, ignore_index: int, eps: float, dx: torch.Tensor) -> torch.Tensor:

    from mmkernels._triton import cross_entropy as K

    N, C = x.shape
    cfg = resolve_config(C)
    K.cross_entropy_bwd_kernel[(N,)](
        x_ptr=x, t_ptr=target, lse_ptr=lse, g_ptr=g, dx_ptr=dx,
        C=C, sx_n=x.stride(0), sx_c=x.stride(1), st=target.stride(0), sg=g.stride(0),
        sdx_n=dx.stride(0), sdx_c=dx.stride(1),
        ignore_index=ignore_index, **split_float("eps", eps),
        BLOCK_C=cfg.block_c, ACC=acc_dtype(lse.dtype),
        USE_INT64=max(max_offset(x) + cfg.block_c * abs(x.stride(1)),
                      max_offset(dx) + cfg.block_c * abs(dx.stride(1))) >= INT32_LIMIT,
        num_warps=cfg.num_warps,
    )
    return dx


def _chunks(N: int, C: int):
    rows = max(1, CPU_CHUNK_ELEMS // max(C, 1))
    for r0 in range(0, N, rows):
        yield r0, min(N, r0 + rows)


def _cpu_forward(x, target, ignore_index: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row chunks of at most CPU_CHUNK_ELEMS elements: no full-size temporary."""
    N, C = x.shape
    acc = math_dtype(x.dtype)
    loss = torch.empty(N, dtype=acc)
    lse = torch.empty(N, dtype=acc)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    for r0, r1 in _chunks(N, C):
        xc = x[r0:r1].to(acc)
        lse[r0:r1] = torch.logsumexp(xc, dim=1)
        part = lse[r0:r1].clone()
        if eps < 1:
            part -= (1.0 - eps) * xc.gather(1, safe[r0:r1, None]).squeeze(1)
        if eps > 0:
            part -= (eps / C) * xc.sum(1)
        loss[r0:r1] = torch.where(valid[r0:r1], part, 0.0)
    return loss, lse


def _cpu_backward(x, target, lse, g, ignore_index: int, eps: float, dx: torch.Tensor) -> torch.Tensor:
    """dx chunk by chunk, computed in place in ``dx``'s rows when they hold the math dtype (else
    through one chunk-sized temporary); ``dx`` may be ``x`` itself."""
    N, C = x.shape
    acc = lse.dtype
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    scale = torch.where(valid, g.to(acc).expand(N), 0.0)
    for r0, r1 in _chunks(N, C):
        out = dx[r0:r1]
        work = out if out.dtype == acc else torch.empty((r1 - r0, C), dtype=acc)
        torch.sub(x[r0:r1].to(acc) if x.dtype != acc else x[r0:r1], lse[r0:r1, None], out=work)
        work.exp_()
        if eps > 0:
            work.sub_(eps / C)
        if eps < 1:
            work.scatter_add_(1, safe[r0:r1, None], torch.full((r1 - r0, 1), -(1.0 - eps), dtype=acc))
        work.mul_(scale[r0:r1, None]).masked_fill_(~valid[r0:r1, None], 0.0)  # ignored rows: exact zeros
        if work is not out:
            out.copy_(work)
    return dx


def _check_targets_on_host(target: torch.Tensor, C: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"target[{i}] = {int(target[i])} is out of range [0, {C}) and is not "
                         f"ignore_index={ignore_index}")


def _forward(x, target, ignore_index: int, eps: float):
    if x.shape[0] == 0:
        acc = math_dtype(x.dtype)
        return torch.empty(0, dtype=acc, device=x.device), torch.empty(0, dtype=acc, device=x.device)
    if x.device.type == "cpu":
        _check_targets_on_host(target, x.shape[1], ignore_index)
    if _backend.resolve(x.device) is _backend.Impl.TRITON:
        return triton_forward(x, target, ignore_index, eps)
    return _cpu_forward(x, target, ignore_index, eps)


def _backward(x, target, lse, g, ignore_index: int, eps: float, inplace: bool) -> torch.Tensor:
    dx = x if inplace else torch.empty_like(x)
    if x.shape[0] == 0:
        return dx
    if _backend.resolve(x.device) is _backend.Impl.TRITON:
        return triton_backward(x, target, lse, g, ignore_index, eps, dx)
    return _cpu_backward(x, target, lse, g, ignore_index, eps, dx)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mmkernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd_op(x: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row log-sum-exp), float32 (float64 for float64 logits)."""
    return _forward(x, target, ignore_index, eps)


@cross_entropy_fwd_op.register_fake
def _(x, target, ignore_index, eps):
    acc = math_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@torch.library.custom_op("mmkernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd_op(x: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                         ignore_index: int, eps: float) -> torch.Tensor:
    """d logits for the per-row incoming gradient ``g`` ((N,) or a broadcast 0-stride view)."""
    return _backward(x, target, lse, g, ignore_index, eps, inplace=False)


@cross_entropy_bwd_op.register_fake
def _(x, target, lse, g, ignore_index, eps):
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
    def forward(ctx, x, target, ignore_index: int, eps: float, reduction: str, inplace: bool):
        if _backend.direct_call_ok(x, target):
            loss, lse = _forward(x, target, ignore_index, eps)
        else:
            loss, lse = cross_entropy_fwd_op(x, target, ignore_index, eps)
        count = None
        if reduction == "mean":
            count = (target != ignore_index).sum().to(loss.dtype)  # no host read: 0 rows give NaN
            out = loss.sum() / count
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss
        ctx.save_for_backward(x, target, lse, count)
        ctx.args = (ignore_index, eps, reduction, inplace)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, target, lse, count = ctx.saved_tensors
        ignore_index, eps, reduction, inplace = ctx.args
        g = _row_grad(grad, reduction, count, x.shape[0])
        if _backend.direct_call_ok(x, target, lse, g):
            dx = _backward(x, target, lse, g, ignore_index, eps, inplace)
            if inplace:
                torch.autograd.graph.increment_version(x)  # a saved copy of the logits is now stale
        else:  # traced (torch.compile): the functional op, a new tensor even with inplace_backward
            dx = cross_entropy_bwd_op(x, target, lse, g, ignore_index, eps)
        return dx, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------

def cross_entropy(input: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  inplace_backward: bool = False) -> torch.Tensor:
    r"""Cross-entropy of logits and class indices, like ``F.cross_entropy``, without the
    probabilities: ``loss_n = lse_n - (1-ε)·x[n, t_n] - (ε/C)·Σ_c x[n, c]`` with
    ``lse_n = log Σ_c exp x[n, c]`` and ``ε = label_smoothing``; rows with ``t_n == ignore_index``
    count as 0 and are left out of the mean.

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
        ignore_index: target value whose rows are skipped (loss 0, gradient 0, not counted).
        reduction: ``"mean"`` (over the rows not ignored; NaN when every row is ignored, as
            torch), ``"sum"`` or ``"none"`` (``(N,)``).
        label_smoothing: ``ε`` in ``[0, 1]``.
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
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
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
    out = CrossEntropyFunction.apply(x, t, int(ignore_index), float(label_smoothing), reduction,
                                     bool(inplace_backward))
    return out.reshape(()) if input.dim() == 1 and reduction == "none" else out
