"""Loss modules: drop-in replacements for ``torch.nn`` losses computed by fused kernels."""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels.ops import cross_entropy as _ce


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`mmkernels.cross_entropy` (logits ``(N, C)``
    or ``(C,)``, integer targets ``(N,)`` / ``()``; output 0-dim, or ``(N,)`` for
    ``reduction="none"``). Class weights are not supported (``weight`` must be None).

    ``inplace_backward=True`` writes the gradient into the logits' storage (see the functional).
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                 inplace_backward: bool = False) -> None:
        if weight is not None:
            raise ValueError("mmkernels.nn.CrossEntropyLoss does not support class weights (weight=...); "
                             "use torch.nn.CrossEntropyLoss for them")
        super().__init__(None, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _ce.cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward)
