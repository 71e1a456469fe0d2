"""Loss modules: drop-in replacements for ``torch.nn`` losses computed by fused kernels."""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels.ops import cross_entropy as _ce
from mmkernels.ops import linear_cross_entropy as _lce


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`mmkernels.cross_entropy` (logits ``(N, C)``
    or ``(C,)``, integer targets ``(N,)`` / ``()``, optional class weights ``(C,)``; output 0-dim,
    or ``(N,)`` for ``reduction="none"``).

    Adds ``z_loss_scale``, ``softcap`` and ``inplace_backward`` (the gradient written into the
    logits' storage), as the functional.
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, z_loss_scale: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss_scale = z_loss_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _ce.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing,
                                 z_loss_scale=self.z_loss_scale, softcap=self.softcap,
                                 inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` (an output layer ``self.linear`` and its loss) computed by
    :func:`mmkernels.linear_cross_entropy`: the ``(tokens, num_classes)`` logits never held whole.
    Same parameters and ``state_dict`` keys; input ``(*, in_features)``, target ``(*)``; output
    0-dim, or ``(*)`` for ``reduction="none"``.

    Adds ``z_loss_scale`` (``zs·lse²`` per token), ``softcap`` (logits ``cap·tanh(u/cap)``),
    ``return_target_logprob`` (forward returns ``(loss, target log-probability)``) and
    ``chunk_tokens``. ``out_features`` (K-dimensional losses) and ``options`` are not supported.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, device=None, dtype=None,
                 reduction: str = "mean", weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, z_loss_scale: float = 0.0, softcap: Optional[float] = None,
                 return_target_logprob: bool = False, chunk_tokens: Optional[int] = None) -> None:
        super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype, reduction=reduction,
                         weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
        self.z_loss_scale = z_loss_scale
        self.softcap = softcap
        self.return_target_logprob = return_target_logprob
        self.chunk_tokens = chunk_tokens

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return _lce.linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss_scale=self.z_loss_scale, softcap=self.softcap, return_target_logprob=self.return_target_logprob,
            chunk_tokens=self.chunk_tokens)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss_scale={self.z_loss_scale}, softcap={self.softcap}")
