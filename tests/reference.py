"""Naive float64 references. Independent of mmkernels: plain torch ops in float64, written the
obvious way. Every function takes tensors of any float dtype and returns float64 on the CPU."""
from __future__ import annotations

import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def softmax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max) along dim."""
    x = _f64(x)
    if x.numel() == 0:
        return x.clone()
    m = x.amax(dim=dim, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = _f64(x)
    if x.numel() == 0:
        return x.clone()
    m = x.amax(dim=dim, keepdim=True)
    z = x - m
    return z - z.exp().sum(dim=dim, keepdim=True).log()


def softmin_ref(x: torch.Tensor, dim: int) -> torch.Tensor:
    return softmax_ref(-_f64(x), dim)


def softmax_backward_ref(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """dx from the op's output y and the incoming gradient dy (the Jacobian-vector product)."""
    y, dy = _f64(y), _f64(dy)
    if kind == "softmax":
        return y * (dy - (y * dy).sum(dim=dim, keepdim=True))
    if kind == "log_softmax":
        return dy - y.exp() * dy.sum(dim=dim, keepdim=True)
    if kind == "softmin":
        return -y * (dy - (y * dy).sum(dim=dim, keepdim=True))
    raise ValueError(kind)


def softmax_backward_magnitude(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: str) -> torch.Tensor:
    """Size of the terms each dx element is made from (|y|·(|dy| + |Σ y·dy|), or |dy| + e^y·|Σ dy|):
    the scale its rounding error is measured against, since dx itself can cancel to near zero."""
    y, dy = _f64(y), _f64(dy)
    if kind == "log_softmax":
        return dy.abs() + y.exp() * dy.sum(dim=dim, keepdim=True).abs()
    return y.abs() * (dy.abs() + (y * dy).sum(dim=dim, keepdim=True).abs())


FORWARD = {"softmax": softmax_ref, "log_softmax": log_softmax_ref, "softmin": softmin_ref}
