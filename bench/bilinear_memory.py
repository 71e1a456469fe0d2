#!/usr/bin/env python
"""Peak memory and time of bilinear forward+backward: mmkernels vs F.bilinear, one run, CPU or CUDA.

    python bench/bilinear_memory.py [--n 8192 --b 256 --c 256 --d 64] [--device cpu] [--out FILE.json]

The sigma-pi memory target's shape (N=8192, b=c=256, d=64, fp32 on the CPU path):
F.bilinear's backward materialises the N×b×c outer product; ours does not — on CPU both of our
implementations are run: the C++ kernels (csrc/bilinear.cpp, blocked, a few hundred KB of
products per thread) and the vectorised-torch fallback (row chunks of 16 MB). Peak memory is what one
forward+backward allocates above what was live before (output and gradients included), from
``mmkernels.bench.check.peak_memory``; time is one warm call (F.bilinear takes about a minute on
a 2-core CPU at this shape).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import _cpp
from mmkernels.bench.check import peak_memory



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in (("n", 8192), ("b", 256), ("c", 256), ("d", 64)):
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(a.n, a.b, device=dev, generator=gen).requires_grad_()
    x = torch.randn(a.n, a.c, device=dev, generator=gen).requires_grad_()
    w = (torch.randn(a.d, a.b, a.c, device=dev, generator=gen) / a.b).requires_grad_()
    bias = torch.randn(a.d, device=dev, generator=gen).requires_grad_()
    dy = torch.randn(a.n, a.d, device=dev, generator=gen)
    out = {"shape": vars(a), "torch": torch.__version__}
    impls = [("mmkernels", mmkernels.bilinear, "auto")]
    if dev.type == "cpu" and _cpp.load():  # both CPU implementations, forward and backward
        impls = [("mmkernels", mmkernels.bilinear, "cpp"), ("torch path", mmkernels.bilinear, "torch")]
    for name, fn, impl in impls + [("F.bilinear", F.bilinear, "auto")]:
        def step():
            for t in (z, x, w, bias):
                t.grad = None
            with _cpp.use_cpu_impl(impl):
                y = fn(z, x, w, bias)
                y.backward(dy)
            return y
        print(f"{name}: warm-up ...", file=sys.stderr, flush=True)
        step()
        peak, how = peak_memory(step, dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        out[name] = {"peak_bytes": peak, "peak_method": how, "seconds": secs}
        print(f"{name:11s} forward+backward: peak {peak / 2**20:8.1f} MiB   time {secs:8.2f} s", flush=True)
    ratio = out["mmkernels"]["peak_bytes"] / out["F.bilinear"]["peak_bytes"]
    speed = out["F.bilinear"]["seconds"] / out["mmkernels"]["seconds"]
    out["peak_ratio"], out["speedup"] = ratio, speed
    print(f"peak memory ours / F.bilinear = {100 * ratio:.1f}%   speed-up = {speed:.1f}x")
    if "torch path" in out:
        vs = out["torch path"]["seconds"] / out["mmkernels"]["seconds"]
        out["speedup_vs_torch_path"] = vs
        print(f"C++ path vs the vectorised-torch path: {vs:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
