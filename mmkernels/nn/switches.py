"""Switch modules of the seeds: the attention module / soft switch and the hard switch."""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels.ops import attention as _ops


class AttentionModule(torch.nn.Module):
    """``s = Σ_j softmax(z/τ)_j · x_j`` (:func:`mmkernels.attention_module`): ``forward(z, x, mask=None)``
    with ``z (..., J)``, ``x (..., J, D)``, optional bool ``mask`` broadcastable to ``z``; returns
    ``(..., D)``. No parameters: ``z`` comes from the caller's scoring layer."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _ops.check_temperature(temperature)

    def forward(self, z: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ops.attention_module(z, x, mask, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


#: The soft switch is the attention module (docs/modules.md).
SoftSwitch = AttentionModule


class HardSwitch(torch.nn.Module):
    """``x[..., argmax z, :]`` (:func:`mmkernels.hard_switch`); ``straight_through=True`` gives
    ``z`` the soft switch's gradient at ``temperature``."""

    def __init__(self, straight_through: bool = False, temperature: float = 1.0) -> None:
        super().__init__()
        self.straight_through = bool(straight_through)
        self.temperature = _ops.check_temperature(temperature)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _ops.hard_switch(z, x, self.straight_through, self.temperature)

    def extra_repr(self) -> str:
        return f"straight_through={self.straight_through}, temperature={self.temperature}"
