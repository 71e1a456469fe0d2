"""The main job, ``python -m mmkernels bench``, and the measurement pieces the GPU suite reuses.

Every op family is run on the cases of the registry (:mod:`mmkernels.testing`) tagged ``bench``
(CPU) or ``gpu`` (CUDA), on the present device, against its PyTorch baseline, and a table is
printed: times, the ratio ``baseline / ours`` (> 1: we are faster), the error against a float64
reference, peak memory, and the fraction of the measured copy bandwidth.

The pieces below are shared with ``bench/gpu_suite.py`` (which only adds the float64 references of
``tests/reference.py``, the acceptance targets' verdicts and its own output files):

* environment: :func:`environment` (device, versions, commit);
* timing: :func:`time_fn` -> :class:`Timing` (CUDA events or CUDA-graph replays on CUDA,
  ``perf_counter`` on CPU; warm-up, median over repeats, rotation among input buffer sets);
* ceilings: :func:`measure_copy_bandwidth`, :func:`measure_mm_rate`, :func:`measure_ceilings`;
* bench specs: :class:`Variant` (one measurable function of one case: ours, baselines, float64
  reference, minimum bytes), built per family by :data:`FAMILIES` (:func:`variants_for`);
* inputs: :func:`random_inputs`, :func:`rotation_sets`;
* checks: :func:`check_variant` (NaN-poisoned run, every element written, normwise error on a
  bounded sample of rows against the float64 reference, tolerance table);
* memory: :func:`peak_memory`;
* the loop: :class:`MeasureOptions`, :func:`measure_case`, :func:`measure_cases`;
* targets: :class:`Target`, :func:`evaluate_targets`;
* reporting: :func:`format_table`, :func:`result_table`, :func:`write_json`, :func:`plot_results`.

Definitions used throughout: *bytes* is the minimum traffic of one call (each input read once,
each output written once, storage dtypes); *GB/s* is bytes / median time; *%copy* is that over the
copy bandwidth measured in the same run (bytes read + bytes written of a large device-to-device
copy). Ratios compare times measured the same way in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from mmkernels import _backend
from mmkernels.testing import Case, cases as registry_cases, error_report, make_inputs
from mmkernels.testing import poison_allocations, tolerance

Inputs = Dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> Optional[str]:
    """``HEAD`` of the checkout holding this package (``+dirty`` if it has local changes), or the
    ``MMKERNELS_COMMIT`` variable (for copies of the tree without ``.git``); None if unknown."""
    if os.environ.get("MMKERNELS_COMMIT"):
        return os.environ["MMKERNELS_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache in front of ``device``'s memory (L2 on CUDA, L3 on CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        try:
            best = max(best, int(size.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or 32 << 20


def environment(device: torch.device) -> Dict[str, Any]:
    """What a result file must say about where it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": _backend.get_backend(),
        "impl": _backend.resolve(device).value,
        "triton_interpreter": _backend.interpreter_active(),
        "cache_bytes": cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        info.update(threads=torch.get_num_threads())
    return info


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Median of ``samples_ms`` (milliseconds per call) and how they were taken.

    ``method``: ``perf_counter`` (CPU; one call per sample), ``cuda-events`` (events around each
    call, calls enqueued back to back: includes launch overhead when the host is the bottleneck),
    ``cuda-graph`` (events around the replay of a graph of ``calls_per_sample`` calls: device time
    without launch gaps).
    """

    median_ms: float
    samples_ms: List[float]
    method: str
    calls_per_sample: int = 1
    buffer_sets: int = 1
    note: str = ""

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: how noisy this timing was."""
        if not self.samples_ms or self.median_ms <= 0:
            return float("nan")
        return (max(self.samples_ms) - min(self.samples_ms)) / self.median_ms

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spread"] = self.spread
        return d


#: Below this per-call time, CUDA timings replay a graph of many calls so launch gaps do not count.
GRAPH_BELOW_MS = 1.0
#: A CUDA-graph sample aims at this much device time.
GRAPH_SAMPLE_MS = 0.5


def _repeats(est_ms: float, repeats: Optional[int], target_s: float, min_repeats: int, max_repeats: int) -> int:
    if repeats:
        return int(repeats)
    if est_ms <= 0:
        return max_repeats
    return int(min(max_repeats, max(min_repeats, target_s * 1e3 / est_ms)))


