"""Fused linear + cross-entropy: an output layer's loss without its ``(tokens, vocab)`` logits.

The tokens are taken in chunks. For each chunk the logits ``x_c·Wᵀ + b`` are one GEMM into a
chunk-sized buffer; the cross-entropy row kernels (:mod:`mmkernels.ops.cross_entropy`: Triton on
CUDA, torch ops on CPU) turn them into the row losses and, in the same buffer, into their
gradient; two more GEMMs take that gradient to ``d input`` (the chunk's rows) and ``d W`` (summed
over the chunks in a fixed order: deterministic, float32 for 16-bit weights). For the ``mean`` and
``sum`` reductions the gradient's scale is known in the forward, so the gradients are computed
there (three GEMMs in all, like the unfused composition) and the backward only scales them; for
``none`` the backward sweeps the chunks again (one GEMM more). Peak memory above the inputs and
their gradients: one logits chunk (``chunk_tokens · vocab`` elements), a float32 ``d W`` for
16-bit weights, and per-row floats.

When no gradient is wanted in the forward (no grad mode, nothing requires grad, or reduction
``none``, whose backward recomputes), the Triton path computes the loss without any logits in
memory: :func:`triton_stats` is one GEMM kernel whose epilogue keeps each token's running
log-sum-exp, target logit and smoothing sum (``triton_kernels/cross_entropy.py``,
``linear_cross_entropy_stats_kernel``), over vocabulary splits combined in a fixed order.

Order in this file: config resolver -> chunking -> the logits-free forward (Triton) -> the sweep
-> torch.library ops -> autograd.Function -> public functional.
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
from mmkernels.ops._util import cdiv, dot_f32, gpu_arch, math_dtype, sm_count, tf32_allowed
from mmkernels.ops.cross_entropy import (REDUCTIONS, LossTerms, check_targets_on_host, mean_divisor, row_backward,
                                         row_forward, row_loss)

# ----------------------------------------------------------------------------------------------
# Config resolver (the logits-free forward's GEMM tiles)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    block_t: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


#: Tiles by dot class: 16-bit and TF32 on tensor cores (wgmma on sm_90, mma.sync on sm_80), IEEE
#: fp32 on FMA units (smaller: its dot holds fp32 operands in registers).
STATS_CONFIGS = {
    "16bit": StatsConfig(128, 128, 64, 8, 3),
    "tf32": StatsConfig(128, 128, 32, 8, 3),
    "ieee": StatsConfig(64, 64, 32, 4, 2),
}


def dot_class(dtype: torch.dtype) -> str:
    """The stats GEMM's class of ``dtype``: "16bit", or fp32 as torch's matmul precision allows
    ("tf32" unless it is "highest", else "ieee")."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "tf32" if tf32_allowed() else "ieee"


def resolve_stats(T: int, V: int, dtype: torch.dtype, sms: int, softcap: bool = False) -> Tuple[StatsConfig, int]:
    """The tiles and the vocabulary slice per program (a multiple of ``block_v``): the vocabulary
    is split until the programs fill two waves of ``sms`` (or each slice is one tile). With
    soft-capping the tile is half as wide and its H steps at most 32 deep (its tanh's temporaries
    spill a 128 x 128 tile, and 128 x 64 x 64 at unaligned sizes)."""
    cfg = STATS_CONFIGS[dot_class(dtype)]
    if softcap:
        cfg = dataclasses.replace(cfg, block_v=cfg.block_v // 2, block_h=min(cfg.block_h, 32))
    programs_t = cdiv(T, cfg.block_t)
    splits = max(1, min(cdiv(V, cfg.block_v), cdiv(2 * sms, programs_t)))
    return cfg, cdiv(cdiv(V, splits), cfg.block_v) * cfg.block_v


# ----------------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------------

#: Logits elements per token chunk: 8M on CPU (32 MiB in float32, a fraction of the cache-cold
#: GEMM's working set), 128M on CUDA (a 1024-token chunk at a 128k vocabulary: GEMMs of M = 1024).
CHUNK_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 27}


