"""Softmax-family modules: drop-in replacements for ``torch.nn.Softmax``, ``LogSoftmax``, ``Softmin``."""
from __future__ import annotations

import warnings

import torch

from mmkernels.ops import softmax as _ops


def _legacy_dim(name: str, ndim: int) -> int:
    # torch's rule for modules built without dim= (deprecated there too)
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=3,
    )
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` computed by :func:`mmkernels.softmax`. Input ``(*)``, output ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_dim("softmax", input.dim())
        return _ops.softmax(input, dim)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` computed by :func:`mmkernels.log_softmax`. Input ``(*)``, output ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_dim("log_softmax", input.dim())
        return _ops.log_softmax(input, dim)


class Softmin(torch.nn.Softmin):
    """``torch.nn.Softmin`` computed by :func:`mmkernels.softmin`. Input ``(*)``, output ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_dim("softmin", input.dim())
        return _ops.softmin(input, dim)
