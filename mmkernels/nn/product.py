"""Product units, sigma-pi units with sparse conjuncts and the pi-sigma network as modules."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from mmkernels.ops import product as _ops


class ProductUnit(torch.nn.Module):
    """``o = v · p``, ``p_j = Π_i x_i^{w_ji}`` (:func:`mmkernels.product_unit`): ``(..., in_features)``
    → ``(..., out_features)`` (or ``(..., units)`` with ``out_features=None``). ``weight`` (units,
    in_features) are the exponents, drawn from ``N(0, 1/in_features)``; ``out_weight`` (out, units)
    as ``nn.Linear``'s."""

    def __init__(self, in_features: int, units: int, out_features: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(units, in_features, **kw))
        self.out_weight = (torch.nn.Parameter(torch.empty(out_features, units, **kw)) if out_features is not None
                           else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
        if self.out_weight is not None:
            torch.nn.init.kaiming_uniform_(self.out_weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.product_unit(x, self.weight, self.out_weight)

    def extra_repr(self) -> str:
        out = None if self.out_weight is None else self.out_weight.shape[0]
        return f"in_features={self.weight.shape[1]}, units={self.weight.shape[0]}, out_features={out}"


class SigmaPi(torch.nn.Module):
    """``o_k = g(Σ_q w_kq Π_{i∈q} z_i + b_k)`` over fixed ``conjuncts`` (a ``(Q, m)`` index tensor,
    ``-1`` padding; :func:`mmkernels.sigma_pi_unit`), kept as a buffer."""

    def __init__(self, conjuncts: torch.Tensor, out_features: int, bias: bool = True,
                 activation: Union[str, Callable, None] = None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("conjuncts", torch.as_tensor(conjuncts, dtype=torch.int64, device=device).clone())
        Q = self.conjuncts.shape[0]
        self.weight = torch.nn.Parameter(torch.empty(out_features, Q, **kw))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.activation = activation
        bound = 1 / math.sqrt(max(Q, 1))
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _ops.sigma_pi_unit(z, self.conjuncts, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"conjuncts={self.conjuncts.shape[0]}, out_features={self.weight.shape[0]}, activation={self.activation!r}"


class PiSigma(torch.nn.Module):
    """Pi-sigma network ``o_k = g(Π_s (w_ks·z + b_ks))`` (:func:`mmkernels.pi_sigma`): ``weight``
    (out_features, sums, in_features), ``bias`` (out_features, sums); ``g`` sigmoid by default."""

    def __init__(self, in_features: int, sums: int, out_features: int, bias: bool = True,
                 activation: Union[str, Callable, None] = "sigmoid", device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(out_features, sums, in_features, **kw))
        self.bias = torch.nn.Parameter(torch.empty(out_features, sums, **kw)) if bias else None
        self.activation = activation
        bound = 1 / math.sqrt(in_features)
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _ops.pi_sigma(z, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        K, S, n = self.weight.shape
        return f"in_features={n}, sums={S}, out_features={K}, activation={self.activation!r}"