def time_fn(calls: Sequence[Callable[[], object]], device: torch.device, *, warmup: int = 3,
            repeats: Optional[int] = None, target_s: float = 0.2, min_repeats: int = 5,
            max_repeats: int = 100, graph: bool = True) -> Timing:
    """Median time of one call, rotating among ``calls`` (one per input buffer set).

    Warm-up runs ``max(warmup, len(calls))`` calls first (compilation, autotuning, allocator growth
    stay out of the numbers). The number of samples is ``repeats`` or what fits in ``target_s``,
    clamped to ``[min_repeats, max_repeats]``. On CUDA, calls faster than :data:`GRAPH_BELOW_MS`
    are captured ``calls_per_sample`` at a time into a CUDA graph when ``graph`` is True (falls
    back to per-call events if capture fails, saying so in ``note``).
    """
    calls = list(calls)
    if not calls:
        raise ValueError("time_fn needs at least one callable")
    k = len(calls)
    if device.type != "cuda":
        for i in range(max(warmup, k)):
            calls[i % k]()
        t0 = time.perf_counter()
        for c in calls:
            c()
        est_ms = (time.perf_counter() - t0) * 1e3 / k
        n = _repeats(est_ms, repeats, target_s, min_repeats, max_repeats)
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            calls[i % k]()
            samples.append((time.perf_counter() - t0) * 1e3)
        return Timing(statistics.median(samples), samples, "perf_counter", 1, k)

    # CUDA: warm up on a side stream (as graph capture requires), then estimate with events.
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(max(warmup, k)):
            calls[i % k]()
    torch.cuda.current_stream(device).wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    est_ms = start.elapsed_time(end) / k

    note = ""
    if graph and est_ms < GRAPH_BELOW_MS:
        inner = max(1, math.ceil(GRAPH_SAMPLE_MS / max(est_ms, 1e-4)))
        inner = min(512, k * math.ceil(inner / k))
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for j in range(inner):
                    calls[j % k]()
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to events
            note = f"graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); per-call events"
            torch.cuda.synchronize(device)
            del g
        else:
            g.replay()
            torch.cuda.synchronize(device)
            n = _repeats(est_ms * inner, repeats, target_s, min_repeats, max_repeats)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(n)]
            for s, e in events:
                s.record()
                g.replay()
                e.record()
            torch.cuda.synchronize(device)
            samples = [s.elapsed_time(e) / inner for s, e in events]
            del g
            return Timing(statistics.median(samples), samples, "cuda-graph", inner, k)

    n = _repeats(est_ms, repeats, target_s, min_repeats, max_repeats)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i, (s, e) in enumerate(events):
        s.record()
        calls[i % k]()
        e.record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) for s, e in events]
    return Timing(statistics.median(samples), samples, "cuda-events", 1, k, note)


# ----------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------


