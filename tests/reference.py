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


def bilinear_ref(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """y[..., j] = Σ_h Σ_i z[..., h] x[..., i] w[j, h, i] + bias[j], as a float64 einsum."""
    y = torch.einsum("...h,...i,jhi->...j", _f64(z), _f64(x), _f64(w))
    return y + _f64(bias) if bias is not None else y


def bilinear_grads_ref(z, x, w, dy):
    """(dz, dx, dw, db) of bilinear_ref for the incoming gradient dy, as float64 einsums."""
    z, x, w, dy = _f64(z), _f64(x), _f64(w), _f64(dy)
    dz = torch.einsum("...j,...i,jhi->...h", dy, x, w)
    dx = torch.einsum("...j,...h,jhi->...i", dy, z, w)
    dw = torch.einsum("...j,...h,...i->jhi", dy, z, x)
    db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dz, dx, dw, db


def _f64_grad(t: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU, keeping autograd history (for references differentiated by autograd)."""
    return t.to("cpu", torch.float64)


def quadratic_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """y[..., j] = Σ_{i<=k} weight[j, p(i,k)] x[..., i] x[..., k] + bias[j], p in triu_indices order.
    Differentiable (autograd gives the reference gradients)."""
    x, weight = _f64_grad(x), _f64_grad(weight)
    c = x.shape[-1]
    feats = [x[..., i] * x[..., k] for i in range(c) for k in range(i, c)]
    y = torch.stack(feats, -1) @ weight.t()
    return y + _f64_grad(bias) if bias is not None else y


def hyperlinear_ref(x, cond, weight, hyper_weight, bias=None):
    """y[n] = W(z[n]) x[n] + b with the per-sample weight W(z) = W0 + Σ_h z_h U_h formed explicitly.
    Differentiable (autograd gives the reference gradients)."""
    x, cond, weight, hyper_weight = (_f64_grad(t) for t in (x, cond, weight, hyper_weight))
    per_sample = weight + torch.einsum("...h,ohi->...oi", cond, hyper_weight)
    y = torch.einsum("...oi,...i->...o", per_sample, x)
    return y + _f64_grad(bias) if bias is not None else y


def bilinear_magnitudes(z, x, w, dy):
    """(y, dz, dx, dw, db) of the absolute values: the size of the terms each result element sums,
    the scale its rounding error is measured against (a result can cancel to near zero)."""
    za, xa, wa, dya = (_f64(t).abs() for t in (z, x, w, dy))
    return (bilinear_ref(za, xa, wa),) + bilinear_grads_ref(za, xa, wa, dya)
