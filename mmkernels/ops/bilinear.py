"""Sigma-pi / bilinear family: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·W[j,h,i] (+ b[j])``.

The same op as ``torch.nn.functional.bilinear(z, x, W, b)`` (the seeds' ``W = z×U, y = x×W`` with
``U[h,i,j] = W[j,h,i]``). Order in this file: CPU path -> dispatch -> torch.library ops ->
autograd.Function -> public functional. The Triton kernels are in ``triton_kernels/bilinear.py``
with their launchers in ``mmkernels/ops/_bilinear_triton.py``.

The CPU path never holds more than :data:`CPU_CHUNK_ELEMS` elements of the ``N × b·c`` outer
product (or of ``G = dy·W``) at once, so its peak memory does not grow with ``N·b·c``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmkernels import _backend
from mmkernels.ops._checks import FLOATS, check_same, check_tensor

#: Elements of the per-chunk outer product (and of G) the CPU path materialises at once.
CPU_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# CPU path (chunked over rows; never the N×b·c operand)
# ----------------------------------------------------------------------------------------------


def _chunk_rows(b: int, c: int) -> int:
    return max(1, CPU_CHUNK_ELEMS // max(1, b * c))


def _cpu_forward(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    N, b = z.shape
    c, d = x.shape[1], w.shape[0]
    y = torch.empty(N, d, dtype=z.dtype, device=z.device)
    w2 = w.reshape(d, b * c)  # a view for a contiguous weight; else one copy of the (small) weight
    rows = _chunk_rows(b, c)
    for s in range(0, N, rows):
        zc, xc = z[s:s + rows], x[s:s + rows]
        a = (zc[:, :, None] * xc[:, None, :]).reshape(zc.shape[0], b * c)
        torch.mm(a, w2.t(), out=y[s:s + rows])
        del a  # before the next chunk's is built: one chunk live at a time
    if bias is not None:
        y += bias
    return y


def _cpu_backward(z, x, w, dy, need_dz: bool, need_dx: bool, need_dw: bool):
    N, b = z.shape
    c, d = x.shape[1], w.shape[0]
    w2 = w.reshape(d, b * c)
    dz = torch.empty_like(z) if need_dz else None
    dx = torch.empty_like(x) if need_dx else None
    dw2 = torch.zeros(d, b * c, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
                      device=w.device) if need_dw else None
    rows = _chunk_rows(b, c)
    for s in range(0, N, rows):
        zc, xc, dyc = z[s:s + rows], x[s:s + rows], dy[s:s + rows]
        n = zc.shape[0]
        if need_dz or need_dx:
            g = torch.mm(dyc, w2).view(n, b, c)  # G[n, h, i] = Σ_j dy[n, j] W[j, h, i]
            if need_dz:
                torch.bmm(g, xc[:, :, None], out=dz[s:s + rows, :, None])
            if need_dx:
                torch.bmm(zc[:, None, :], g, out=dx[s:s + rows, None, :])
            del g
        if need_dw:
            a = (zc[:, :, None] * xc[:, None, :]).reshape(n, b * c)
            dw2.addmm_(dyc.t().to(dw2.dtype), a.to(dw2.dtype))
            del a
    dw = dw2.view(d, b, c).to(w.dtype) if need_dw else None
    return dz, dx, dw


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def _forward(z, x, w, bias):
    if z.shape[0] == 0 or w.shape[0] == 0:
        y = torch.zeros(z.shape[0], w.shape[0], dtype=z.dtype, device=z.device)
        return y + bias if bias is not None else y
    if _backend.resolve(z.device) is _backend.Impl.TRITON:
        from mmkernels.ops._bilinear_triton import bilinear_forward_triton

        return bilinear_forward_triton(z, x, w, bias)
    return _cpu_forward(z, x, w, bias)


def _backward(z, x, w, dy, need_dz, need_dx, need_dw):
    if z.shape[0] == 0 or w.shape[0] == 0 or w.shape[1] == 0 or w.shape[2] == 0:
        return (torch.zeros_like(z) if need_dz else None, torch.zeros_like(x) if need_dx else None,
                torch.zeros_like(w) if need_dw else None)
    if _backend.resolve(z.device) is _backend.Impl.TRITON:
        from mmkernels.ops._bilinear_triton import bilinear_backward_triton

        return bilinear_backward_triton(z, x, w, dy, need_dz=need_dz, need_dx=need_dx, need_dw=need_dw)
    return _cpu_backward(z, x, w, dy, need_dz, need_dx, need_dw)


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::bilinear_fwd", mutates_args=())
def bilinear_fwd_op(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y (N, d) from z (N, b), x (N, c), w (d, b, c), bias (d,) or None."""
    return _forward(z, x, w, bias)


@bilinear_fwd_op.register_fake
def _(z, x, w, bias):
    return z.new_empty(z.shape[0], w.shape[0])