def measure_copy_bandwidth(device: torch.device, nbytes: int, **timing) -> Dict[str, Any]:
    """Device-to-device copy of ``nbytes`` of random bytes; GB/s counts bytes read + bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_fn([lambda: dst.copy_(src)], device, graph=False, **timing)
    gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    return {"GBps": gbps, "bytes": nbytes, "median_ms": t.median_ms, "timing": t.to_json()}


def measure_mm_rate(device: torch.device, n: int, dtype: torch.dtype, **timing) -> Dict[str, Any]:
    """``n x n x n`` matrix product through ``torch.mm`` on random (never zero) data; TFLOP/s."""
    gen = torch.Generator(device=device).manual_seed(1234)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn([lambda: torch.mm(a, b, out=out)], device, graph=False, **timing)
    tflops = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    return {"TFLOPs": tflops, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "median_ms": t.median_ms, "timing": t.to_json()}


def measure_ceilings(device: torch.device, *, copy_bytes: Optional[int] = None, mm_n: Optional[int] = None,
                     mm_dtype: Optional[torch.dtype] = None, quick: bool = False) -> Dict[str, Any]:
    """The two ceilings every result is compared with, measured now on ``device``.

    Defaults: CUDA 1 GiB copy and an 8192^3 bf16 product (DESIGN.md); CPU a copy of 4x the
    last-level cache and a 1024^3 float32 product (bf16 products are not a CPU ceiling).
    """
    if device.type == "cuda":
        copy_bytes = copy_bytes or (256 << 20 if quick else 1 << 30)
        mm_n, mm_dtype = mm_n or (4096 if quick else 8192), mm_dtype or torch.bfloat16
    else:
        copy_bytes = copy_bytes or max(16 << 20, min(256 << 20, 4 * cache_bytes(device)))
        mm_n, mm_dtype = mm_n or (512 if quick else 1024), mm_dtype or torch.float32
    timing = dict(target_s=0.1 if quick else 0.3, min_repeats=3, max_repeats=50)
    out = {"copy": measure_copy_bandwidth(device, copy_bytes, **timing),
           "mm": measure_mm_rate(device, mm_n, mm_dtype, **timing)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# Bench specs: what to run for one case
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One measurable function of one registry case (e.g. the softmax backward of a 8192x4096 case).

    All callables take this variant's inputs (from :meth:`prepare`): ``ours`` runs the package,
    each of ``baselines`` a PyTorch baseline (the first, ``"eager"``, is what ratios refer to),
    ``reference`` the float64 reference (on float64 copies of the inputs).
    """

    case: Case
    direction: str  # "fwd" | "bwd"
    ours: Callable[[Inputs], torch.Tensor]
    baselines: Dict[str, Callable[[Inputs], torch.Tensor]]
    reference: Callable[[Inputs], torch.Tensor]
    prepare: Callable[[Inputs], Inputs]  # registry inputs (make_inputs) -> this variant's inputs
    bytes_moved: int  # minimum traffic of one call
    passes: int  # minimum tensor passes (bytes_moved in units of one tensor)
    reduced_dims: Tuple[int, ...]  # dims a row sample for the reference must keep whole

    @property
    def label(self) -> str:
        return f"{self.case.op} {self.direction}"

    @property
    def key(self) -> str:
        return f"{self.case.id}:{self.direction}"


@dataclasses.dataclass(frozen=True)
class Target:
    """An acceptance target: ``metric`` (a key of a result row) must be >= ``threshold`` on every
    result row ``applies`` selects."""

    name: str
    metric: str
    threshold: float
    applies: Callable[[Mapping[str, Any]], bool]


