"""Timing one call: :func:`time_fn` -> :class:`Timing` (CUDA-graph replays or CUDA events on CUDA,
``perf_counter`` on CPU; warm-up, median over repeats), :func:`time_interleaved` (CPU: ours and
the baselines sampled in turn, for ratios that survive the machine's drift), and
:func:`rotation_sets` (how many input buffer sets to rotate among so that no call finds its
inputs in the cache)."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


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

    @property
    def quartile_spread(self) -> float:
        """:func:`quartile_spread` of the samples: how far the middle half of them lie apart."""
        return quartile_spread(self.samples_ms)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spread"] = self.spread
        d["quartile_spread"] = self.quartile_spread
        return d


def quartile_spread(samples: Sequence[float]) -> float:
    """(third quartile - first quartile) / median of ``samples``: how far apart the middle half lie,
    which a few stalled samples do not move (``spread``, max - min, takes the worst one); NaN for
    fewer than two samples or a median of 0."""
    if len(samples) < 2:
        return float("nan")
    median = statistics.median(samples)
    if median <= 0:
        return float("nan")
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / median


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
    stay out of the numbers). The number of samples is ``repeats`` or what fits in ``target_s``
    (estimated from one more call per buffer set) clamped to ``[min_repeats, max_repeats]``. On
    CUDA, calls faster than :data:`GRAPH_BELOW_MS` are captured ``calls_per_sample`` at a time
    into a CUDA graph when ``graph`` is True (falls back to per-call events if capture fails,
    saying so in ``note``).
    """
    calls = list(calls)
    if not calls:
        raise ValueError("time_fn needs at least one callable")
    k = len(calls)
    if device.type != "cuda":
        for i in range(max(warmup, k)):
            calls[i % k]()
        est_ms = 0.0
        if not repeats:  # a fixed sample count needs no estimate
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


def pair_walk(n: int) -> List[int]:
    """The order :func:`time_interleaved` takes its ``n`` entries in: a closed walk over
    ``0 .. n - 1`` with every ordered pair of different entries once as consecutive calls (the last
    followed by the first again) — an Euler circuit of the complete directed graph. Each entry
    appears ``n - 1`` times, once after each other entry, never twice in a row."""
    if n <= 1:
        return [0] * n
    left = {v: [u for u in range(n) if u != v] for v in range(n)}  # the pairs (v, u) not yet walked
    stack, walk = [0], []
    while stack:  # Hierholzer's algorithm
        v = stack[-1]
        if left[v]:
            stack.append(left[v].pop())
        else:
            walk.append(stack.pop())
    walk.reverse()
    return walk[:-1]  # closed: its last vertex is the first


def time_interleaved(named: Dict[str, Sequence[Callable[[], object]]], *, warmup: int = 3,
                     repeats: Optional[int] = None, target_s: float = 0.2, min_repeats: int = 5,
                     max_repeats: int = 100, settle_spread: float = 0.0,
                     settle_s: float = 0.0) -> Dict[str, Timing]:
    """CPU: the median time of one call of each entry of ``named``, the entries' samples taken in
    turn so that a slow drift of the machine (another load, frequency, memory state) shifts every
    entry alike and their ratios keep (timing each entry in its own stretch, ratios between
    processes of this 2-core machine moved by up to 40%).

    Each entry's calls are its buffer sets, and the timed calls walk through the sets in one
    sequence across the entries (the c-th timed call runs set ``c % len(calls)``), so every call
    finds its inputs as long untouched as every other: had the entries of a round shared one set,
    the first would bring it into the cache for the others (on a VM with 480 MiB of L3 the first
    of three identical entries read 1.15-1.26 ms, the third 0.69-0.76). The entries take turns in
    :func:`pair_walk`'s order (A, C, B, C, A, B for three), so each follows every other equally
    often: a call also inherits its predecessor's state — the memory it freed and what it left in
    the cache — and in a fixed cycle (A, B, C, B, C, A, ...: rotated rounds) one entry always
    followed the same other, on a Zen 4 VM ATen's softmax backward 1.06 ms after our plain-stored
    dx and 1.25 ms after our streamed one. Each entry is warmed up as :func:`time_fn` does; the
    number of samples is what fits all entries in ``target_s`` (clamped to ``[min_repeats,
    max_repeats]``); the last walk stops where each entry has them.

    Settling (``settle_spread`` > 0, no fixed ``repeats``): while some entry's
    :func:`quartile_spread` is above ``settle_spread``, whole walks more (every entry as many
    samples more) for up to ``settle_s`` seconds or ``max_repeats`` samples an entry. A stall of the
    machine that covers two or three of a row's five samples moves their median (on the 2-core VM a
    row of ~9 ms read 9.2-49.9 ms within one entry's seven samples); taken longer, the stall is a
    smaller part of the samples, and a quiet row keeps the samples it had."""
    named = {n: list(c) for n, c in named.items()}
    if not named or any(not c for c in named.values()):
        raise ValueError("time_interleaved needs at least one callable per entry")
    est = 0.0
    for calls in named.values():
        k = len(calls)
        for i in range(max(warmup, k)):
            calls[i % k]()
        t0 = time.perf_counter()
        for c in calls:
            c()
        est += (time.perf_counter() - t0) * 1e3 / k
    n = _repeats(est, repeats, target_s, min_repeats, max_repeats)
    samples: Dict[str, List[float]] = {name: [] for name in named}
    names = list(named)
    walk = pair_walk(len(names))
    call = 0  # timed calls so far: the c-th runs buffer set c % len(calls) of its entry

    def take(name: str) -> None:
        nonlocal call
        calls = named[name]
        fn = calls[call % len(calls)]
        call += 1
        t0 = time.perf_counter()
        fn()
        samples[name].append((time.perf_counter() - t0) * 1e3)

    while any(len(v) < n for v in samples.values()):
        for e in walk:
            if len(samples[names[e]]) < n:  # the last walk, cut short where an entry has its samples
                take(names[e])
    if settle_spread > 0 and not repeats:
        deadline = time.perf_counter() + settle_s
        while (time.perf_counter() < deadline and len(samples[names[0]]) < max_repeats
               and max(quartile_spread(v) for v in samples.values()) > settle_spread):
            for e in walk:
                take(names[e])
    return {name: Timing(statistics.median(v), v, "perf_counter-interleaved", 1, len(named[name]))
            for name, v in samples.items()}


def rotation_sets(bytes_per_call: int, cache: int, max_sets: int = 16) -> int:
    """How many input buffer sets to rotate among so that no call finds its inputs in the cache:
    one set when a call moves at least twice the cache, else enough to cycle ~4x the cache."""
    if bytes_per_call <= 0 or bytes_per_call >= 2 * cache:
        return 1
    return int(min(max_sets, max(2, math.ceil(4 * cache / bytes_per_call))))
