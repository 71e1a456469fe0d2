#!/usr/bin/env python
"""Routing launch configs on a GPU: the resolver's choice next to alternatives, and where the time goes.

For each shape: the resolver's config and alternatives (router token block ``BLOCK_T`` with its
warps, scan experts per program), each checked against the resolver's outputs (integers bit for bit, weights within 1e-6; a
mismatch names the outputs that differ) and
timed (CUDA-graph replays of the three launches; medians); then each launch of the resolver's
config alone (the router, the scan, the scatter), to see which one to work on. Writes a JSON file
with ``--out`` and prints a table last.

    PYTHONUNBUFFERED=1 python bench/routing_configs.py --out routing_configs.json
    python bench/routing_configs.py --dry-run     # CPU, Triton's interpreter: the script's check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the interpreter")
    p.add_argument("--only", default=None, metavar="SUBSTR", help="only the shapes whose label contains SUBSTR")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from mmkernels.bench.timing import time_fn
    from mmkernels.ops import routing as R
    from mmkernels.ops._launch import named_arguments

    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        shapes = [("mixtral", 64, 16, 4, torch.float32, {})]
    else:
        shapes = [("mixtral", 16384, 128, 8, torch.float32, {}), ("mixtral", 16384, 128, 8, torch.bfloat16, {}),
                  ("mixtral", 16384, 8, 2, torch.bfloat16, {}),
                  ("deepseek", 16384, 256, 8, torch.float32,
                   dict(scoring="sigmoid", n_groups=8, topk_groups=4, routed_scaling=2.5, key_on_scores=True))]
    rows = []
    for style, T, E, k, dtype, kw in shapes:
        if args.only and args.only not in f"{style} {T}x{E} k={k} {str(dtype)[6:]}":
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn((T, E), generator=gen, device=device) * 2).to(dtype)
        bias = torch.randn((E,), generator=gen, device=device) * 0.1 if style == "deepseek" else None
        spec = R.RouterSpec(k, **kw)
        cap = 2**31 - 1
        base_cfg = R.resolve_config(T, E, k)

        def run(cfg):
            return R.triton_route(logits, bias, None, spec, cap, R.DEFAULT_BLOCK_M, config=cfg)

        want = run(base_cfg)
        cands = [base_cfg]
        for bt in (4, 8, 16, 32, 64):
            tile = bt * base_cfg.e_pad
            if tile > 8192 or bt == base_cfg.block_t:
                continue
            for per_thread in (8, 16):
                nw = max(1, min(8, tile // (32 * per_thread)))
                cands.append(dataclasses.replace(base_cfg, block_t=bt, num_warps=nw))
        for sc in (8, 32, 64):
            if sc <= base_cfg.e_pad and sc != base_cfg.scan_cols:
                cands.append(dataclasses.replace(base_cfg, scan_cols=sc,
                                                 chunk_b=max(1, min(R.SCAN_MAX_ROWS, R.SCAN_TILE // sc))))
        seen = set()
        for cfg in cands:
            if cfg in seen:
                continue
            seen.add(cfg)
            try:
                got = run(cfg)
                names = ("weights", "expert_ids", "counts", "offsets", "sorted_slots", "slot_rows", "dropped",
                         "tile_experts", "tile_row_starts", "num_tiles")
                differ = [n for n, a, b in zip(names[1:], got[1:], want[1:]) if not torch.equal(a, b)]
                wdiff = (got[0].double() - want[0].double()).abs().max().item()
                if wdiff > 1e-6:  # the weights within fp32 rounding of a different summation order
                    differ.append(f"weights (max diff {wdiff:.2e})")
                same = not differ
                t = time_fn([lambda c=cfg: run(c)], device, graph=not args.dry_run,
                            repeats=3 if args.dry_run else None, target_s=0.1)
                ms, err = t.median_ms, None
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                same, ms, err, differ = False, None, f"{type(exc).__name__}: {str(exc)[:200]}", []
            if differ and not err:  # which side is right: the float64 reference
                try:
                    from mmkernels.reference import route_ref

                    ref = route_ref(logits.double().cpu(), k,
                                    selection_bias=None if bias is None else bias.double().cpu(),
                                    **{a: b for a, b in kw.items() if a != "key_on_scores"})
                    for label, out in (("config", got), ("resolver", want)):
                        bad = [n for n, t in zip(("expert_ids", "counts", "offsets", "sorted_slots"), out[1:5])
                               if not torch.equal(t.cpu(), ref[n].to(t.dtype))]
                        differ.append(f"{label} vs float64 reference: "
                                      f"{'exact' if not bad else 'DIFFERS in ' + '/'.join(bad)}")
                except Exception as exc:  # noqa: BLE001 - a diagnostic
                    differ.append(f"reference comparison failed: {type(exc).__name__}: {exc}")
            rows.append({"shape": f"{style} {T}x{E} k={k} {str(dtype)[6:]}", "config": dataclasses.asdict(cfg),
                         "resolver": cfg == base_cfg, "ms": ms, "same_as_resolver": same, "differs": differ,
                         "error": err})
            print(f"{rows[-1]['shape']}: BLOCK_T={cfg.block_t} w={cfg.num_warps} scan={cfg.scan_cols}x{cfg.chunk_b}"
                  f"{' (resolver)' if cfg == base_cfg else ''}: {ms if ms is None else round(ms * 1e3, 1)} us"
                  f" {'ok' if same else 'MISMATCH ' + ', '.join(differ)}{' ' + err if err else ''}", flush=True)
        # the three launches of the resolver's config, one at a time (the others' outputs as input)
        if not args.dry_run:
            from mmkernels._triton import routing as K

            calls = []
            real = {n: getattr(K, n) for n in ("route_topk_kernel", "route_scan_kernel", "route_scatter_kernel")}

            class Rec:
                def __init__(self, name):
                    self.name, self.arg_names = name, real[name].arg_names

                def __getitem__(self, grid):
                    return lambda *a, **kw_: calls.append((self.name, grid, named_arguments(real[self.name], a, kw_)))

            for n in real:
                setattr(K, n, Rec(n))
            try:
                run(base_cfg)
            finally:
                for n, f in real.items():
                    setattr(K, n, f)
            # (the scan's closing step runs only when the router zeroed its counter first: timed
            # alone, repeats skip it -- a few microseconds of one program)
            try:
                for name, grid, kw_ in calls:
                    real[name][grid](**kw_)  # fills the buffers the next launch reads
                for name, grid, kw_ in calls:
                    t = time_fn([lambda f=real[name], g=grid, a=kw_: f[g](**a)], device, graph=True, target_s=0.1)
                    rows.append({"shape": rows[-1]["shape"], "launch": name, "grid": list(grid), "ms": t.median_ms})
                    print(f"  {name} grid {grid}: {t.median_ms * 1e3:.1f} us", flush=True)
            except Exception as exc:  # noqa: BLE001 - the per-launch split is a diagnostic
                print(f"  per-launch timing failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows},
                      f, indent=1)
    bad = [r for r in rows if "same_as_resolver" in r and not r["same_as_resolver"]]
    print(f"{len(rows)} rows; {len(bad)} configs disagree with the resolver or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