class TorchReferences:
    """Float64 references computed by the torch baseline ops themselves (the installed package
    cannot import ``tests/reference.py``). Same interface as ``tests/reference.py``:
    float64 in, float64 out."""

    name = "torch float64 (the baseline computed in float64)"

    @staticmethod
    def softmax_ref(x, dim):
        return torch.softmax(x.double(), dim)

    @staticmethod
    def log_softmax_ref(x, dim):
        return torch.log_softmax(x.double(), dim)

    @staticmethod
    def softmin_ref(x, dim):
        return torch.nn.functional.softmin(x.double(), dim)

    @staticmethod
    def softmax_backward_ref(y, dy, dim, kind):
        y, dy = y.double(), dy.double()
        if kind == "log_softmax":
            return torch._log_softmax_backward_data(dy, y, dim, torch.float64)
        dx = torch._softmax_backward_data(dy, y, dim, torch.float64)
        return dx.neg() if kind == "softmin" else dx


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SoftmaxBench:
    """Bench spec of the softmax family: forward of softmax / log_softmax / softmin and the fused
    backward (``mmkernels.softmax_backward``), against torch eager (``torch.softmax``,
    ``torch.log_softmax``, ``F.softmin``; ``torch._softmax_backward_data`` /
    ``torch._log_softmax_backward_data``, softmin: that and a negation, as eager autograd runs it).

    Minimum traffic: forward 2 tensor passes (read x, write y), backward 3 (read y and dy, write dx).
    """

    family = "softmax"

    @staticmethod
    def _fns(op: str):
        import mmkernels

        F = torch.nn.functional
        if op == "softmax":
            return mmkernels.softmax, torch.softmax, "softmax_ref"
        if op == "log_softmax":
            return mmkernels.log_softmax, torch.log_softmax, "log_softmax_ref"
        if op == "softmin":
            return mmkernels.softmin, F.softmin, "softmin_ref"
        raise KeyError(f"softmax family has no op {op!r}")

    @staticmethod
    def _eager_backward(op: str, dim: int):
        if op == "log_softmax":
            return lambda i: torch._log_softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)
        if op == "softmin":
            return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype).neg()
        return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        import mmkernels

        dim = int(case.params.get("dim", -1))
        ndim = max(len(case.shape), 1)
        reduced = (dim % ndim,)
        ours_fwd, eager_fwd, ref_name = cls._fns(case.op)
        ref_fwd = getattr(refs, ref_name)
        tensor = _nbytes(case.shape, case.dtype)

        fwd_base = {"eager": lambda i: eager_fwd(i["x"], dim)}
        fwd = Variant(
            case=case, direction="fwd",
            ours=lambda i: ours_fwd(i["x"], dim),
            baselines=fwd_base,
            reference=lambda i: ref_fwd(i["x"], dim),
            prepare=lambda raw: {"x": raw["x"]},
            bytes_moved=2 * tensor, passes=2, reduced_dims=reduced,
        )

        def prepare_bwd(raw: Inputs) -> Inputs:
            with torch.no_grad():
                y = eager_fwd(raw["x"], dim)
            return {"y": y, "dy": raw["dy"]}

        bwd_base = {"eager": cls._eager_backward(case.op, dim)}
        bwd = Variant(
            case=case, direction="bwd",
            ours=lambda i: mmkernels.softmax_backward(i["dy"], i["y"], dim, kind=case.op),
            baselines=bwd_base,
            reference=lambda i: refs.softmax_backward_ref(i["y"], i["dy"], dim, case.op),
            prepare=prepare_bwd,
            bytes_moved=3 * tensor, passes=3, reduced_dims=reduced,
        )
        if compile_baseline:
            fwd_base["compile"] = compiled(lambda x: eager_fwd(x, dim), ("x",))
            bwd_base["compile"] = compiled(_unpack(cls._eager_backward(case.op, dim), ("y", "dy")), ("y", "dy"))
        return [fwd, bwd]

    @staticmethod
    def targets() -> List[Target]:
        """Acceptance targets of the family (GPU, rows M = 8192 of fp32 and bf16, dim -1).

        ratio = torch eager time / ours; frac_copy = (bytes / time) / measured copy bandwidth.
        """

        def rows(direction: str, lo: int, hi: int = 1 << 62):
            def applies(r: Mapping[str, Any]) -> bool:
                return (r.get("family") == "softmax" and r.get("op") == "softmax"
                        and r.get("direction") == direction and len(r.get("shape", ())) == 2
                        and r["shape"][0] == 8192 and r.get("dim") in (-1, 1)
                        and r.get("dtype") in ("float32", "bfloat16") and lo <= r["shape"][1] <= hi)
            return applies

        return [
            Target("softmax fwd >= 85% of copy bandwidth (M=8192, N>=4096)", "frac_copy", 0.85,
                   rows("fwd", 4096)),
            Target("softmax fwd never slower than torch.softmax (M=8192, 128<=N<=262144)", "ratio", 1.0,
                   rows("fwd", 128, 262144)),
            Target("softmax bwd >= 80% of copy bandwidth (M=8192, N>=1024)", "frac_copy", 0.80,
                   rows("bwd", 1024)),
            Target("softmax bwd >= 1.6x torch eager backward (M=8192, N>=1024)", "ratio", 1.6,
                   rows("bwd", 1024)),
        ]


def _unpack(fn: Callable[[Inputs], torch.Tensor], names: Sequence[str]) -> Callable[..., torch.Tensor]:
    """``fn(dict)`` as a function of positional tensors (what torch.compile traces best)."""
    return lambda *ts: fn(dict(zip(names, ts)))


