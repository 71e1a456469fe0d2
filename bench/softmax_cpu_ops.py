"""The C++ softmax ops against ATen's kernels, rows of one dtype, interleaved in one process.

    python bench/softmax_cpu_ops.py [--dtype bfloat16] [--threads 2] [--sets 4] [--rounds 15]

Times ``mmkernels_cpu::softmax_forward`` and ``softmax_backward`` (plain stores, stream 0, and
streamed, stream 1) against ``torch.softmax`` and ``torch._softmax_backward_data`` at the main
job's four row shapes, calls direct (no Python of ours in front). Each round calls every entry
once per buffer set (``--sets`` of them, so that the tensors come from memory as in a model);
medians of all calls. Prints ms, ATen's time / ours, and the forward's GB/s (x read, y written)
against the copy ceiling of the main job (a 128 MiB copy, the better of before and after).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmkernels import _cpp
from mmkernels.bench import measure_copy_bandwidth

SHAPES = ((32768, 128), (4096, 1024), (1024, 4096), (128, 32768))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not _cpp.load():
        raise SystemExit(f"the C++ kernels are not available: {_cpp.status()}")
    ops = _cpp.ops()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{_cpp.status()}; {args.dtype}, {args.threads} threads, {args.sets} buffer sets, {args.rounds} rounds")
    cpu = torch.device("cpu")
    ceiling = measure_copy_bandwidth(cpu, 128 << 20)["GBps"]
    gen = torch.Generator().manual_seed(0)
    lines = []
    for shape in SHAPES:
        xs = [torch.randn(*shape, generator=gen).mul_(3).to(dtype) for _ in range(args.sets)]
        ys = [torch.softmax(x.float(), -1).to(dtype) for x in xs]
        dys = [torch.randn(*shape, generator=gen).to(dtype) for _ in range(args.sets)]
        entries = {
            "ours fwd": lambda i: ops.softmax_forward(xs[i], 0),
            "aten fwd": lambda i: torch.softmax(xs[i], -1),
            "ours bwd": lambda i: ops.softmax_backward(ys[i], dys[i], 0, 0),
            "ours bwd streamed": lambda i: ops.softmax_backward(ys[i], dys[i], 0, 1),
            "aten bwd": lambda i: torch._softmax_backward_data(dys[i], ys[i], -1, dtype),
        }
        times: dict[str, list[float]] = {name: [] for name in entries}
        for _ in range(args.rounds):
            for name, call in entries.items():
                for i in range(args.sets):
                    start = time.perf_counter()
                    call(i)
                    times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        gbs = 2 * xs[0].nbytes / ms["ours fwd"] / 1e6
        lines.append((shape, ms, gbs))
        print(f"{shape[0]}x{shape[1]}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f" | fwd x{ms['aten fwd'] / ms['ours fwd']:.2f} ({gbs:.1f} GB/s),"
              f" bwd x{ms['aten bwd'] / ms['ours bwd']:.2f}, streamed x{ms['aten bwd'] / ms['ours bwd streamed']:.2f}",
              flush=True)
    ceiling = max(ceiling, measure_copy_bandwidth(cpu, 128 << 20)["GBps"])
    print(f"copy ceiling {ceiling:.1f} GB/s; forward %copy: "
          + ", ".join(f"{s[0]}x{s[1]} {100 * gbs / ceiling:.0f}%" for s, _, gbs in lines))


if __name__ == "__main__":
    main()
