#!/usr/bin/env python
"""Expert GEMM launch configs on a GPU: each kernel of ``moe.experts`` timed alone, the resolver's
config next to alternatives, at the issue's model shapes (T = 16384, bf16) and both routing tile
heights (``block_m`` 64 and 128).

For each shape and ``block_m``: one real forward (with the saved pre-activation) and backward run
with every launch recorded (kernel, grid, arguments); then each GEMM kernel is relaunched with each
candidate config on those same buffers, its output compared with the resolver's (relative error)
and timed (``triton.testing.do_bench`` medians). The combine and routing-weight kernels are timed
once. Also times transformers' ``grouped_mm`` experts (forward, forward + backward) where
transformers imports, so the per-kernel sums can be read against the target. Writes JSON after
every shape (``--out``) and prints a table last.

    PYTHONUNBUFFERED=1 python bench/experts_configs.py --out experts_configs.json
    python bench/experts_configs.py --dry-run     # CPU, Triton's interpreter: the script's check
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

#: (H, I, E, k) — as mmkernels.families.experts.SHAPES.
SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2), "olmoe": (2048, 1024, 64, 8)}

#: Which launch is which role, and the buffer it writes.
OUTPUT = {"up": "a_ptr", "down": "out_ptr", "dact": "dh_ptr", "dx": "out_ptr", "dgate_up": "grad_ptr", "ddown": "grad_ptr"}


def role_of(name: str, kw: dict, I: int):
    """The role (ops.experts.KERNELS) of a recorded launch; None for the non-GEMM kernels."""
    if name == "experts_rows_kernel":
        return "down" if kw["WEIGHTED"] else "dx"
    return {"experts_up_kernel": "up", "experts_dact_kernel": "dact"}.get(name) or (
        ("dgate_up" if kw["M"] == 2 * I else "ddown") if name == "experts_dweight_kernel" else None)


def candidates(role: str, X, resolved):
    """The resolver's config first, then alternatives (``block_m`` of the grouped GEMMs is the
    routing's). Spilling ones are measured too and flagged (``spills``)."""
    C = X.ExpertsConfig
    if role in ("dgate_up", "ddown"):
        alt = [C(128, 128, 64, 8, 4, 8), C(128, 256, 64, 8, 3, 8), C(256, 128, 64, 8, 3, 8), C(64, 128, 64, 8, 3, 8),
               C(128, 128, 32, 8, 4, 8), C(128, 128, 64, 8, 3, 32), C(128, 128, 64, 4, 3, 8)]
    else:
        alt = {"up": [C(0, 64, 64, 8, 3, 8), C(0, 128, 64, 8, 4, 8), C(0, 128, 64, 16, 4, 8), C(0, 64, 64, 4, 4, 8),
                      C(0, 64, 128, 8, 3, 8), C(0, 64, 64, 8, 4, 32)],
               "down": [C(0, 128, 64, 8, 4, 8), C(0, 256, 64, 8, 3, 8), C(0, 256, 64, 16, 3, 8), C(0, 128, 64, 8, 3, 32),
                        C(0, 128, 128, 8, 3, 8)],
               "dact": [C(0, 64, 64, 8, 4, 8), C(0, 128, 64, 8, 3, 8), C(0, 64, 64, 4, 4, 8), C(0, 64, 128, 8, 3, 8),
                        C(0, 128, 64, 16, 3, 8)],
               "dx": [C(0, 128, 64, 8, 3, 8), C(0, 256, 64, 8, 3, 8), C(0, 128, 128, 8, 3, 8), C(0, 64, 64, 4, 4, 8),
                      C(0, 128, 64, 8, 4, 32), C(0, 256, 64, 16, 3, 8)]}[role]
    grouped = role not in ("dgate_up", "ddown")
    same = lambda c: (dataclasses.replace(c, block_m=resolved.block_m) if grouped else c) == resolved  # noqa: E731
    return [resolved] + [c for c in alt if not same(c)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the interpreter")
    p.add_argument("--only", default=None, metavar="NAME", help="only this shape (qwen3, mixtral, olmoe)")
    p.add_argument("--max-s", type=float, default=240.0, help="stop starting new measurements after this long")
    p.add_argument("--block-m", type=int, action="append", default=None, help="routing tile heights (64, 128)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 16384; 64 for decode)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from mmkernels import moe
    from mmkernels._triton import experts as KX
    from mmkernels.ops import experts as X
    from mmkernels.ops._launch import named_arguments

    t_start = time.time()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    shapes = {"tiny": (48, 40, 4, 2)} if args.dry_run else dict(SHAPES)
    if args.only:
        shapes = {args.only: shapes[args.only]}
    T = args.tokens or (64 if args.dry_run else 16384)
    block_ms = (16, 32) if args.dry_run else tuple(args.block_m or (64, 128))

    if args.dry_run:
        def bench(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    else:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    kernels = ["experts_up_kernel", "experts_rows_kernel", "experts_combine_kernel", "experts_dact_kernel",
               "experts_dweight_kernel", "experts_gather_kernel", "experts_dw_kernel"]

    @contextlib.contextmanager
    def recording(calls):
        real = {n: getattr(KX, n) for n in kernels}

        class Rec:
            def __init__(self, name):
                self.name, self.arg_names = name, real[name].arg_names

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    kw = named_arguments(real[self.name], args, kw)
                    calls.append((self.name, real[self.name], grid, kw))
                    real[self.name][grid](**kw)
                return launch
        try:
            for n in kernels:
                setattr(KX, n, Rec(n))
            yield
        finally:
            for n in kernels:
                setattr(KX, n, real[n])

    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "T": T, "dtype": str(dtype), "rows": []}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    rows = info["rows"]

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)

    for shape, (H, I, E, k) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((T, H), generator=gen, device=device).to(dtype)
        logits = torch.randn((T, E), generator=gen, device=device)
        gu = (torch.randn((E, 2 * I, H), generator=gen, device=device) * H ** -0.5).to(dtype)
        dn = (torch.randn((E, H, I), generator=gen, device=device) * I ** -0.5).to(dtype)
        dout = torch.randn((T, H), generator=gen, device=device).to(dtype)
        flops_fwd = 6 * T * k * H * I
        for block_m in block_ms:
            r = moe.route(logits, k, renormalize=False, block_m=block_m)
            w = r.weights.to(dtype)
            spec = X.ExpertSpec()
            calls = []
            with recording(calls):
                _, h, _, a = X.triton_forward(x, w, gu, dn, None, None, r, spec, save_h=True)
                X.triton_backward(dout, x, w, gu, dn, None, None, r, h, a, spec, (True,) * 6)
            if device.type == "cuda":
                torch.cuda.synchronize()
            for name, kernel, grid, kw in calls:
                role = role_of(name, kw, I)
                label = f"{shape} bm={block_m} {role or name}"
                if role is None:
                    ms = bench(lambda: kernel[grid](**kw))
                    rows.append(dict(shape=shape, block_m=block_m, role=name, config=None, ms=ms))
                    print(f"{time.time() - t_start:6.0f}s {label}: {ms:.4f} ms", flush=True)
                    continue
                ref = kw[OUTPUT[role]].clone()
                base = None
                arch = X.gpu_arch(x)
                if role in ("dgate_up", "ddown"):
                    resolved = X.resolve_config(role, 0, *((H, 2 * I) if role == "dgate_up" else (I, H)), dtype, arch)
                else:
                    resolved = X.resolve_config(role, block_m, *((I, H) if role in ("up", "dact") else
                                                                 (H, 2 * I) if role == "dx" else (H, I)), dtype, arch)
                for cand in candidates(role, X, resolved):
                    if time.time() - t_start > args.max_s:
                        print(f"time budget reached: skipping the rest of {label}", flush=True)
                        break
                    kw2 = dict(kw)
                    if role in ("dgate_up", "ddown"):
                        m, n = (2 * I, H) if role == "dgate_up" else (H, I)
                        grid2, tiling = X.weight_grad_launch(E, m, n, cand)
                        kw2.update(tiling)
                    else:
                        cand = dataclasses.replace(cand, block_m=block_m)
                        n = I if role in ("up", "dact") else H
                        grid2, tiling = X.grouped_launch(r, n, cand)
                        grid2 = grid2 + tuple(grid[1:])  # the recorded split-K planes
                        kw2.update(tiling)
                        if role == "dact":
                            nb = -(-I // cand.block_n)
                            kw2["dwp_ptr"] = torch.empty((T * k, nb), dtype=torch.float32, device=device)
                            kw2["NB_I"] = nb
                    out = kw2[OUTPUT[role]]
                    out.fill_(float("nan"))
                    try:
                        t0 = time.time()
                        compiled = kernel[grid2](**kw2)
                        spills = getattr(compiled, "n_spills", None)
                        regs = getattr(compiled, "n_regs", None)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        compile_s = time.time() - t0
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        ms = bench(lambda: kernel[grid2](**kw2))
                        status = "ok" if err < 2e-2 else "MISMATCH"
                    except Exception as exc:  # out of resources, ...
                        ms, err, compile_s, spills, regs = None, None, None, None, None
                        status = f"{type(exc).__name__}: {str(exc)[:120]}"
                    cfg = dataclasses.asdict(cand)
                    rows.append(dict(shape=shape, block_m=block_m, role=role, config=cfg, ms=ms, err=err,
                                     status=status, compile_s=compile_s, spills=spills, regs=regs))
                    if base is None and ms is not None:
                        base = ms
                    rel = f" ({base / ms:.2f}x first)" if ms else ""
                    print(f"{time.time() - t_start:6.0f}s {label} {cfg}: "
                          f"{'' if ms is None else f'{ms:.4f} ms'}{rel} err={err} {status} spills={spills} regs={regs}",
                          flush=True)
                kw[OUTPUT[role]].copy_(ref)
            save()
        # transformers' grouped_mm experts on the same weights, for the target
        hf = _hf_grouped_mm(H, I, E, k, gu, dn) if device.type == "cuda" else None
        if hf is not None:
            xg = x.detach().requires_grad_()
            wts, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            fwd = lambda: hf(x, ids, wts.to(dtype))  # noqa: E731

            def fb():
                out = hf(xg, ids, wts.to(dtype))
                torch.autograd.grad(out, [xg, hf.gate_up_proj, hf.down_proj], dout)

            for direction, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                ms = bench(fn)
                rows.append(dict(shape=shape, block_m=None, role=f"transformers grouped_mm {direction}", ms=ms,
                                 tflops=(flops_fwd * (3 if direction != "fwd" else 1)) / ms / 1e9))
                print(f"{time.time() - t_start:6.0f}s {shape} transformers grouped_mm {direction}: {ms:.4f} ms",
                      flush=True)
            save()
        del x, gu, dn, dout
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    _table(rows)
    return 0


def _hf_grouped_mm(H, I, E, k, gu, dn):
    import torch

    from mmkernels.families.experts import hf_experts

    mod = hf_experts(H, I, E, k, torch.nn.Parameter(gu.detach().clone()), torch.nn.Parameter(dn.detach().clone()))
    if mod is None:
        return None
    mod.config._experts_implementation = "grouped_mm"
    return mod


def _table(rows) -> None:
    """Per shape and block_m: each role's first (resolver) and best config; the sums."""
    print("\nshape    bm   role      first ms   best ms   best config (without spills)")
    groups = {}
    for r in rows:
        if r.get("config") is None or r.get("ms") is None or r.get("status") != "ok":
            continue
        groups.setdefault((r["shape"], r["block_m"], r["role"]), []).append(r)
    sums = {}
    for (shape, bm, role), rs in groups.items():
        clean = [r for r in rs if not r.get("spills")] or rs
        best = min(clean, key=lambda r: r["ms"])  # the fastest without spills
        c = best["config"]
        print(f"{shape:8s} {bm:4d} {role:9s} {rs[0]['ms']:9.4f} {best['ms']:9.4f}   "
              f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']} g{c['group']}")
        s = sums.setdefault((shape, bm), [0.0, 0.0])
        s[0] += rs[0]["ms"]
        s[1] += best["ms"]
    for r in rows:
        if r.get("config") is None and r.get("ms") is not None and r.get("block_m") is not None:
            s = sums.setdefault((r["shape"], r["block_m"]), [0.0, 0.0])
            s[0] += r["ms"]
            s[1] += r["ms"]
    for (shape, bm), (first, best) in sums.items():
        print(f"{shape:8s} {bm:4d} all kernels (fwd+bwd): resolver {first:.3f} ms, best {best:.3f} ms")
    for r in rows:
        if str(r.get("role", "")).startswith("transformers"):
            print(f"{r['shape']:8s} {r['role']}: {r['ms']:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
