"""Per-call cost of the CPU entry points with cold caches, against ATen's bindings.

A CPU kernel that streams its tensors through the last-level cache leaves the interpreter's own
objects cold for the next call, so each Python step in front of the next kernel costs a cache miss
or several: the public functions' overhead in the main job is several times what a tight loop of
calls shows. This script measures it: before each call it streams ``--flush-mb`` of memory through
the caches (one thread), then times one call on a small tensor (4 x 64: the kernel itself is
negligible), and reports the median of ``--calls`` such calls, cold and warm, for

* ATen's binding (``torch.softmax`` / ``torch._softmax_backward_data``), the floor;
* the registered C++ op (``torch.ops.mmkernels_cpu.softmax_forward`` / ``softmax_backward``);
* the public functions (``mmkernels.softmax`` / ``mmkernels.softmax_backward``);
* with ``--rev REV``, the public functions of an earlier commit too (exported as
  ``bench/host_before_after.py`` exports it, as the package ``mmkernels_before``, its C++ ops the
  ones this process loaded): a before / after in one process.

Usage: ``python bench/cold_call.py [--dtype bfloat16] [--calls 200] [--flush-mb 48] [--rev cc68e5f]``.
"""
import argparse
import pathlib
import random
import statistics
import sys
import tempfile
import time

import torch

import mmkernels
from mmkernels import _cpp


def _medians_us(entries: dict, calls: int, flush) -> dict:
    """Median µs of each entry's calls, the entries' calls interleaved in a new random order each
    round (seeded): a drift of the machine's speed falls on all of them alike, and no entry always
    follows the same other (a fixed rotation made each call inherit one predecessor's cache state:
    an entry after its own near-copy read up to 15 µs faster); with ``flush``, streamed through the
    caches before each call."""
    names = list(entries)
    samples = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(calls):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            if flush is not None:
                flush.add_(1)
            start = time.perf_counter()
            entries[n]()
            samples[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) * 1e6 for n, v in samples.items()}


def _before(rev: str, tmp: str):
    """``rev``'s package, exported by ``bench/host_before_after.py`` into ``tmp`` and imported as
    ``mmkernels_before``, its C++ ops those this process loaded: its ``load()`` run on this
    checkout's ``csrc/`` (the export has none), which finds the library already built."""
    here = str(pathlib.Path(__file__).resolve().parent)
    sys.path.insert(0, here)
    import host_before_after

    host_before_after.export(rev, pathlib.Path(tmp))
    sys.path.insert(0, tmp)
    import mmkernels_before

    mmkernels_before._cpp.CSRC = _cpp.CSRC
    mmkernels_before._cpp.load()
    return mmkernels_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--flush-mb", type=int, default=48, help="memory streamed before each cold call")
    parser.add_argument("--rev", default=None, help="an earlier commit whose public functions to time too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen).to(dtype)
    y = torch.softmax(x.float(), -1).to(dtype)
    dy = torch.randn(4, 64, generator=gen).to(dtype)
    entries = {"forward, ATen": lambda: torch.softmax(x, -1),
               "forward, public": lambda: mmkernels.softmax(x, -1),
               "backward, ATen": lambda: torch._softmax_backward_data(dy, y, -1, dtype),
               "backward, public": lambda: mmkernels.softmax_backward(dy, y, -1)}
    if _cpp.load():
        ops = torch.ops.mmkernels_cpu
        entries["forward, C++ op"] = lambda: ops.softmax_forward(x, 0, -1)
        entries["backward, C++ op"] = lambda: ops.softmax_backward(y, dy, 0, -1, -1)
    else:
        print(f"(no C++ op rows: {_cpp.status()})")
    if args.rev:
        before = _before(args.rev, tempfile.mkdtemp(prefix="cold_call_"))
        entries[f"forward, {args.rev}"] = lambda: before.softmax(x, -1)
        entries[f"backward, {args.rev}"] = lambda: before.softmax_backward(dy, y, -1)
    flush = torch.zeros(args.flush_mb << 20, dtype=torch.uint8)
    print(f"{args.dtype} 4x64, one thread, median of {args.calls} calls; cold: {args.flush_mb} MB streamed "
          f"before each call")
    for fn in entries.values():
        fn()
    cold = _medians_us(entries, args.calls, flush)
    warm = _medians_us(entries, args.calls, None)
    print(f"{'entry':<20} {'cold us':>9} {'warm us':>9}")
    kinds = ("ATen", "C++ op", args.rev, "public")
    for name in sorted(entries, key=lambda n: (n.split(",")[0], kinds.index(n.split(", ")[1]))):
        print(f"{name:<20} {cold[name]:9.1f} {warm[name]:9.1f}")


if __name__ == "__main__":
    main()
