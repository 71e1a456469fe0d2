"""One tolerance table, keyed by (backend, dtype).

Errors are normwise against a float64 reference: ``max_rel = max|a - r| / max|r|`` and
``rms_rel = ||a - r||_2 / ||r||_2``. Both bounds must hold; a failed check is never a warning.
Backends: ``"cpu"`` (the CPU path) and ``"triton"`` (Triton on CUDA, or under the interpreter).
Triton's fp32 ``tl.dot`` is TF32 on GPUs, which the matmul families will key on here.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    max_rel: float
    rms_rel: float


_BY_DTYPE = {
    torch.float64: Tolerance(1e-12, 1e-13),
    torch.float32: Tolerance(1e-5, 3e-6),
    torch.float16: Tolerance(4e-3, 1e-3),
    torch.bfloat16: Tolerance(3e-2, 8e-3),
}

#: Integer and boolean results (indices, counts, masks) must be exact.
_EXACT = {dtype: Tolerance(0.0, 0.0) for dtype in (torch.int32, torch.int64, torch.bool)}

TOLERANCES: Dict[Tuple[str, torch.dtype], Tolerance] = {
    (backend, dtype): tol for backend in ("cpu", "triton") for dtype, tol in {**_BY_DTYPE, **_EXACT}.items()
}


def tolerance(backend: str, dtype: torch.dtype) -> Tolerance:
    """The bound for results computed by ``backend`` and stored in ``dtype``."""
    try:
        return TOLERANCES[(backend, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for backend={backend!r}, dtype={dtype}") from None