@torch.library.custom_op("mmkernels::bilinear_bwd", mutates_args=())
def bilinear_bwd_op(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
                    need_dz: bool, need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dx, dw); a gradient not asked for comes back as an empty tensor."""
    dz, dx, dw = _backward(z, x, w, dy, need_dz, need_dx, need_dw)
    none = z.new_empty(0)
    return (none if dz is None else dz, none if dx is None else dx, none if dw is None else dw)


@bilinear_bwd_op.register_fake
def _(z, x, w, dy, need_dz, need_dx, need_dw):
    none = z.new_empty(0)
    return (torch.empty_like(z) if need_dz else none, torch.empty_like(x) if need_dx else none,
            torch.empty_like(w) if need_dw else none)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class BilinearFunction(torch.autograd.Function):
    """Forward saves z, x and w (never the outer product); backward computes only the gradients
    autograd asks for; the bias gradient is the column sum of dy."""

    @staticmethod
    def forward(ctx, z, x, w, bias):
        if _backend.direct_call_ok(z, x, w, *(() if bias is None else (bias,))):
            y = _forward(z, x, w, bias)
        else:
            y = bilinear_fwd_op(z, x, w, bias)
        ctx.save_for_backward(z, x, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        z, x, w = ctx.saved_tensors
        need_dz, need_dx, need_dw, need_db = ctx.needs_input_grad
        if need_dz or need_dx or need_dw:
            if _backend.direct_call_ok(z, x, w, dy):
                dz, dx, dw = _backward(z, x, w, dy, need_dz, need_dx, need_dw)
            else:
                dz, dx, dw = bilinear_bwd_op(z, x, w, dy, need_dz, need_dx, need_dw)
                dz, dx, dw = (dz if need_dz else None, dx if need_dx else None, dw if need_dw else None)
        else:
            dz = dx = dw = None
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        return dz, dx, dw, db


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------


def bilinear(input1: torch.Tensor, input2: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Sigma-pi / bilinear contraction, like ``torch.nn.functional.bilinear``:
    ``y[..., j] = Σ_h Σ_i input1[..., h] · input2[..., i] · weight[j, h, i] + bias[j]``.

    Args:
        input1: ``(*, b)`` — the seeds' ``z``.
        input2: ``(*, c)`` with the same batch shape ``*`` (any rank, empty batches too) — ``x``.
        weight: ``(d, b, c)`` — ``U`` with ``U[h, i, j] = weight[j, h, i]``.
        bias: ``(d,)`` or None.

    All tensors share one dtype (float16, bfloat16, float32, float64) and one device. Math
    accumulates in float32 (float64 for float64); on CUDA, float32 products follow
    ``torch.backends.cuda.matmul.allow_tf32``.

    Returns:
        ``(*, d)`` in the inputs' dtype.

    The ``N × b·c`` outer product is never materialised: the Triton kernels build its tiles in
    registers, the CPU path works on row chunks of at most ``CPU_CHUNK_ELEMS`` elements. Batch
    dims are flattened with ``reshape`` (a copy only if they cannot be viewed as one dim).

    Example:
        >>> z, x = torch.randn(32, 8), torch.randn(32, 5)
        >>> w, b = torch.randn(3, 8, 5), torch.randn(3)
        >>> mmkernels.bilinear(z, x, w, b).shape
        torch.Size([32, 3])
    """
    check_tensor("input1", input1)
    check_tensor("input2", input2)
    check_tensor("weight", weight)
    tensors, names = [input1, input2, weight], ["input1", "input2", "weight"]
    if bias is not None:
        check_tensor("bias", bias)
        tensors.append(bias)
        names.append("bias")
    if input1.dtype not in FLOATS:
        raise TypeError(f"input1 must be float16, bfloat16, float32 or float64, got {input1.dtype}")
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape (d, b, c), got {tuple(weight.shape)}")
    d, b, c = weight.shape
    if input1.dim() < 1 or input1.shape[-1] != b:
        raise ValueError(f"input1 must have shape (*, {b}) to match weight (d, b, c) = {tuple(weight.shape)}, "
                         f"got {tuple(input1.shape)}")
    if input2.dim() < 1 or input2.shape[-1] != c:
        raise ValueError(f"input2 must have shape (*, {c}) to match weight (d, b, c) = {tuple(weight.shape)}, "
                         f"got {tuple(input2.shape)}")
    if input1.shape[:-1] != input2.shape[:-1]:
        raise ValueError(f"input1 and input2 must have the same batch shape, got {tuple(input1.shape[:-1])} "
                         f"and {tuple(input2.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
    batch = input1.shape[:-1]
    z, x = input1.reshape(-1, b), input2.reshape(-1, c)
    return BilinearFunction.apply(z, x, weight, bias).reshape(*batch, d)
