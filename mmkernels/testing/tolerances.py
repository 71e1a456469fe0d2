"""One tolerance table, keyed by (backend, dtype).

Errors are normwise against a float64 reference: ``max_rel = max|a - r| / max|r|`` and
``rms_rel = ||a - r||_2 / ||r||_2``. Both bounds must hold; a failed check is never a warning.
Backends: ``"cpu"`` (the CPU path) and ``"triton"`` (Triton on CUDA, or under the interpreter);
``"triton-tf32"``: fp32 results of Triton dots with TF32 operands (the sigma-pi kernels when
torch's matmul precision allows TF32: inputs rounded to 10-bit mantissas, as fp16's, products
summed in fp32).
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
TOLERANCES[("triton-tf32", torch.float32)] = _BY_DTYPE[torch.float16]


def tolerance(backend: str, dtype: torch.dtype) -> Tolerance:
    """The bound for results computed by ``backend`` and stored in ``dtype``."""
    try:
        return TOLERANCES[(backend, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for backend={backend!r}, dtype={dtype}") from None
