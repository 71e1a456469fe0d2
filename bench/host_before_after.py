"""Host time of one MoE layer, before and after, in one process: the main job's measurement
(:func:`mmkernels.bench.host.moe_layer_host_time`: launches recorded, one thread, median) for
this checkout and for an earlier commit, their iterations interleaved so that both see the same
machine. On a shared VM whose speed moves by 2x from minute to minute, figures from separate runs
(even two processes at once) cannot give a ratio; this can.

The earlier commit is exported with ``git archive`` into a temporary directory as a package named
``mmkernels_before`` (every ``mmkernels`` name in its Python sources renamed, its kernels as
``mmkernels_before._triton``); the current :mod:`mmkernels.bench.host` is copied into it, so both
are timed by the same code. Only the Triton path runs (on CPU tensors, nothing launched).

    python bench/host_before_after.py --rev cc89e08     # the parent of the first host-time change
    python bench/host_before_after.py --rev cc89e08 --layers 8   # per layer in a stack of 8
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def export(rev: str, dest: pathlib.Path) -> None:
    """``rev``'s ``mmkernels/`` and ``triton_kernels/`` as the package ``dest/mmkernels_before``."""
    raw = dest / "raw"
    raw.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "mmkernels", "triton_kernels"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(raw)], input=archive, check=True)
    pkg = dest / "mmkernels_before"
    shutil.copytree(raw / "mmkernels", pkg)
    shutil.copytree(raw / "triton_kernels", pkg / "_triton")
    shutil.copy(ROOT / "mmkernels" / "bench" / "host.py", pkg / "bench" / "host.py")
    backend = pkg / "_backend.py"
    if "def kernel_names(" not in backend.read_text():  # older than the helper host.py now uses
        src = (ROOT / "mmkernels" / "_backend.py").read_text()
        fn = src[src.index("def kernel_names("):]
        fn = fn[:fn.index("\n\n\n")].replace(" -> List[str]", "")
        backend.write_text(backend.read_text() + "\n\n" + fn + "\n")
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bmmkernels\b", "mmkernels_before", text))


def interleaved(packages, repeats: int, warmup: int, layers: int = 1, **shape):
    """Median host µs per layer (forward, backward) of each package's layer — or stack of
    ``layers`` layers, one backward call for the stack, as
    :func:`mmkernels.bench.host.moe_layer_host_time` — one iteration of each in turn."""
    import contextlib

    import torch

    torch.set_num_threads(1)
    runs = []
    with contextlib.ExitStack() as stack:
        for pkg in packages:
            host = __import__(f"{pkg}.bench.host", fromlist=["host"])
            nn = __import__(f"{pkg}.nn", fromlist=["nn"])
            torch.manual_seed(0)
            model = [nn.MoE(shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"])
                     for _ in range(layers)]
            x = torch.randn(shape["tokens"], shape["hidden"], requires_grad=True)
            stack.enter_context(host.launches_recorded())
            runs.append((model, x, [], []))
        for i in range(warmup + repeats):
            for model, x, fwd, bwd in runs:
                t0 = time.perf_counter()
                out = x
                for layer in model:
                    out = layer(out).output
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                t2 = time.perf_counter()
                if i >= warmup:
                    fwd.append((t1 - t0) * 1e6 / layers)
                    bwd.append((t2 - t1) * 1e6 / layers)
                for layer in model:
                    layer.zero_grad(set_to_none=True)
                x.grad = None
    return [(statistics.median(f), statistics.median(b)) for _, _, f, b in runs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="cc89e08", help="the earlier commit (default: cc89e08)")
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3, help="independent interleaved runs")
    p.add_argument("--layers", type=int, default=1,
                   help="a stack of this many layers, one backward call, figures per layer (default: 1)")
    args = p.parse_args(argv)
    shape = dict(tokens=16, hidden=32, intermediate=16, experts=16, top_k=4)  # moe_layer_host_time's
    with tempfile.TemporaryDirectory() as tmp:
        export(args.rev, pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        sys.path.insert(0, str(ROOT))
        what = "one layer" if args.layers == 1 else f"per layer in a stack of {args.layers}"
        print(f"MoE layer host time, launches recorded, {shape}, {what}: {args.rev} vs this checkout, interleaved")
        for r in range(args.rounds):
            (bf, bb), (af, ab) = interleaved(["mmkernels_before", "mmkernels"], max(100, args.repeats // args.layers), 20,
                                                  args.layers, **shape)
            print(f"round {r + 1}: forward {bf:.0f} -> {af:.0f} us ({af / bf:.2f}x), "
                  f"backward {bb:.0f} -> {ab:.0f} us ({ab / bb:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