def chunk_tokens_for(T: int, V: int, device: torch.device, chunk_tokens: Optional[int] = None) -> int:
    """Tokens per chunk: ``chunk_tokens`` when given, else CHUNK_ELEMS of the device over the
    vocabulary (at least 16, at most ``T``)."""
    if chunk_tokens is None:
        chunk_tokens = max(16, CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cpu"]) // max(V, 1))
    return max(1, min(T, chunk_tokens))


# ----------------------------------------------------------------------------------------------
# The logits-free forward (Triton)
# ----------------------------------------------------------------------------------------------

def stats_supported(x: torch.Tensor) -> bool:
    """The stats kernel runs on the Triton path for 16-bit and float32 operands (float64 takes the
    sweep: no float64 tensor-core dot)."""
    return x.dtype != torch.float64 and _backend.resolve(x) is _backend.Impl.TRITON


def triton_stats(x, w, b, target, class_weight, terms: LossTerms, *, arch: Optional[int] = None):
    """``(lse, z_t, zw)``, float32 (T,): each token's log-sum-exp of its (capped) logits, its
    target's logit (0 for an ignored token) and, with label smoothing, ``Σ_c w_c z_c`` (else
    None) — from one GEMM kernel over vocabulary splits, combined here in a fixed order."""
    from mmkernels._triton import cross_entropy as K

    T, H = x.shape
    V = w.shape[0]
    arch = gpu_arch(x) if arch is None else arch
    cfg, v_split = resolve_stats(T, V, x.dtype, sm_count(x, arch), terms.softcap != 0)
    splits = cdiv(V, v_split)
    part = torch.empty((4, splits, T), dtype=torch.float32, device=x.device)
    smooth = terms.eps > 0
    K.linear_cross_entropy_stats_kernel[(cdiv(T, cfg.block_t), splits)](
        x_ptr=x, w_ptr=w, b_ptr=b if b is not None else w, t_ptr=target,
        cw_ptr=class_weight if class_weight is not None else part,
        m_ptr=part[0], s_ptr=part[1], zt_ptr=part[2], zw_ptr=part[3],
        T=T, V=V, H=H, V_SPLIT=v_split, sx_t=x.stride(0), sx_h=x.stride(1), sw_v=w.stride(0), sw_h=w.stride(1),
        st=target.stride(0), scw=class_weight.stride(0) if class_weight is not None else 0,
        ignore_index=terms.ignore_index, **split_float("cap", terms.softcap),
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, HAS_BIAS=b is not None,
        SOFTCAP=terms.softcap != 0, SMOOTH=smooth, HAS_WEIGHT=class_weight is not None,
        PRECISION="ieee" if dot_class(x.dtype) != "tf32" else "tf32", EVEN_H=H % cfg.block_h == 0,
        DOT_F32=dot_f32(x),
        USE_INT64=max(max_offset(x), max_offset(w), part.numel()) + cfg.block_v * abs(w.stride(0)) >= INT32_LIMIT,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m, s, z_t, zw = part
    big = m.amax(0)
    finite = torch.isfinite(big)
    lse = torch.where(finite, big + (s * torch.exp(m - torch.where(finite, big, 0.0))).sum(0).log(), big)
    return lse, z_t.sum(0), zw.sum(0) if smooth else None


# ----------------------------------------------------------------------------------------------
# The sweep over token chunks
# ----------------------------------------------------------------------------------------------

def _accumulate_wgrad(acc: torch.Tensor, g: torch.Tensor, xc: torch.Tensor) -> None:
    """``acc += gᵀ·x_c``; ``acc`` float32 for 16-bit operands (on CUDA the GEMM writes float32
    itself; on CPU the operands are widened chunk by chunk)."""
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), xc)
    elif g.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc, g.t(), xc, acc.dtype, out=acc)
    else:
        acc.addmm_(g.t().to(acc.dtype), xc.to(acc.dtype))


