"""Argument checks shared by the op families: clear ``TypeError`` / ``ValueError`` naming the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cpu or t.is_cuda):  # flags, not a device object: every op call runs this
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def check_dim(dim, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor (expected {lo}..{hi})")
    return dim % max(ndim, 1)


def check_float_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in FLOATS:
        raise TypeError(f"{name} must be one of float16, bfloat16, float32, float64; got {dtype}")
    return dtype


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str) -> None:
    """All ``tensors`` share ``what`` (``"dtype"`` or ``"device"``); else a TypeError / ValueError
    naming each argument with its value."""
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values[1:]):
        listing = ", ".join(f"{n}: {v}" for n, v in zip(names, values))
        exc = TypeError if what == "dtype" else ValueError
        raise exc(f"{', '.join(names)} must have the same {what}, got {listing}")


def check_scalar(name: str, value, low: float, high: float = float("inf")) -> float:
    """``value`` as a float in ``[low, high]``, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a float in [{low}, {high}], got {value!r}")
    return float(value)


def check_softcap(softcap) -> float:
    """The soft-cap as the kernels take it: 0.0 for None, else a finite float > 0."""
    if softcap is None:
        return 0.0
    cap = check_scalar("softcap", softcap, 0.0)
    if cap == 0.0 or cap == float("inf"):
        raise ValueError(f"softcap must be a finite float > 0 (or None), got {softcap!r}")
    return cap


def class_weights(weight, C: int, input: torch.Tensor):
    """Optional ``(C,)`` class weights checked against the logits' ``input`` and returned detached,
    contiguous, in the math dtype the kernels read (float64 for float64 input, else float32)."""
    if weight is None:
        return None
    check_tensor("weight", weight)
    if not weight.dtype.is_floating_point or tuple(weight.shape) != (C,) or weight.device != input.device:
        raise ValueError(f"weight must be a float ({C},) tensor on {input.device}, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    return weight.detach().to(torch.float64 if input.dtype == torch.float64 else torch.float32).contiguous()

