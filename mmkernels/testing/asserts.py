"""Compare a result with a float64 reference and say exactly where it is wrong."""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from mmkernels.testing.tolerances import Tolerance, tolerance


@dataclasses.dataclass
class ErrorReport:
    max_rel: float
    rms_rel: float
    worst_index: Optional[Tuple[int, ...]]
    worst_actual: float
    worst_expected: float
    special_mismatch: int  # positions where NaN / ±inf disagree

    def describe(self) -> str:
        s = f"max_rel={self.max_rel:.3e} rms_rel={self.rms_rel:.3e}"
        if self.worst_index is not None:
            s += f" worst at {self.worst_index}: got {self.worst_actual!r}, expected {self.worst_expected!r}"
        if self.special_mismatch:
            s += f"; {self.special_mismatch} NaN/inf positions differ"
        return s


def error_report(actual: torch.Tensor, expected: torch.Tensor,
                 magnitude: Optional[torch.Tensor] = None) -> ErrorReport:
    """Normwise errors of ``actual`` against ``expected`` (computed in float64 on CPU).

    Errors are relative to ``expected`` itself, or to ``magnitude`` when given: the size of the
    terms that were summed to make each element (for a result that cancels, such as a softmax
    gradient, ``|expected|`` can be far smaller than the rounding of the terms it came from)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: got {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    r = expected.detach().to("cpu", torch.float64)
    a_fin, r_fin = torch.isfinite(a), torch.isfinite(r)
    # non-finite values must match exactly (NaN with NaN, +inf with +inf, ...)
    special = (a_fin != r_fin) | (~r_fin & ~((a == r) | (torch.isnan(a) & torch.isnan(r))))
    both = a_fin & r_fin
    diff = torch.where(both, (a - r).abs(), torch.zeros_like(a))
    rz = torch.where(both, r, torch.zeros_like(r))
    if magnitude is not None:
        mag = magnitude.detach().to("cpu", torch.float64).expand(r.shape)
        rz = torch.where(both & torch.isfinite(mag), mag.abs().maximum(rz.abs()), torch.zeros_like(r))
    scale = rz.abs().max().item() if rz.numel() else 0.0
    norm = rz.norm().item() if rz.numel() else 0.0
    if diff.numel():
        flat = int(torch.argmax(diff).item())
        worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        worst_a, worst_r = a.reshape(-1)[flat].item(), r.reshape(-1)[flat].item()
        max_abs, rms_abs = diff.max().item(), diff.norm().item()
    else:
        worst, worst_a, worst_r, max_abs, rms_abs = None, float("nan"), float("nan"), 0.0, 0.0
    tiny = torch.finfo(torch.float64).tiny
    return ErrorReport(
        max_rel=max_abs / max(scale, tiny) if max_abs else 0.0,
        rms_rel=rms_abs / max(norm, tiny) if rms_abs else 0.0,
        worst_index=worst,
        worst_actual=worst_a,
        worst_expected=worst_r,
        special_mismatch=int(special.sum().item()),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, backend: str,
                 dtype: Optional[torch.dtype] = None, tol: Optional[Tolerance] = None,
                 magnitude: Optional[torch.Tensor] = None, what: str = "") -> ErrorReport:
    """Raise AssertionError unless ``actual`` matches ``expected`` within the (backend, dtype) bound.

    ``dtype`` defaults to ``actual.dtype``; ``tol`` overrides the table (say why where you use it);
    ``magnitude``: see :func:`error_report`.
    """
    tol = tol or tolerance(backend, dtype or actual.dtype)
    rep = error_report(actual, expected, magnitude)
    if rep.special_mismatch or rep.max_rel > tol.max_rel or rep.rms_rel > tol.rms_rel:
        raise AssertionError(
            f"{what or 'result'} ({backend}, {dtype or actual.dtype}) out of tolerance "
            f"(max_rel<={tol.max_rel:.1e}, rms_rel<={tol.rms_rel:.1e}): {rep.describe()}"
        )
    return rep


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Raise AssertionError unless the two tensors hold the same bits (NaN payloads and the sign of
    zero included): what a rerun of a deterministic kernel must give."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise AssertionError(f"{what or 'result'}: {actual.dtype} {tuple(actual.shape)} against "
                             f"{expected.dtype} {tuple(expected.shape)}")
    if actual.dtype.is_floating_point or actual.dtype.is_complex:
        as_int = _SAME_SIZE_INT[actual.element_size()]
        actual, expected = actual.contiguous().view(as_int), expected.contiguous().view(as_int)
    differ = int((actual != expected).sum())
    if differ:
        raise AssertionError(f"{what or 'result'}: {differ} of {actual.numel()} elements differ in their bits")