def sweep(x, w, b, target, class_weight, terms: LossTerms, *, lse=None, g=None, want_target_logp=False,
          grads=(False, False, False), chunk_tokens: Optional[int] = None):
    """One pass over the token chunks of ``x`` (T, H) with the output layer ``w`` (V, H), ``b`` (V,).

    Without ``lse`` it computes the row losses, log-sum-exps and (``want_target_logp``) target
    log-probabilities; with ``g`` (T,) — the incoming gradient of each row's loss — it also
    computes the gradients named by ``grads`` (d x, d w, d b). Returns
    ``(loss, lse, target_logp, dx, dw, db)``, absent entries None; losses in the math dtype.
    """
    T, H = x.shape
    V = w.shape[0]
    acc = math_dtype(x.dtype)
    if lse is None and g is None and T and stats_supported(x):  # the loss alone: no logits at all
        lse, z_t, zw = triton_stats(x, w, b, target, class_weight, terms)
        valid = target != terms.ignore_index
        tlp = torch.where(valid, z_t - lse, 0.0) if want_target_logp else None
        return row_loss(lse, z_t, zw, target, terms, class_weight, V), lse, tlp, None, None, None
    rows = chunk_tokens_for(T, V, x.device, chunk_tokens)
    forward = lse is None
    loss = torch.empty(T, dtype=acc, device=x.device) if forward else None
    lse = torch.empty(T, dtype=acc, device=x.device) if forward else lse
    tlp = torch.empty(T, dtype=acc, device=x.device) if forward and want_target_logp else None
    want_dx, want_dw, want_db = grads if g is not None else (False, False, False)
    dx = torch.empty_like(x) if want_dx else None
    dw_acc = torch.zeros(w.shape, dtype=acc if w.dtype != acc else w.dtype, device=w.device) if want_dw else None
    db_acc = torch.zeros(V, dtype=acc, device=x.device) if want_db else None
    buf = torch.empty((rows, V), dtype=x.dtype, device=x.device)
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        xc, tc, logits = x[r0:r1], target[r0:r1], buf[: r1 - r0]
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        if forward:
            loss[r0:r1], lse[r0:r1], t_lp = row_forward(logits, tc, terms, class_weight, want_target_logp)
            if tlp is not None:
                tlp[r0:r1] = t_lp
        if g is None or not (want_dx or want_dw or want_db):
            continue
        d_logits = row_backward(logits, tc, lse[r0:r1], g[r0:r1], terms, class_weight, logits)  # in place
        if want_dx:
            torch.mm(d_logits, w, out=dx[r0:r1])
        if want_dw:
            _accumulate_wgrad(dw_acc, d_logits, xc)
        if want_db:
            db_acc += d_logits.sum(0, dtype=acc)
    dw = None if dw_acc is None else dw_acc.to(w.dtype)
    db = None if db_acc is None else db_acc.to(b.dtype)
    return loss, lse, tlp, dx, dw, db


def _reduce(loss_rows, target, terms, class_weight, reduction):
    """(the reduced loss, the incoming gradient of each row's loss as a (T,) view) for mean / sum."""
    T = loss_rows.shape[0]
    if reduction == "mean":
        divisor = mean_divisor(target, terms, class_weight, loss_rows.dtype)  # 0 rows kept: NaN, as torch
        return loss_rows.sum() / divisor, (1.0 / divisor).reshape(1).expand(T)
    return loss_rows.sum(), torch.ones((), dtype=loss_rows.dtype, device=loss_rows.device).reshape(1).expand(T)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

def _absent(like: torch.Tensor) -> torch.Tensor:
    """What a custom op returns for an output it did not compute (ops cannot return None)."""
    return like.new_empty(0)


