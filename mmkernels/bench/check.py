"""Correctness of one variant against its float64 reference (:func:`check_variant`: NaN-poisoned
run, every element of every output written, normwise error of each output on a bounded sample,
tolerance table) and its peak memory (:func:`peak_memory`)."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from mmkernels.family import CheckSample, Inputs, Variant, sample_index
from mmkernels.testing import error_report, poison_allocations, tolerance


def _take(t: torch.Tensor, d: Optional[int], idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if d is None else t.index_select(d, idx.to(t.device))


def _nonfinite_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """Positions where exactly one of ``a``, ``b`` is finite (an unwritten NaN shows here)."""
    return int((torch.isfinite(a) != torch.isfinite(b)).sum().item())


def _row_sample(variant: Variant, inputs: Inputs, shape: Sequence[int], max_elems: int,
                gen: torch.Generator) -> CheckSample:
    """The default sample: whole rows of the (single) output and of every input along one dim."""
    d, idx = sample_index(shape, variant.reduced_dims, max_elems, gen)
    return CheckSample({k: _take(v, d, idx) for k, v in inputs.items()}, variant.outputs,
                       lambda name, t: _take(t, d, idx))


def check_variant(variant: Variant, raw: Inputs, *, backend: str, max_elems: int = 1 << 22,
                  seed: int = 0) -> Dict[str, Any]:
    """Run ``ours`` once with its outputs poisoned with NaN and compare with the float64 reference.

    Over each whole output: every element is finite exactly where the eager baseline's is (an
    unwritten element stays NaN). On the samples of ``variant.check_samples`` (default: at most
    ``max_elems`` elements of whole reduced dims, always the first and last slice): normwise errors
    against the reference run in float64 on the CPU, within the (backend, dtype) bound of the
    tolerance table, for each output on its own scale. The baseline's error on the same sample is
    reported for comparison. A variant with several outputs also gets ``parts`` (the same numbers
    per output); the top-level errors are the worst part's.
    """
    inputs = variant.prepare(raw)
    with poison_allocations():
        ours = variant.named(variant.ours(inputs))
    base = variant.named(variant.baselines["eager"](inputs))
    mismatch = {n: _nonfinite_mismatch(ours[n], base[n]) for n in variant.outputs}
    gen = torch.Generator().manual_seed(seed)
    if variant.check_samples is not None:
        samples = variant.check_samples(inputs, max_elems, gen)
    else:
        samples = [_row_sample(variant, inputs, ours[variant.outputs[0]].shape, max_elems, gen)]
    taken = [({n: s.take(n, ours[n]).detach().cpu() for n in s.parts},
              {n: s.take(n, base[n]).detach().cpu() for n in s.parts}) for s in samples]
    del ours, base  # the reference may need the memory (2**31-element cases)
    parts: Dict[str, Dict[str, Any]] = {}
    for s, (ours_s, base_s) in zip(samples, taken):
        ref_inputs = {k: v.detach().to("cpu", torch.float64) for k, v in s.inputs.items()}
        if s.reference is None:
            ref = variant.named(variant.reference(ref_inputs))
        else:
            ref = variant.named(s.reference(ref_inputs), s.parts)
        del ref_inputs
        for n in s.parts:
            rep, rep_base = error_report(ours_s[n], ref[n]), error_report(base_s[n], ref[n])
            tol = tolerance(backend, ours_s[n].dtype)
            parts[n] = {
                "passed": bool(mismatch[n] == 0 and rep.special_mismatch == 0
                               and rep.max_rel <= tol.max_rel and rep.rms_rel <= tol.rms_rel),
                "max_rel": rep.max_rel,
                "rms_rel": rep.rms_rel,
                "nonfinite_mismatch": mismatch[n],
                "special_mismatch": rep.special_mismatch,
                "detail": rep.describe(),
                "tol_max_rel": tol.max_rel,
                "tol_rms_rel": tol.rms_rel,
                "sampled_elements": int(ref[n].numel()),
                "baseline_max_rel": rep_base.max_rel,
                "baseline_rms_rel": rep_base.rms_rel,
            }
    missing = [n for n in variant.outputs if n not in parts and n not in variant.unchecked]
    if missing:
        raise ValueError(f"{variant.label}: the check samples leave outputs {missing} unchecked")
    for n, why in variant.unchecked.items():  # finiteness only, and the reason in the report
        parts.setdefault(n, {"passed": mismatch[n] == 0, "max_rel": 0.0, "rms_rel": 0.0,
                             "nonfinite_mismatch": mismatch[n], "special_mismatch": 0,
                             "detail": f"not compared with the reference: {why}", "tol_max_rel": 1.0,
                             "tol_rms_rel": 1.0, "sampled_elements": 0, "baseline_max_rel": 0.0,
                             "baseline_rms_rel": 0.0})
    order = [parts[n] for n in variant.outputs]
    def excess(p):  # error over its bound (an exact part: 0 when exact, inf otherwise)
        return p["max_rel"] / p["tol_max_rel"] if p["tol_max_rel"] else (0.0 if p["max_rel"] == 0 else math.inf)

    worst = max(order, key=excess)
    out = {
        "passed": all(p["passed"] for p in order),
        "backend": backend,
        "max_rel": max(p["max_rel"] for p in order),
        "rms_rel": max(p["rms_rel"] for p in order),
        "nonfinite_mismatch": sum(p["nonfinite_mismatch"] for p in order),
        "special_mismatch": sum(p["special_mismatch"] for p in order),
        "detail": worst["detail"] if len(order) == 1 else "; ".join(
            f"{n}{'' if parts[n]['passed'] else ' FAILED'}: {parts[n]['detail']}" for n in variant.outputs),
        "tol_max_rel": worst["tol_max_rel"],
        "tol_rms_rel": worst["tol_rms_rel"],
        "sampled_elements": sum(p["sampled_elements"] for p in order),
        "baseline_max_rel": max(p["baseline_max_rel"] for p in order),
        "baseline_rms_rel": max(p["baseline_rms_rel"] for p in order),
    }
    if len(order) > 1:
        out["parts"] = parts
    return out


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Within the block, the process's stdout and stderr file descriptors go to ``/dev/null``:
    torch's profiler (kineto) prints ``USDT: ... profiler_start`` / ``profiler_stop`` lines from
    C++ each time it starts and stops, which no Python setting turns off. The main job's output
    is progress and tables only."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(devnull)


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

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