def compiled(fn: Callable[..., torch.Tensor], names: Sequence[str]) -> Callable[[Inputs], torch.Tensor]:
    """``torch.compile(fn, dynamic=False)`` of a baseline, called with this variant's inputs.

    Compilation happens at the first call (the timing warm-up). Dynamo's caches are reset first, so
    the per-code-object recompile limit never silently sends a later case back to eager."""
    state: Dict[str, Any] = {}

    def call(inputs: Inputs) -> torch.Tensor:
        if "fn" not in state:
            torch._dynamo.reset()
            state["fn"] = torch.compile(fn, dynamic=False)
        return state["fn"](*(inputs[n] for n in names))

    return call


#: Bench spec of each op family, by registry family name.
FAMILIES: Dict[str, Any] = {"softmax": SoftmaxBench}


def variants_for(case: Case, refs=None, compile_baseline: bool = False) -> List[Variant]:
    """The variants (e.g. forward and backward) of a registry case, with ``refs`` as the float64
    references (default :class:`TorchReferences`)."""
    spec = FAMILIES[case.family]
    return spec.variants(case, refs or TorchReferences, compile_baseline=compile_baseline)


def all_targets() -> List[Target]:
    return [t for spec in FAMILIES.values() for t in spec.targets()]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

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
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _copy_like(t: torch.Tensor) -> torch.Tensor:
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


def rotation_sets(bytes_per_call: int, cache: int, max_sets: int = 16) -> int:
    """How many input buffer sets to rotate among so that no call finds its inputs in the cache:
    one set when a call moves at least twice the cache, else enough to cycle ~4x the cache."""
    if bytes_per_call <= 0 or bytes_per_call >= 2 * cache:
        return 1
    return int(min(max_sets, max(2, math.ceil(4 * cache / bytes_per_call))))


# ----------------------------------------------------------------------------------------------
# Correctness and memory
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The measurement loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeasureOptions:
    """How :func:`measure_case` measures.

    ``repeats`` fixes the samples per timing; else they fill ``target_s`` within
    ``[min_repeats, max_repeats]``. ``graph``: replay CUDA graphs for sub-millisecond calls.
    ``eager_timing``: on CUDA also time ours and the eager baseline call by call (launch overhead
    included), stored as ``*_percall_ms``. ``check_max_elems`` bounds the reference sample.
    """

    repeats: Optional[int] = None
    warmup: int = 3
    target_s: float = 0.2
    min_repeats: int = 5
    max_repeats: int = 100
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


def _case_row(case: Case) -> Dict[str, Any]:
    return {
        "family": case.family, "op": case.op, "case": case.id, "shape": list(case.shape),
        "dim": case.params.get("dim"), "dtype": str(case.dtype).replace("torch.", ""),
        "layouts": dict(case.layouts),
    }