@torch.library.custom_op("mmkernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd_op(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    class_weight: Optional[torch.Tensor], ignore_index: int, eps: float, z_loss: float, softcap: float,
    reduction: str, want_target_logp: bool, grad_x: bool, grad_w: bool, grad_b: bool, chunk_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reduced or per-row loss, lse, target log-prob, dx, dw, db); outputs not asked for are
    empty; the gradients are those of the reduced loss (mean / sum only)."""
    out = _forward(x, w, b, target, class_weight, LossTerms(ignore_index, eps, z_loss, softcap), reduction,
                   want_target_logp, (grad_x, grad_w, grad_b), chunk_tokens or None)
    return tuple(t if t is not None else _absent(x) for t in out)


@linear_cross_entropy_fwd_op.register_fake
def _(x, w, b, target, class_weight, ignore_index, eps, z_loss, softcap, reduction, want_target_logp,
      grad_x, grad_w, grad_b, chunk_tokens):
    acc = math_dtype(x.dtype)
    T = x.shape[0]
    eager = reduction != "none"
    return (x.new_empty((T,) if not eager else (), dtype=acc), x.new_empty(T, dtype=acc),
            x.new_empty(T if want_target_logp else 0, dtype=acc),
            torch.empty_like(x) if eager and grad_x else x.new_empty(0),
            torch.empty_like(w) if eager and grad_w else x.new_empty(0),
            b.new_empty(b.shape) if eager and grad_b and b is not None else x.new_empty(0))


@torch.library.custom_op("mmkernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd_op(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], target: torch.Tensor,
    class_weight: Optional[torch.Tensor], lse: torch.Tensor, g: torch.Tensor, ignore_index: int, eps: float,
    z_loss: float, softcap: float, grad_x: bool, grad_w: bool, grad_b: bool, chunk_tokens: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) for the per-row incoming gradient ``g`` (T,); outputs not asked for are empty."""
    out = sweep(x, w, b, target, class_weight, LossTerms(ignore_index, eps, z_loss, softcap), lse=lse, g=g,
                grads=(grad_x, grad_w, grad_b), chunk_tokens=chunk_tokens or None)[3:]
    return tuple(t if t is not None else _absent(x) for t in out)


@linear_cross_entropy_bwd_op.register_fake
def _(x, w, b, target, class_weight, lse, g, ignore_index, eps, z_loss, softcap, grad_x, grad_w, grad_b,
      chunk_tokens):
    return (torch.empty_like(x) if grad_x else x.new_empty(0), torch.empty_like(w) if grad_w else x.new_empty(0),
            b.new_empty(b.shape) if grad_b and b is not None else x.new_empty(0))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

