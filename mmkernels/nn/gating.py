"""Gated fusion module (docs/modules.md)."""
from __future__ import annotations

import torch

from mmkernels.ops import gating as _ops


class GatedFusion(torch.nn.Linear):
    """``out = g·a + (1 - g)·b`` with the gate ``g = σ(Linear(2D → D)([a, b]))``
    (:func:`mmkernels.gated_fusion`). ``forward(a, b)``: ``a, b (..., D)`` → ``(..., D)``.

    A ``torch.nn.Linear(2·dim, dim)``: its ``weight`` (D, 2D), ``bias``, init and ``state_dict``
    are the gate's."""

    def __init__(self, dim: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(2 * dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _ops.gated_fusion(a, b, self.weight, self.bias)
