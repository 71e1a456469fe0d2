"""Correctness of one variant against its float64 reference (:func:`check_variant`: NaN-poisoned
run, every element written, normwise error on a bounded sample of whole rows, tolerance table) and
its peak memory (:func:`peak_memory`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from mmkernels.testing import error_report, poison_allocations, tolerance

from .inputs import Inputs
from .specs import Variant


def _sample_index(shape: Sequence[int], keep: Sequence[int], max_elems: int,
                  gen: torch.Generator) -> Tuple[Optional[int], Optional[torch.Tensor]]:
    """A dim to subsample and the indices to keep (first, last and random ones) so that the
    sample holds about ``max_elems`` elements (at least two slices: the dims in ``keep`` stay
    whole); (None, None) when everything fits."""
    numel = math.prod(shape)
    if numel <= max_elems:
        return None, None
    free = [d for d in range(len(shape)) if d not in keep and shape[d] > 1]
    if not free:
        return None, None
    d = max(free, key=lambda i: shape[i])
    per = numel // shape[d]
    k = max(2, min(shape[d], max_elems // max(per, 1)))
    middle = torch.randperm(shape[d] - 2, generator=gen)[: k - 2] + 1 if shape[d] > 2 else torch.empty(0, dtype=torch.long)
    idx = torch.cat([torch.tensor([0, shape[d] - 1]), middle]).unique().sort().values
    return d, idx


def _take(t: torch.Tensor, d: Optional[int], idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if d is None else t.index_select(d, idx.to(t.device))


def _nonfinite_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """Positions where exactly one of ``a``, ``b`` is finite (an unwritten NaN shows here)."""
    return int((torch.isfinite(a) != torch.isfinite(b)).sum().item())


def check_variant(variant: Variant, raw: Inputs, *, backend: str, max_elems: int = 1 << 22,
                  seed: int = 0) -> Dict[str, Any]:
    """Run ``ours`` once with its outputs poisoned with NaN and compare with the float64 reference.

    Over the whole output: every element is finite exactly where the eager baseline's is (an
    unwritten element stays NaN). On a sample of at most ``max_elems`` elements (whole reduced
    dims; always the first and last slice): normwise errors against ``variant.reference`` run in
    float64 on the CPU, within the (backend, dtype) bound of the tolerance table. The baseline's
    error on the same sample is reported for comparison.
    """
    inputs = variant.prepare(raw)
    with poison_allocations():
        ours = variant.ours(inputs)
    base = variant.baselines["eager"](inputs)
    mismatch = _nonfinite_mismatch(ours, base)
    gen = torch.Generator().manual_seed(seed)
    d, idx = _sample_index(ours.shape, variant.reduced_dims, max_elems, gen)
    ours_s = _take(ours, d, idx).cpu()
    base_s = _take(base, d, idx).cpu()
    del ours, base
    ref = variant.reference({k: _take(v, d, idx).to("cpu", torch.float64) for k, v in inputs.items()})
    rep = error_report(ours_s, ref)
    rep_base = error_report(base_s, ref)
    tol = tolerance(backend, ours_s.dtype)
    passed = (mismatch == 0 and rep.special_mismatch == 0
              and rep.max_rel <= tol.max_rel and rep.rms_rel <= tol.rms_rel)
    return {
        "passed": bool(passed),
        "backend": backend,
        "max_rel": rep.max_rel,
        "rms_rel": rep.rms_rel,
        "nonfinite_mismatch": mismatch,
        "special_mismatch": rep.special_mismatch,
        "detail": rep.describe(),
        "tol_max_rel": tol.max_rel,
        "tol_rms_rel": tol.rms_rel,
        "sampled_elements": int(ref.numel()),
        "baseline_max_rel": rep_base.max_rel,
        "baseline_rms_rel": rep_base.rms_rel,
    }


def peak_memory(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[int], str]:
    """Peak bytes allocated above what was live before one call of ``fn`` (its output included).

    CUDA: ``torch.cuda.max_memory_allocated`` delta. CPU: the running sum of the allocation and
    free events that ``torch.profiler`` (``profile_memory=True``) records for the call.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak), "cuda max_memory_allocated delta, output included"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # private layout of the profiler changed: say so rather than guess
        return None, "unavailable (torch.profiler memory events not readable)"
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak), "cpu profiler allocation events, peak live, output included"
