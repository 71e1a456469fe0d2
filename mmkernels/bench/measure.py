"""The measurement loop: :class:`MeasureOptions`; :func:`measure_cases` -> :func:`measure_case`
(checks on one random draw, then timings on another) -> :func:`measure_variant` (one result row);
:func:`variants_for` (a case's variants, from its family's bench spec) and :func:`evaluate_targets`
(PASS / FAIL / NO DATA of the families' acceptance targets over the rows)."""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from mmkernels import _backend, _cpp
from mmkernels.family import Case, Inputs, Target, Variant

from .check import check_variant, peak_memory, quiet_profiler
from .environment import cache_bytes, free_device_memory
from .inputs import copy_like, random_inputs
from .timing import rotation_sets, time_fn, time_interleaved


@dataclasses.dataclass(frozen=True)
class MeasureOptions:
    """How :func:`measure_case` measures.

    ``repeats`` fixes the samples per timing; else they fill ``target_s`` within
    ``[min_repeats, max_repeats]``, and on CPU a row whose samples spread more than
    ``settle_spread`` (quartiles over median) takes more for up to ``settle_s`` (timing.py
    :func:`time_interleaved`; 0: never). ``graph``: replay CUDA graphs for sub-millisecond calls.
    ``eager_timing``: on CUDA also time ours and the eager baseline call by call (launch overhead
    included), stored as ``*_percall_ms``. ``check_max_elems`` bounds the reference sample.
    """

    repeats: Optional[int] = None
    warmup: int = 3
    target_s: float = 0.2
    min_repeats: int = 5
    max_repeats: int = 100
    settle_spread: float = 0.0
    settle_s: float = 0.0
    graph: bool = True
    eager_timing: bool = False
    compile_baseline: bool = False
    memory: bool = True
    check_max_elems: int = 1 << 22
    max_sets: int = 16
    device_draw_above: Optional[int] = None
    seed: int = 0

    def timing_kwargs(self) -> Dict[str, Any]:
        return dict(warmup=self.warmup, repeats=self.repeats, target_s=self.target_s,
                    min_repeats=self.min_repeats, max_repeats=self.max_repeats)

    def interleaved_kwargs(self) -> Dict[str, Any]:
        """:meth:`timing_kwargs` and the settling of the CPU's interleaved timings."""
        return dict(self.timing_kwargs(), settle_spread=self.settle_spread, settle_s=self.settle_s)


