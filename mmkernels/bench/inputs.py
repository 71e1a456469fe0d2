"""Inputs of a case: fresh random draws (:func:`random_inputs`) and copies in the same layout
(:func:`copy_like`, for the buffer sets the timings rotate among)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mmkernels.family import Case, Inputs
from mmkernels.testing import make_inputs

from .environment import free_device_memory


#: On CUDA, cases above this many elements are drawn on the device (a float64 host draw of 2**31
#: elements takes tens of seconds); smaller ones use the registry's host generator as is.
DEVICE_DRAW_ABOVE = 1 << 24


def random_inputs(case: Case, device: torch.device, seed: int,
                  device_draw_above: Optional[int] = None) -> Inputs:
    """Fresh random inputs of ``case``: :func:`mmkernels.testing.make_inputs`, except that large
    cases (``numel > device_draw_above``, default :data:`DEVICE_DRAW_ABOVE` on CUDA, never on CPU)
    run the registry's own builder with a generator on ``device``: same distributions and layouts,
    different values."""
    limit = device_draw_above
    if limit is None:
        limit = DEVICE_DRAW_ABOVE if device.type == "cuda" else None
    if limit is None or math.prod(case.shape) <= limit:
        return make_inputs(case, device, seed)
    out = make_inputs(case, device, seed, generator_device=device)
    free_device_memory(device)
    return out


def copy_like(t: torch.Tensor) -> torch.Tensor:
    """Another buffer holding ``t``'s values in ``t``'s layout (zero strides included)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.clone(memory_format=torch.preserve_format)
    try:
        # dense non-overlapping layouts (transposed, permuted): empty_strided keeps them
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    except RuntimeError:
        # expanded (zero-stride) or sliced views: copy the storage window and view it alike
        base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).clone()
        return base.as_strided(t.shape, t.stride(), t.storage_offset())