def measure_variant(variant: Variant, sets: Sequence[Inputs], check: Mapping[str, Any], device: torch.device,
                    ceilings: Optional[Mapping[str, Any]], opts: MeasureOptions) -> Dict[str, Any]:
    """Time one variant on the input ``sets`` (rotated) and build its result row around ``check``
    (from :func:`check_variant`); see :func:`result_table` for the columns."""
    row = _case_row(variant.case)
    row.update(direction=variant.direction, label=variant.label, bytes=variant.bytes_moved,
               passes=variant.passes, impl=check.get("backend"), check=dict(check))
    prepared = [variant.prepare(s) for s in sets]
    kw = opts.timing_kwargs()

    def calls(fn):
        return [functools.partial(fn, p) for p in prepared]

    timings = {"ours": time_fn(calls(variant.ours), device, graph=opts.graph, **kw)}
    for name, fn in variant.baselines.items():
        try:
            timings[name] = time_fn(calls(fn), device, graph=opts.graph, **kw)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            row.setdefault("baseline_errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if opts.eager_timing and device.type == "cuda":
        for name, fn in (("ours", variant.ours), ("eager", variant.baselines["eager"])):
            row[f"{name}_percall_ms"] = time_fn(calls(fn), device, graph=False, **kw).median_ms
    row["timings"] = {k: t.to_json() for k, t in timings.items()}
    ours_ms = timings["ours"].median_ms
    row["ours_ms"] = ours_ms
    row["baseline_ms"] = {k: t.median_ms for k, t in timings.items() if k != "ours"}
    row["ratio"] = row["baseline_ms"]["eager"] / ours_ms if "eager" in row["baseline_ms"] else None
    if "compile" in row["baseline_ms"]:
        row["ratio_compile"] = row["baseline_ms"]["compile"] / ours_ms
    row["GBps"] = variant.bytes_moved / (ours_ms * 1e-3) / 1e9
    row["baseline_GBps"] = {k: variant.bytes_moved / (v * 1e-3) / 1e9 for k, v in row["baseline_ms"].items()}
    if ceilings:
        copy = ceilings["copy"]["GBps"]
        row["frac_copy"] = row["GBps"] / copy
        row["baseline_frac_copy"] = {k: v / copy for k, v in row["baseline_GBps"].items()}
        row["floor_ms"] = variant.bytes_moved / (copy * 1e9) * 1e3
    if opts.memory:
        p = prepared[0]
        row["peak_bytes"], row["memory_method"] = peak_memory(lambda: variant.ours(p), device)
        row["baseline_peak_bytes"], _ = peak_memory(lambda: variant.baselines["eager"](p), device)
    del prepared
    return row


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_case(case: Case, device: torch.device, ceilings: Optional[Mapping[str, Any]],
                 opts: MeasureOptions, refs=None, name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every variant of ``case`` (those whose ``"<case id> <op> <fwd|bwd>"`` contains every word
    of ``name_filter``), in two phases so that large cases hold one input draw at a time:

    1. checks (:func:`check_variant`) on a fresh random draw;
    2. timings on another draw, copied into :func:`rotation_sets` buffer sets when it fits in cache.

    A variant that raises becomes a failed row (``error``)."""
    variants = [v for v in variants_for(case, refs, compile_baseline=opts.compile_baseline)
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
        _free(device)
    del check_raw
    _free(device)

    rows = []
    raw = random_inputs(case, device, seed=opts.seed, device_draw_above=opts.device_draw_above)
    n_sets = rotation_sets(max(v.bytes_moved for v in variants), cache_bytes(device), opts.max_sets)
    sets = [raw] + [{k: _copy_like(t) for k, t in raw.items()} for _ in range(n_sets - 1)]
    for v in variants:
        if v.key in crashed:
            rows.append(crashed[v.key])
            continue
        try:
            rows.append(measure_variant(v, sets, checks[v.key], device, ceilings, opts))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed row, the run goes on
            rows.append(_error_row(case, exc, v.direction))
        _free(device)
    del sets, raw
    _free(device)
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
                  opts: MeasureOptions, refs=None, name_filter: Optional[str] = None,
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
            new = measure_case(case, device, ceilings, opts, refs, name_filter)
        except Exception as exc:  # noqa: BLE001 - recorded as a failure, the run goes on
            new = [_error_row(case, exc)]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.extend(new)
        if progress and new:
            parts = []
            for r in new:
                if "error" in r:
                    parts.append(f"ERROR {r['error']}")
                    continue
                ok = "ok" if r["check"]["passed"] else "CHECK FAILED"
                ratio = f"x{r['ratio']:.2f}" if r.get("ratio") else "x?"
                parts.append(f"{r['direction']} {r['ours_ms']:.3f} ms {ratio} {ok}")
            print(f"[{i}/{len(case_list)}] {case.id}: " + "; ".join(parts)
                  + f"  ({time.perf_counter() - t0:.1f} s, total {time.perf_counter() - t_start:.0f} s)",
                  file=progress, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def evaluate_targets(rows: Sequence[Mapping[str, Any]], targets: Sequence[Target]) -> List[Dict[str, Any]]:
    """PASS when every selected row meets the target, FAIL otherwise, NO DATA when none applies."""
    out = []
    for t in targets:
        sel = [r for r in rows if "error" not in r and t.applies(r)]
        values = [(r.get(t.metric), r) for r in sel]
        failing = [(v, r) for v, r in values if v is None or v < t.threshold]
        status = "NO DATA" if not sel else ("FAIL" if failing else "PASS")
        worst = min((v for v, _ in values if v is not None), default=None)
        out.append({
            "target": t.name, "metric": t.metric, "threshold": t.threshold, "status": status,
            "rows": len(sel), "worst": worst,
            "failing": [f"{r['case']}:{r['direction']} {t.metric}={v:.3f}" if v is not None
                        else f"{r['case']}:{r['direction']} {t.metric}=n/a" for v, r in failing],
        })
    return out


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Aligned plain-text table, or a Markdown one."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_num(v: Optional[float], fmt: str) -> str:
    """``v`` formatted with ``fmt``; empty for None and NaN."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mib(v: Optional[int]) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def result_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False, compact: bool = False) -> str:
    """The results table: op, shape, dtype, ours (ms), baseline (ms), ratio = baseline / ours
    (> 1: we are faster), max error of ours (and of the baseline) vs the float64 reference, peak
    memory, GB/s and the fraction of the measured copy bandwidth."""
    has_compile = any("compile" in r.get("baseline_ms", {}) for r in rows)
    headers = ["op", "shape", "dtype", "ours ms", "base ms", "ratio"]
    if has_compile:
        headers += ["compile ms", "ratio c"]
    headers += ["err ours", "err base", "check"]
    if not compact:
        headers += ["mem ours MiB", "mem base MiB"]
    headers += ["GB/s", "%copy"]
    body = []
    for r in rows:
        shape = "x".join(map(str, r["shape"])) + (f" d{r['dim']}" if r.get("dim") not in (None, -1) else "")
        if "error" in r:  # the message is listed under the table
            line = [r["label"], shape, r["dtype"], "ERROR"] + [""] * (len(headers) - 4)
            line[headers.index("check")] = "CRASH"
            body.append(line)
            continue
        chk = r["check"]
        line = [r["label"], shape, r["dtype"], fmt_num(r["ours_ms"], ".4f"),
                fmt_num(r["baseline_ms"].get("eager"), ".4f"), fmt_num(r.get("ratio"), ".2f")]
        if has_compile:
            line += [fmt_num(r["baseline_ms"].get("compile"), ".4f"), fmt_num(r.get("ratio_compile"), ".2f")]
        line += [fmt_num(chk.get("max_rel"), ".1e"), fmt_num(chk.get("baseline_max_rel"), ".1e"),
                 "ok" if chk["passed"] else "FAIL"]
        if not compact:
            line += [_mib(r.get("peak_bytes")), _mib(r.get("baseline_peak_bytes"))]
        line += [fmt_num(r.get("GBps"), ".1f"), fmt_num(100 * r["frac_copy"], ".0f") if "frac_copy" in r else ""]
        body.append(line)
    return format_table(headers, body, markdown=markdown)


def ceilings_line(ceilings: Mapping[str, Any]) -> str:
    c, m = ceilings["copy"], ceilings["mm"]
    return (f"ceilings: copy {c['GBps']:.1f} GB/s (read+write, {c['bytes'] / 2**20:.0f} MiB), "
            f"mm {m['TFLOPs']:.2f} TFLOP/s ({m['dtype']} {m['n']}^3)")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (non-finite floats as null) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def plot_results(rows: Sequence[Mapping[str, Any]], path, ceilings: Optional[Mapping[str, Any]] = None,
                 title: str = "") -> None:
    """PNG with two panels: the ratio baseline / ours per variant, and achieved GB/s of ours and
    the baselines against the measured copy bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); install it with `pip install matplotlib`") from None
    rows = [r for r in rows if "error" not in r]
    labels = [f"{r['label']} {'x'.join(map(str, r['shape']))} {r['dtype']}" for r in rows]
    n = max(len(rows), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.3 * n + 2), sharey=True)
    y = list(range(len(rows)))
    names = sorted({k for r in rows for k in r["baseline_ms"]})
    h = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        vals = [r["baseline_ms"].get(name, float("nan")) / r["ours_ms"] for r in rows]
        ax1.barh([v + j * h for v in y], vals, height=h, label=f"{name} / ours")
    ax1.axvline(1.0, color="k", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("baseline time / ours (> 1: ours faster)")
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7)
    series = [("ours", [r["GBps"] for r in rows])] + [
        (name, [r["baseline_GBps"].get(name, float("nan")) for r in rows]) for name in names]
    h = 0.8 / len(series)
    for j, (name, vals) in enumerate(series):
        ax2.barh([v + j * h for v in y], vals, height=h, label=name)
    if ceilings:
        ax2.axvline(ceilings["copy"]["GBps"], color="r", lw=1, ls="--", label="copy ceiling")
    ax2.set_xlabel("GB/s (minimum bytes / time)")
    ax2.legend(fontsize=7)
    fig.suptitle(title or "mmkernels bench")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The main job
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--tag", default=None,
                        help="registry tag of the cases (default: 'gpu' on CUDA, 'bench' on CPU)")
    parser.add_argument("--family", action="append", default=None, choices=sorted(FAMILIES),
                        help="op family to run (repeatable; default: all)")
    parser.add_argument("--filter", default=None, metavar="SUBSTR",
                        help="only variants whose '<case id> <op> <fwd|bwd>' contains every "
                             "space-separated word of SUBSTR (e.g. 'float32 bwd')")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller ceiling measurements (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per measurement (default: as many as fit ~0.2 s)")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="also time torch.compile of each baseline (a second baseline)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; recorded in the JSON)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    parser.add_argument("--plot", metavar="PATH.png", default=None, help="write a PNG plot (matplotlib)")


def select_cases(tag: str, families: Optional[Sequence[str]] = None) -> List[Case]:
    """Registry cases of ``families`` (default: every family with a bench spec) tagged ``tag``."""
    out: List[Case] = []
    for fam in families or sorted(FAMILIES):
        out.extend(registry_cases(fam, tag))
    return out


def run(args: argparse.Namespace) -> int:
    """``python -m mmkernels bench``: returns 0 when every correctness check passed, 1 otherwise."""
    t_start = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    tag = args.tag or ("gpu" if device.type == "cuda" else "bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:  # fail before measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib; install it with `pip install matplotlib`", file=sys.stderr)
            return 2
    case_list = select_cases(tag, args.family)
    if not case_list:
        print(f"error: no registry cases tagged {tag!r}", file=sys.stderr)
        return 2
    opts = MeasureOptions(
        repeats=args.repeats,
        warmup=2 if args.quick else 3,
        target_s=0.05 if args.quick else 0.2,
        min_repeats=3 if args.quick else 5,
        compile_baseline=args.compile_baseline,
        memory=not args.no_memory,
    )
    env = environment(device)
    print(f"mmkernels bench on {env['device']} ({device.type}, impl {env['impl']}), torch {env['torch']}, "
          f"triton {env['triton']}, {len(case_list)} '{tag}' cases", file=sys.stderr, flush=True)
    ceilings = measure_ceilings(device, quick=args.quick)
    print(ceilings_line(ceilings), file=sys.stderr, flush=True)
    rows = measure_cases(case_list, device, ceilings, opts, refs=TorchReferences, name_filter=args.filter)
    if not rows:
        print(f"error: no variant matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t_start

    print(f"\nmmkernels bench: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    print(ceilings_line(ceilings))
    print("ratio = baseline / ours (> 1: ours faster); err = max |out - ref| / max |ref| vs float64 "
          f"({TorchReferences.name}); mem = {rows[0].get('memory_method', 'n/a')}; "
          "%copy = (min bytes / time) / copy ceiling")
    print(result_table(rows))
    failed = [r for r in rows if not r["check"]["passed"]]
    on_gpu = [t for t in evaluate_targets(rows, all_targets()) if t["status"] != "NO DATA"]
    for t in on_gpu:
        print(f"target {t['status']}: {t['target']} (worst {fmt_num(t['worst'], '.3f')})")
    for r in failed:
        print(f"CHECK FAILED {r['case']} {r['direction']}: {r['check'].get('detail')}")
    print(f"{len(rows)} results, {len(failed)} failed checks, {elapsed:.1f} s")

    if args.json:
        write_json(args.json, {
            "kind": "mmkernels-bench", "environment": env, "ceilings": ceilings,
            "options": dataclasses.asdict(opts), "tag": tag, "filter": args.filter,
            "reference": TorchReferences.name, "elapsed_s": elapsed, "results": rows,
            "targets": evaluate_targets(rows, all_targets()),
        })
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot, ceilings, title=f"mmkernels bench: {env['device']}")
        print(f"wrote {args.plot}")
    return 1 if failed else 0


if __name__ == "__main__":  # ``python -m mmkernels.bench`` works too
    _parser = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
