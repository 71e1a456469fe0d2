#!/usr/bin/env python
"""Peak memory and time of an output layer's loss, forward + backward: mmkernels.linear_cross_entropy
against the unfused ``F.cross_entropy(F.linear(x, W), t)`` and ``F.linear_cross_entropy`` with its
chunking options, one run.

    python bench/linear_cross_entropy_memory.py [--tokens 4096 --hidden 1024 --vocab 32000]
        [--dtype float32] [--label-smoothing 0] [--device cpu] [--repeats 3] [--out FILE.json]

Peak memory is what one forward + backward allocates above what was live before (the inputs),
from :func:`mmkernels.bench.check.peak_memory`, less the gradients of the input and the weight
(which every variant returns): "above the inputs and their gradients". Time: the median of
``--repeats`` warm calls, the variants interleaved (round robin) so that a machine whose speed
drifts affects each alike. Every 16th token is ignored. Label smoothing defaults to 0: torch's
chunked path takes none (with smoothing it falls back to the unfused composition, with a warning).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.check import peak_memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(a.tokens, a.hidden, device=dev, generator=gen).to(dtype)
    w = (torch.randn(a.vocab, a.hidden, device=dev, generator=gen) / a.hidden ** 0.5).to(dtype)
    target = torch.randint(0, a.vocab, (a.tokens,), device=dev, generator=gen)
    target[::16] = -100
    grads_bytes = (x.numel() + w.numel()) * x.element_size()
    logits_bytes = a.tokens * a.vocab * x.element_size()
    variants = {
        "mmkernels.linear_cross_entropy": lambda xx, ww: mmkernels.linear_cross_entropy(
            xx, ww, target, label_smoothing=a.label_smoothing),
        "unfused F.linear + F.cross_entropy": lambda xx, ww: F.cross_entropy(
            F.linear(xx, ww), target, label_smoothing=a.label_smoothing),
        "F.linear_cross_entropy (chunked)": lambda xx, ww: F.linear_cross_entropy(
            xx, ww, target, label_smoothing=a.label_smoothing, options=torch.nn.LinearCrossEntropyOptions()),
    }
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step(fn):
        def run():
            xl.grad = wl.grad = None
            loss = fn(xl, wl)
            loss.backward()
            return loss
        return run

    out = {"shape": vars(a), "torch": torch.__version__, "logits_bytes": logits_bytes, "grads_bytes": grads_bytes}
    for name, fn in variants.items():
        print(f"{name}: warm-up and peak memory ...", file=sys.stderr, flush=True)
        step(fn)()
        xl.grad = wl.grad = None
        peak, how = peak_memory(step(fn), dev)
        out[name] = {"peak_above_inputs_and_grads": peak - grads_bytes, "peak_method": how, "seconds": []}
    for r in range(a.repeats):
        for name, fn in variants.items():
            print(f"timing {r + 1}/{a.repeats}: {name} ...", file=sys.stderr, flush=True)
            run = step(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            run()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            out[name]["seconds"].append(time.perf_counter() - t0)
    base = out["unfused F.linear + F.cross_entropy"]
    for name in variants:
        row = out[name]
        row["median_s"] = statistics.median(row["seconds"])
        row["time_over_unfused"] = row["median_s"] / statistics.median(base["seconds"])
        row["memory_over_unfused"] = row["peak_above_inputs_and_grads"] / base["peak_above_inputs_and_grads"]
        print(f"{name:36s} fwd+bwd: {row['peak_above_inputs_and_grads'] / 2**20:9.1f} MiB above inputs and grads"
              f" ({row['memory_over_unfused']:.3f} x unfused), {row['median_s']:7.2f} s median of "
              f"{[round(s, 2) for s in row['seconds']]} ({row['time_over_unfused']:.2f} x unfused)", flush=True)
    print(f"logits alone: {logits_bytes / 2**20:.1f} MiB")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