def variants_for(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """The variants (e.g. forward and backward) of ``case``, from its family's bench spec. On CPU,
    a family with C++ kernels also gets the ``torch_path`` baseline: ours on the vectorised-torch
    CPU path, to show what the C++ kernels buy (when they are built)."""
    from mmkernels.families import family

    fam = family(case.family)
    out = fam.variants(case, compile_baseline)
    if fam.cpp_ops and "gpu" not in case.tags and _cpp.load():
        for v in out:
            v.baselines["torch_path"] = _on_torch_path(v.ours)
    return out


def all_targets() -> List[Target]:
    """Every family's acceptance targets."""
    from mmkernels.families import FAMILIES

    return [t for fam in FAMILIES.values() for t in fam.targets()]


def _on_torch_path(fn):
    def call(i: Inputs):
        with _cpp.use_cpu_impl("torch"):
            return fn(i)
    return call


def count_launches(fn, device: torch.device) -> Optional[int]:
    """GPU kernels one call of ``fn`` launches (torch.profiler's CUDA activity, memcpy / memset
    left out); None off CUDA or when the profiler cannot say."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize(device)
        with quiet_profiler(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.lower().startswith(("memcpy", "memset"))]
        return len(kernels)
    except Exception:  # noqa: BLE001 - a profiler that cannot run leaves the count unknown
        return None


def _case_row(case: Case) -> Dict[str, Any]:
    return {
        "family": case.family, "op": case.op, "case": case.id, "shape": list(case.shape),
        "dim": case.params.get("dim"), "dtype": str(case.dtype).replace("torch.", ""),
        "params": dict(case.params), "layouts": dict(case.layouts),
    }


def _add_rate(row: Dict[str, Any], amount: float, unit: float, rate: str, ceiling: Optional[float],
              frac: str, floor: str) -> None:
    """``row[rate]``: ``amount`` (bytes or FLOPs) per second of ours in ``unit`` (1e9: GB/s, 1e12:
    TFLOP/s), ``row["baseline_" + rate]`` the same per baseline; with a ``ceiling`` (same unit),
    ``row[frac]`` (and per baseline) the fraction of it and ``row[floor]`` the time at it (ms)."""
    row[rate] = amount / (row["ours_ms"] * 1e-3) / unit
    row[f"baseline_{rate}"] = {k: amount / (v * 1e-3) / unit for k, v in row["baseline_ms"].items()}
    if ceiling:
        row[frac] = row[rate] / ceiling
        row[f"baseline_{frac}"] = {k: v / ceiling for k, v in row[f"baseline_{rate}"].items()}
        row[floor] = amount / (ceiling * unit) * 1e3


def rescore(rows: Sequence[Dict[str, Any]], ceilings: Mapping[str, Any]) -> None:
    """Recompute every row's fractions of the ceilings (after :func:`ceilings.best_of`); rows of
    a case that crashed (``error``) have no time and are left as they are."""
    for row in rows:
        if "error" in row:
            continue
        _add_rate(row, row["bytes"], 1e9, "GBps", ceilings["copy"]["GBps"], "frac_copy", "floor_ms")
        if row.get("flops") is not None:
            _add_rate(row, row["flops"], 1e12, "TFLOPs", ceilings["mm"]["TFLOPs"], "frac_mm", "mm_floor_ms")


def measure_variant(variant: Variant, sets: Sequence[Inputs], check: Mapping[str, Any], device: torch.device,
                    ceilings: Optional[Mapping[str, Any]], opts: MeasureOptions) -> Dict[str, Any]:
    """Time one variant on the input ``sets`` (rotated) and build its result row around ``check``
    (from :func:`check_variant`); see :func:`result_table` for the columns. Where the variant has
    ``flops`` (matmul families), the row also holds ``TFLOPs`` (useful FLOPs / time), ``frac_mm``
    (that over the measured mm rate) and ``mm_floor_ms``, and the same per baseline."""
    row = _case_row(variant.case)
    row.update(direction=variant.direction, label=variant.label, bytes=variant.bytes_moved,
               passes=variant.passes, impl=check.get("backend"), check=dict(check))
    if variant.shape_text:
        row["shape_text"] = variant.shape_text
    if variant.flops is not None:
        row["flops"] = variant.flops
    prepared = [variant.prepare(s) for s in sets]
    kw = opts.timing_kwargs()

    def calls(fn):
        return [functools.partial(fn, p) for p in prepared]

    if device.type == "cuda":
        timings = {"ours": time_fn(calls(variant.ours), device, graph=opts.graph, **kw)}
        for name, fn in variant.baselines.items():
            try:
                timings[name] = time_fn(calls(fn), device, graph=opts.graph, **kw)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                row.setdefault("baseline_errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:  # CPU: ours and the baselines sampled in turn (time_interleaved)
        named = {"ours": calls(variant.ours)}
        for name, fn in variant.baselines.items():
            try:
                fn(prepared[0])
                named[name] = calls(fn)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                row.setdefault("baseline_errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        timings = time_interleaved(named, **opts.interleaved_kwargs())
    if opts.eager_timing and device.type == "cuda":
        for name, fn in (("ours", variant.ours), ("eager", variant.baselines["eager"])):
            row[f"{name}_percall_ms"] = time_fn(calls(fn), device, graph=False, **kw).median_ms
    row["timings"] = {k: t.to_json() for k, t in timings.items()}
    ours_ms = timings["ours"].median_ms
    row["ours_ms"] = ours_ms
    row["baseline_ms"] = {k: t.median_ms for k, t in timings.items() if k != "ours"}
    row["ratio"] = row["baseline_ms"]["eager"] / ours_ms if "eager" in row["baseline_ms"] else None
    for name, ms in row["baseline_ms"].items():
        if name != "eager":  # e.g. ratio_compile
            row[f"ratio_{name}"] = ms / ours_ms
    row["launches"] = count_launches(functools.partial(variant.ours, prepared[0]), device)
    _add_rate(row, variant.bytes_moved, 1e9, "GBps", ceilings and ceilings["copy"]["GBps"], "frac_copy", "floor_ms")
    if variant.flops is not None:
        _add_rate(row, variant.flops, 1e12, "TFLOPs", ceilings and ceilings["mm"]["TFLOPs"], "frac_mm",
                  "mm_floor_ms")
    if opts.memory:
        p = prepared[0]
        if device.type == "cpu":  # the C++ ops' pooled tensors are allocated again, so counted
            _cpp.empty_cache()
        row["peak_bytes"], row["memory_method"] = peak_memory(lambda: variant.ours(p), device)
        row["baseline_peak_bytes"], _ = peak_memory(lambda: variant.baselines["eager"](p), device)
    del prepared
    return row


def measure_case(case: Case, device: torch.device, ceilings: Optional[Mapping[str, Any]],
                 opts: MeasureOptions, name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every variant of ``case`` (those whose ``"<case id> <op> <direction>"`` contains every word
    of ``name_filter``), in two phases so that large cases hold one input draw at a time:

    1. checks (:func:`check_variant`) on a fresh random draw;
    2. timings on another draw, copied into :func:`rotation_sets` buffer sets when it fits in cache.

    A variant that raises becomes a failed row (``error``)."""
    variants = [v for v in variants_for(case, compile_baseline=opts.compile_baseline)
                if _matches(v, name_filter)]
    if not variants:
        return []
    backend = _backend.resolve(device).value
    checks: Dict[str, Dict[str, Any]] = {}
    crashed: Dict[str, Dict[str, Any]] = {}
    check_raw = random_inputs(case, device, seed=opts.seed + 1000, device_draw_above=opts.device_draw_above)
    for v in variants:
        try:
            checks[v.key] = check_variant(v, check_raw, backend=backend,
                                          max_elems=opts.check_max_elems, seed=opts.seed + 7)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed row, the run goes on
            crashed[v.key] = _error_row(case, exc, v.direction)
        free_device_memory(device)
    del check_raw
    free_device_memory(device)

    rows = []
    raw = random_inputs(case, device, seed=opts.seed, device_draw_above=opts.device_draw_above)
    n_sets = rotation_sets(max(v.bytes_moved for v in variants), cache_bytes(device), opts.max_sets)
    sets = [raw] + [{k: copy_like(t) for k, t in raw.items()} for _ in range(n_sets - 1)]
    for v in variants:
        if v.key in crashed:
            rows.append(crashed[v.key])
            continue
        try:
            rows.append(measure_variant(v, sets, checks[v.key], device, ceilings, opts))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed row, the run goes on
            rows.append(_error_row(case, exc, v.direction))
        free_device_memory(device)
    del sets, raw
    free_device_memory(device)
    return rows


def _matches(variant: Variant, name_filter: Optional[str]) -> bool:
    if not name_filter:
        return True
    hay = f"{variant.case.id} {variant.label}"
    return all(part in hay for part in name_filter.split())


def _error_row(case: Case, exc: BaseException, direction: str = "?") -> Dict[str, Any]:
    """A failed result row for a variant (or a whole case) that raised."""
    row = _case_row(case)
    row.update(direction=direction, label=f"{case.op} {direction}", error=f"{type(exc).__name__}: {str(exc)[:300]}",
               check={"passed": False, "detail": f"crashed: {type(exc).__name__}: {str(exc)[:300]}"})
    return row


def measure_cases(case_list: Iterable[Case], device: torch.device, ceilings: Optional[Mapping[str, Any]],
                  opts: MeasureOptions, name_filter: Optional[str] = None,
                  progress: Any = True) -> List[Dict[str, Any]]:
    """:func:`measure_case` over ``case_list`` with one progress line per case on ``progress``
    (True: ``sys.stderr`` at call time; a file; False / None: silent).

    A case that raises becomes a failed row (``error``) and the loop goes on."""
    case_list = list(case_list)
    if progress is True:
        progress = sys.stderr
    elif not progress:
        progress = None
    rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    for i, case in enumerate(case_list, 1):
        t0 = time.perf_counter()
        try:
            new = measure_case(case, device, ceilings, opts, name_filter)
        except Exception as exc:  # noqa: BLE001 - recorded as a failure, the run goes on
            new = [_error_row(case, exc)]
            free_device_memory(device)
        rows.extend(new)
        if progress and new:
            parts = []
            for r in new:
                if "error" in r:
                    parts.append(f"ERROR {r['error']}")
                    continue
                ok = "ok" if r["check"]["passed"] else "CHECK FAILED"
                ratio = f"x{r['ratio']:.2f}" if r.get("ratio") else "x?"
                rate = f" {r['TFLOPs']:.3g} TFLOP/s" if "TFLOPs" in r else ""
                parts.append(f"{r['direction']} {r['ours_ms']:.3f} ms{rate} {ratio} {ok}")
            print(f"[{i}/{len(case_list)}] {case.id}: " + "; ".join(parts)
                  + f"  ({time.perf_counter() - t0:.1f} s, total {time.perf_counter() - t_start:.0f} s)",
                  file=progress, flush=True)
    return rows


def evaluate_targets(rows: Sequence[Mapping[str, Any]], targets: Sequence[Target]) -> List[Dict[str, Any]]:
    """PASS when every selected row meets the target, FAIL otherwise, NO DATA when none applies."""
    out = []
    for t in targets:
        sel = [r for r in rows if "error" not in r and t.applies(r)]
        values = [(r.get(t.metric), r) for r in sel]
        failing = [(v, r) for v, r in values if not t.met(v)]
        status = "NO DATA" if not sel else ("FAIL" if failing else "PASS")
        pick = max if t.at_most else min
        worst = pick((v for v, _ in values if v is not None), default=None)
        out.append({
            "target": t.name, "metric": t.metric, "threshold": t.threshold, "status": status,
            "rows": len(sel), "worst": worst,
            "failing": [f"{r['case']}:{r['direction']} {t.metric}={v:.3f}" if v is not None
                        else f"{r['case']}:{r['direction']} {t.metric}=n/a" for v, r in failing],
        })
    return out