def _forward(x, w, b, target, class_weight, terms, reduction, want_target_logp, grads, chunk_tokens):
    """(loss — reduced, or per row for ``none`` —, lse, target log-prob, dx, dw, db); the
    gradients (of the reduced loss) only for mean / sum and only those in ``grads``."""
    if x.device.type == "cpu":
        check_targets_on_host(target, w.shape[0], terms.ignore_index)
    if reduction == "none" or not any(grads):
        loss, lse, tlp, *_ = sweep(x, w, b, target, class_weight, terms, want_target_logp=want_target_logp,
                                   chunk_tokens=chunk_tokens)
        if reduction != "none":
            loss = _reduce(loss, target, terms, class_weight, reduction)[0]
        return loss, lse, tlp, None, None, None
    # mean / sum: the row gradient's scale is known before the sweep (the divisor needs only targets)
    if reduction == "mean":
        divisor = mean_divisor(target, terms, class_weight, math_dtype(x.dtype))
        g = (1.0 / divisor).reshape(1).expand(x.shape[0])
    else:
        g = torch.ones((), dtype=math_dtype(x.dtype), device=x.device).reshape(1).expand(x.shape[0])
    rows, lse, tlp, dx, dw, db = sweep(x, w, b, target, class_weight, terms, g=g,
                                       want_target_logp=want_target_logp, grads=grads, chunk_tokens=chunk_tokens)
    loss = rows.sum() / divisor if reduction == "mean" else rows.sum()
    return loss, lse, tlp, dx, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean / sum: the forward computes the gradients and the backward scales them (in place: a
    second backward through the same graph raises); none: the forward saves the inputs and the
    row log-sum-exps, the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, terms: LossTerms, reduction: str, want_target_logp: bool,
                chunk_tokens: Optional[int], grad_mode: bool):
        # needs_input_grad says True under no_grad too: the caller passes the grad mode it ran in
        grads = tuple(bool(n) and grad_mode for n in ctx.needs_input_grad[:3])
        grads = (grads[0], grads[1], grads[2] and b is not None)
        eager = reduction != "none" and any(grads)
        if _backend.direct_call_ok(*(t for t in (x, w, b, target, class_weight) if t is not None)):
            loss, lse, tlp, dx, dw, db = _forward(x, w, b, target, class_weight, terms, reduction, want_target_logp,
                                                  grads if eager else (False, False, False), chunk_tokens)
        else:
            out = linear_cross_entropy_fwd_op(x, w, b, target, class_weight, terms.ignore_index, terms.eps,
                                              terms.z_loss, terms.softcap, reduction, want_target_logp,
                                              *(grads if eager else (False, False, False)), chunk_tokens or 0)
            loss, lse, tlp, dx, dw, db = (t if t.numel() or i < 2 else None for i, t in enumerate(out))
            dx, dw, db = (t if flag else None for t, flag in zip((dx, dw, db), grads))
        ctx.eager = eager
        ctx.used = False
        ctx.args = (terms, grads, chunk_tokens)
        if eager:
            ctx.save_for_backward(dx, dw, db)
        else:
            ctx.save_for_backward(x, w, b, target, class_weight, lse)
        tlp = tlp if tlp is not None else loss.new_empty(0)
        ctx.mark_non_differentiable(tlp)
        return loss.to(x.dtype), tlp

    @staticmethod
    @once_differentiable  # no torch-ops twin: a second derivative raises where the incoming gradient has a graph
    def backward(ctx, grad, _grad_tlp):
        terms, grads, chunk_tokens = ctx.args
        if ctx.eager:
            if ctx.used:
                raise RuntimeError("linear_cross_entropy with reduction='mean' / 'sum' computes its gradients in "
                                   "the forward and scales them in place: it can be differentiated once. For a "
                                   "second backward (retain_graph=True) use reduction='none' and reduce yourself")
            ctx.used = True
            out = []
            for t in ctx.saved_tensors:
                out.append(None if t is None else t.mul_(grad.to(t.dtype)))
            return (*out, None, None, None, None, None, None, None)
        x, w, b, target, class_weight, lse = ctx.saved_tensors
        g = grad.to(lse.dtype)
        if _backend.direct_call_ok(*(t for t in (x, w, b, target, class_weight, lse, g) if t is not None)):
            dx, dw, db = sweep(x, w, b, target, class_weight, terms, lse=lse, g=g, grads=grads,
                               chunk_tokens=chunk_tokens)[3:]
        else:
            out = linear_cross_entropy_bwd_op(x, w, b, target, class_weight, lse, g, terms.ignore_index, terms.eps,
                                              terms.z_loss, terms.softcap, *grads, chunk_tokens or 0)
            dx, dw, db = (t if flag else None for t, flag in zip(out, grads))
        return dx, dw, db, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------

