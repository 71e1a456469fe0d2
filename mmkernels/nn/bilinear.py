"""Sigma-pi modules: a drop-in ``torch.nn.Bilinear``, the quadratic layer and the hyper-linear layer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmkernels.ops import bilinear as _ops


class Bilinear(torch.nn.Bilinear):
    """``torch.nn.Bilinear`` computed by :func:`mmkernels.bilinear` (same constructor, parameters,
    init and ``state_dict``). Inputs ``(*, in1_features)`` and ``(*, in2_features)``, output
    ``(*, out_features)``."""

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        return _ops.bilinear(input1, input2, self.weight, self.bias)


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    torch.nn.init.uniform_(t, -bound, bound)


class Quadratic(torch.nn.Module):
    r"""The quadratic layer (docs/modules.md): ``y[..., j] = Σ_{i ≤ k} W[j, (i, k)] · x[..., i] · x[..., k] + b[j]``.

    The ``c(c+1)/2`` products ``x_i·x_k`` (``i ≤ k``) are the features; ``weight`` is
    ``(out_features, c(c+1)/2)`` in ``torch.triu_indices(c, c)`` order. Computed by
    :func:`mmkernels.quadratic`: the bilinear kernels with ``z = x`` reading the packed weight as
    it is (never scattered into ``(d, c, c)``); the ``N × c²`` products are never formed.
    Input ``(*, in_features)``, output ``(*, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features * (in_features + 1) // 2, **kw))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.register_buffer("_triu", torch.triu_indices(in_features, in_features, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.weight, self.weight.shape[1])
        if self.bias is not None:
            _uniform_(self.bias, self.weight.shape[1])

    def full_weight(self) -> torch.Tensor:
        """The ``(out_features, c, c)`` bilinear weight: ``weight`` on the upper triangle, 0 below
        (for inspection and references; ``forward`` never forms it)."""
        c = self.in_features
        full = self.weight.new_zeros(self.out_features, c, c)
        rows = torch.arange(self.out_features, device=full.device)[:, None]
        return full.index_put((rows, self._triu[0][None, :], self._triu[1][None, :]), self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _ops.quadratic(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class HyperLinear(torch.nn.Module):
    r"""Parameter transformation (a hypernetwork layer, docs/modules.md): ``y = x · W(z)ᵀ + b`` with per-sample weights
    ``W(z) = W0 + Σ_h z_h U_h`` that are never formed.

    ``weight`` is ``W0`` ``(out_features, in_features)`` (as ``nn.Linear``), ``hyper_weight`` is
    ``U`` ``(out_features, cond_features, in_features)``; the ``Σ_h z_h U_h`` part is the bilinear
    kernel (``bilinear(z, x, U)``), ``W0`` a plain linear. Inputs ``input (*, in_features)`` and
    ``cond (*, cond_features)`` with the same batch shape; output ``(*, out_features)``.
    """

    def __init__(self, cond_features: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cond_features, self.in_features, self.out_features = cond_features, in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.hyper_weight = torch.nn.Parameter(torch.empty(out_features, cond_features, in_features, **kw))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.weight, self.in_features)
        _uniform_(self.hyper_weight, self.in_features * max(1, self.cond_features))
        if self.bias is not None:
            _uniform_(self.bias, self.in_features)

    def forward(self, input: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return _ops.bilinear(cond, input, self.hyper_weight, self.bias) + F.linear(input, self.weight)

    def extra_repr(self) -> str:
        return (f"cond_features={self.cond_features}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")
