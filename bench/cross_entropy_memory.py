#!/usr/bin/env python
"""Peak memory and time of cross-entropy forward+backward: mmkernels vs F.cross_entropy, one run.

    python bench/cross_entropy_memory.py [--n 8192 --c 32000] [--device cpu] [--out FILE.json]

The cross-entropy memory target's shape: (8192, 32000) fp32 logits on the CPU path, whose peak memory must be
at most the logits plus the gradient — no full-size temporary. The logits are a view of a leaf
``h`` (an op's output, as the output layer's, so that ``inplace_backward`` applies; the gradient
lands in ``h.grad``). Peak memory is what one forward+backward allocates above what was live
before (the logits), gradient included, from ``mmkernels.bench.check.peak_memory``; the logits'
own size is added back to state the total. Time is one warm call.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.check import peak_memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--c", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(a.n, a.c, device=dev, generator=gen).requires_grad_()
    target = torch.randint(0, a.c, (a.n,), device=dev, generator=gen)
    target[::17] = -100
    logits_bytes = h.numel() * h.element_size()
    out = {"shape": vars(a), "torch": torch.__version__, "logits_bytes": logits_bytes}
    for name, fn in (("mmkernels", lambda x: mmkernels.cross_entropy(x, target, label_smoothing=0.1)),
                     ("mmkernels inplace_backward",
                      lambda x: mmkernels.cross_entropy(x, target, label_smoothing=0.1, inplace_backward=True)),
                     ("F.cross_entropy", lambda x: F.cross_entropy(x, target, label_smoothing=0.1))):
        def step():
            h.grad = None
            x = h.view_as(h)  # the logits as an op's output (a view: no allocation)
            loss = fn(x)
            loss.backward()  # the gradient lands in h.grad (inplace_backward: in h's own storage)
            return loss

        print(f"{name}: warm-up ...", file=sys.stderr, flush=True)
        step()
        peak, how = peak_memory(step, dev)
        t0 = time.perf_counter()
        step()
        secs = time.perf_counter() - t0
        total = peak + logits_bytes
        out[name] = {"peak_bytes_above_live": peak, "peak_total_bytes": total,
                     "peak_over_logits_plus_grad": total / (2 * logits_bytes), "peak_method": how, "seconds": secs}
        print(f"{name:27s} fwd+bwd: above live {peak / 2**20:9.1f} MiB, with the logits {total / 2**20:9.1f} MiB"
              f" = {total / (2 * logits_bytes):.3f} x (logits + gradient); {secs:6.2f} s", flush=True)
    out["speedup"] = out["F.cross_entropy"]["seconds"] / out["mmkernels"]["seconds"]
    print(f"speed-up vs F.cross_entropy: {out['speedup']:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