def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = -100, label_smoothing: float = 0.0,
                         z_loss_scale: float = 0.0, softcap: Optional[float] = None,
                         return_target_logprob: bool = False, chunk_tokens: Optional[int] = None):
    r"""``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the
    ``(tokens, vocab)`` logits or their gradient in memory — an output layer's loss in chunks.

    Row ``n`` of the logits is ``u = x_n·Wᵀ + b``, capped to ``z = cap·tanh(u / cap)`` with
    ``softcap``; with ``lse = log Σ_c exp z_c`` the row's loss is

        ``loss_n = -Σ_c w_c·q_c·(z_c - lse) + zs·lse²``,   ``q = (1-ε)·onehot(t_n) + ε/C``

    (``F.cross_entropy`` with ``weight=w`` and ``label_smoothing=ε``, plus a z-loss with
    ``zs = z_loss_scale``); rows whose target is ``ignore_index`` count 0, and the mean divides by
    ``Σ_n w_{t_n}`` over the other rows (their number without ``weight``; NaN when every row is
    ignored, as torch).

    Memory above the inputs and their gradients: one logits chunk of ``chunk_tokens × C``
    elements (default: ~8M elements on CPU, ~128M on CUDA), a float32 copy of ``d W`` for 16-bit
    weights, and a few floats per token. Time: the three GEMMs of the unfused composition (four
    with ``reduction="none"``, whose backward recomputes the logits). The gradients are
    deterministic (fixed-order sums over the chunks).

    Args:
        input: ``(*, H)`` features, float16 / bfloat16 / float32 / float64.
        linear_weight: ``(C, H)``, ``input``'s dtype and device.
        target: ``(*)`` integer class indices in ``[0, C)`` or ``ignore_index``.
        linear_bias: optional ``(C,)``.
        weight: optional ``(C,)`` class weights (any float dtype; not differentiated).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the loss of each token, shape ``(*)``).
            With mean / sum the gradients are computed in the forward (when any input requires
            grad) and the graph can be differentiated once.
        ignore_index: target value whose rows are skipped; ``None`` means -100 (as torch).
        label_smoothing: ``ε`` in ``[0, 1]``.
        z_loss_scale: ``zs >= 0`` (PaLM's z-loss is ``1e-4``).
        softcap: ``cap > 0`` for Gemma-style logit soft-capping, or None.
        return_target_logprob: also return ``z_t - lse`` per token (shape ``(*)``, float32 —
            float64 for float64 input —, 0 for ignored tokens; not differentiable).
        chunk_tokens: tokens per chunk (default from the vocabulary size, see above).

    Returns:
        The loss in ``input``'s dtype (0-dim, or ``(*)`` for ``"none"``), and with
        ``return_target_logprob`` a tuple ``(loss, target_logprob)``.

    Example:
        >>> h = torch.randn(8, 64, requires_grad=True); W = torch.randn(1000, 64, requires_grad=True)
        >>> loss = mmkernels.linear_cross_entropy(h, W, torch.randint(0, 1000, (8,)), z_loss_scale=1e-4)
        >>> loss.backward()
    """
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        _check_tensor(name, t)
    if input.dtype not in _FLOATS:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have at least one dim (*, H)")
    H = input.shape[-1]
    if linear_weight.dim() != 2 or linear_weight.shape[1] != H:
        raise ValueError(f"linear_weight must be (C, {H}) for input of shape {tuple(input.shape)}, got "
                         f"{tuple(linear_weight.shape)}")
    C = linear_weight.shape[0]
    if C == 0:
        raise ValueError("linear_weight must have at least one class (C >= 1)")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise ValueError(f"{name} must have input's dtype and device ({input.dtype}, {input.device}), got "
                             f"{t.dtype}, {t.device}")
    if linear_bias is not None and tuple(linear_bias.shape) != (C,):
        raise ValueError(f"linear_bias must be ({C},), got {tuple(linear_bias.shape)}")
    weight = class_weights(weight, C, input)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.device != input.device:
        raise ValueError(f"input and target must be on the same device, got {input.device} and {target.device}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if ignore_index is None:
        ignore_index = -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    eps = check_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    zs = check_scalar("z_loss_scale", z_loss_scale, 0.0)
    cap = check_softcap(softcap)
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    x = input.reshape(-1, H)
    t = target.reshape(-1)
    loss, tlp = LinearCrossEntropyFunction.apply(x, linear_weight, linear_bias, t, weight,
                                                 LossTerms(ignore_index, eps, zs, cap), reduction,
                                                 bool(return_target_logprob), chunk_tokens, torch.is_grad_enabled())
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if return_target_logprob:
        return loss, tlp.reshape(target.shape)
    return loss
