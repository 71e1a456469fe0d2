#!/usr/bin/env python
"""GPU tier (DESIGN.md, "Verification tiers" 4): correctness and speed of every op family on CUDA.

On a lent H100 / H200 (torch 2.11, triton 3.6, Python 3.12, no network):

    pip install --no-deps --no-build-isolation -e .
    PYTHONUNBUFFERED=1 python bench/gpu_suite.py --out "$OUT" --commit <sha>

In order:

1. the two ceilings, measured now: device-to-device copy bandwidth (bytes read + written, 1 GiB)
   and the rate of an 8192^3 bf16 ``torch.mm`` on random data;
2. per op family, on the registry cases tagged ``gpu``: correctness on fresh random inputs with the
   package's outputs poisoned with NaN, against the float64 references of :mod:`mmkernels.reference`
   (every element must be written; errors within the tolerance table, on a bounded sample of whole
   rows that always holds the first and last); then median timings of ours and of the baselines
   (CUDA-graph replays of sub-millisecond calls, CUDA events otherwise; rotation among buffer sets
   when the inputs fit in L2), as ratio vs torch eager and as a fraction of the copy bandwidth
   (matmul families also: useful FLOPs / time as a fraction of the bf16 mm rate); a family whose
   Triton module does not import is skipped, and the output says so;
3. config exploration: the families' probes, alternative launch configs timed next to the
   resolver's choice (:mod:`mmkernels.bench.explore`), checked against the resolver's output;
4. the acceptance targets of each family, PASS / FAIL; with the routing or experts family, the
   MoE host times with the kernels launched (:func:`host_times`: one layer's forward and backward,
   one ``moe.route`` call against its 60 µs target);
5. ``gpu_suite.json`` (everything: environment, ceilings, raw medians and samples) and
   ``gpu_suite.md`` in ``--out``; a results table, then a short summary last.

Exit status: 0 when every correctness check passed, 1 when one failed or a case crashed (and with
``--strict`` when a target failed), 2 on a usage error. It budgets itself to finish within
``--max-minutes`` (default 4.0): cases left when the budget is spent are skipped and listed.

``--dry-run`` runs the same code path on CPU, through Triton's interpreter, on the families' tiny
fp32/fp16 cases tagged ``dry-run`` (bf16 arithmetic is unreliable under the interpreter), with
``perf_counter`` timings: the check that the script works before GPU minutes are spent on it. Its
timings mean nothing.

This script holds no measurement code of its own: timing, ceilings, checks, bench specs, targets
and tables come from :mod:`mmkernels.bench` (the main job ``python -m mmkernels bench``).
"""
from __future__ import annotations

# Only the standard library at module level: --dry-run must set the environment before torch,
# triton or mmkernels are imported.
import argparse
import dataclasses
import datetime
import importlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, MD_NAME = "gpu_suite.json", "gpu_suite.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results/<date>-<device>/; a temporary folder "
                        "with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Triton interpreter, tiny fp32/fp16 cases: check that the script runs")
    p.add_argument("--family", action="append", default=None, metavar="NAME",
                   help="only these op families, in this order (repeatable; default: every family)")
    p.add_argument("--filter", default=None, metavar="SUBSTR",
                   help="only variants whose '<case id> <op> <direction>' (fwd, bwd, fwd+bwd) contains "
                        "every word of SUBSTR, and config-exploration probes whose id does")
    p.add_argument("--compile-baseline", action="store_true",
                   help="also time torch.compile of the baselines (inductor compiles each case: "
                        "seconds per case; combine with --filter to stay in budget)")
    p.add_argument("--target-s", type=float, default=0.15,
                   help="seconds of timed samples per measurement (default 0.15)")
    p.add_argument("--max-minutes", type=float, default=4.0,
                   help="skip the cases left once this much time has passed (default 4.0)")
    p.add_argument("--commit", default=None,
                   help="commit to record when the tree has no .git (e.g. on the device machine)")
    p.add_argument("--strict", action="store_true", help="also exit 1 when an acceptance target fails")
    p.add_argument("--plot", action="store_true", help="also write gpu_suite.png (matplotlib)")
    return p.parse_args(argv)


def unavailable_families(names) -> dict:
    """{family: why} for the families whose Triton kernel module fails to import (e.g. a kernel
    being rewritten): the suite skips them and says so."""
    from mmkernels.families import family

    out = {}
    for name in names:
        module = family(name).kernels_module
        try:
            importlib.import_module(module)
        except ImportError as exc:
            out[name] = f"{module} does not import ({type(exc).__name__}: {str(exc)[:160]})"
    return out


def _progress(r: dict) -> str:
    """One variant's result in a few words, for the progress line."""
    if "error" in r:
        return f"{r['direction']} ERROR {r['error'][:80]}"
    ratio = f"x{r['ratio']:.2f}" if r.get("ratio") else "x?"
    others = " ".join(f"x{v:.2f} vs {k[6:]}" for k, v in r.items() if k.startswith("ratio_") and v)
    if others:
        ratio = f"{ratio} ({others})"
    frac = f"{100 * r['frac_copy']:.0f}%copy" if "frac_copy" in r else ""
    if "frac_mm" in r:
        frac = f"{r['TFLOPs']:.1f} TFLOP/s {100 * r['frac_mm']:.0f}%mm {frac}"
    return f"{r['direction']} {r['ours_ms']:.4f} ms {ratio} {frac} {'ok' if r['check']['passed'] else 'CHECK FAILED'}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_dir(device: str) -> Path:
    """``bench/results/<date>-<device slug>/``, with ``-2``, ``-3``... when that folder is taken."""
    base = ROOT / "bench" / "results" / f"{datetime.date.today().isoformat()}-{_slug(device)}"
    out, n = base, 1
    while out.exists() and any(out.iterdir()):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def write_markdown(path: Path, payload: dict) -> None:
    """The human-readable report: environment, ceilings, correctness, targets, results, raw medians."""
    from mmkernels.bench import ceilings_line, fmt_num, format_table, result_table

    env, rows = payload["environment"], payload["results"]
    checked = [r for r in rows if "error" not in r]
    failed = [r for r in rows if not r["check"]["passed"]]
    lines = [
        f"# GPU suite: {env['device']}{' (DRY RUN: interpreter on CPU, timings meaningless)' if payload['dry_run'] else ''}",
        "",
        f"- date: {env['date']}; elapsed {payload['elapsed_s']:.1f} s",
        f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}, CUDA {env.get('cuda')}",
        f"- commit: {env['commit']}",
        f"- backend {env['backend']} -> {env['impl']}; interpreter {env['triton_interpreter']}; "
        f"SMs {env.get('sm_count')}; last-level cache {env['cache_bytes'] / 2**20:.0f} MiB",
        f"- references: {payload['reference']}",
        f"- {ceilings_line(payload['ceilings'])}",
        "",
        "## Correctness",
        "",
        f"{len(rows) - len(failed)}/{len(rows)} passed (outputs poisoned with NaN; every element must "
        "be written; normwise errors vs float64 within the tolerance table).",
        "",
    ]
    if failed:
        lines.append(format_table(["case", "dir", "detail"],
                                  [[r["case"], r["direction"], r["check"].get("detail", "")] for r in failed],
                                  markdown=True))
        lines.append("")
    lines += ["## Acceptance targets", ""]
    lines.append(format_table(
        ["target", "status", "worst", "rows", "failing"],
        [[t["target"], t["status"], fmt_num(t["worst"], ".3f"), t["rows"], "; ".join(t["failing"][:6])]
         for t in payload["targets"]], markdown=True))
    lines += ["", "## Results", "",
              "ratio = torch eager time / ours (> 1: ours faster); %copy = (minimum bytes / time) / "
              "measured copy bandwidth; TFLOP/s = useful FLOPs / time (matmul families); %mm = that / "
              "measured bf16 mm rate; mem = peak bytes allocated by one call, output included.", ""]
    lines.append(result_table(rows, markdown=True))
    lines += ["", "## Raw medians (ms)", "",
              "`graph`: CUDA-graph replays (device time); `per call`: CUDA events around each call "
              "enqueued back to back (launch overhead shows when the host is the bottleneck); `floor`: "
              "minimum bytes at the copy bandwidth; `mm floor`: useful FLOPs at the mm rate.", ""]
    raw = []
    for r in checked:
        t = r["timings"]
        raw.append([r["case"], r["direction"], fmt_num(r["ours_ms"], ".5f"),
                    fmt_num(r["baseline_ms"].get("eager"), ".5f"), fmt_num(r["baseline_ms"].get("compile"), ".5f"),
                    fmt_num(r.get("ours_percall_ms"), ".5f"), fmt_num(r.get("eager_percall_ms"), ".5f"),
                    t["ours"]["method"], t["ours"]["calls_per_sample"], len(t["ours"]["samples_ms"]),
                    t["ours"]["buffer_sets"], fmt_num(t["ours"]["spread"], ".2f"), fmt_num(r.get("floor_ms"), ".5f"),
                    fmt_num(r.get("mm_floor_ms"), ".5f"),
                    ", ".join(f"{k} {v:.5f}" for k, v in r["baseline_ms"].items() if k not in ("eager", "compile"))])
    lines.append(format_table(["case", "dir", "ours", "eager", "compile", "ours per call", "eager per call",
                               "method", "calls/sample", "samples", "buffer sets", "spread", "floor",
                               "mm floor", "other baselines"],
                              raw, markdown=True))
    if payload.get("explore"):
        from mmkernels.bench.explore import EXPLORE_HEADERS, explore_table_rows

        lines += ["", "## Config exploration", "",
                  "The resolver's config and alternatives on the same data (bench/NOTES.md has the "
                  "predictions); %copy = (minimum bytes / time) / copy bandwidth.", ""]
        lines.append(format_table(EXPLORE_HEADERS, explore_table_rows(payload["explore"]), markdown=True))
    if payload.get("skipped_families"):
        lines += [""] + [f"Skipped family {f}: {why}" for f, why in payload["skipped_families"].items()]
    if payload.get("skipped"):
        lines += ["", f"Skipped (time budget): {', '.join(payload['skipped'])}"]
    path.write_text("\n".join(lines) + "\n")


#: The public route's host time per call that a GPU run is held to (T = 16384, E = 128, k = 8).
ROUTE_HOST_US = 60.0


def host_times(device, dry_run: bool) -> dict:
    """The MoE host times on ``device``, with the kernels launched: one ``nn.MoE`` layer's forward and
    backward (one layer, and per layer in a stack of eight) and one ``moe.route`` call at T = 16384,
    E = 128, k = 8 against :data:`ROUTE_HOST_US`. A dry run records the layer's launches instead
    (as the main job does) and routes 64 tokens: the interpreter would time its own Python."""
    from mmkernels.bench.host import STACK_LAYERS, host_time_line, moe_layer_host_time, route_host_time

    on = None if dry_run else device
    one = moe_layer_host_time(repeats=20 if dry_run else 200, device=on)
    stack = moe_layer_host_time(repeats=10 if dry_run else 100, layers=STACK_LAYERS, device=on)
    route = (route_host_time(device, tokens=64, experts=16, top_k=2, repeats=3, warmup=1) if dry_run
             else route_host_time(device))
    status = "PASS" if route["route_us"] <= ROUTE_HOST_US else "FAIL"
    lines = [host_time_line(one, stack),
             f"route host time per call {route['shape']}: {route['route_us']:.0f} µs "
             f"(target <= {ROUTE_HOST_US:.0f} µs at T=16384, E=128, k=8: {status if not dry_run else 'dry run'})"]
    return {"layer": one, "stack": stack, "route": route, "route_target_us": ROUTE_HOST_US,
            "route_status": None if dry_run else status, "lines": lines}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.dry_run:  # before torch / triton / mmkernels are imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["MMKERNELS_BACKEND"] = "triton"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it for a GPU run (or pass --dry-run)", file=sys.stderr)
        return 2
    if args.commit:
        os.environ["MMKERNELS_COMMIT"] = args.commit

    import torch

    from mmkernels import bench

    if args.dry_run:
        import warnings

        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors; one thread keeps the dry run quick and steady
        # the interpreter evaluates masked-out lanes too (exp(-inf - -inf) etc.): numpy warns, the
        # results are masked; real problems show as failed checks
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("error: no CUDA device visible; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    ref_name = bench.REFERENCE
    env = bench.environment(device)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="gpu_suite-dry-run-"))
    else:
        out = default_out_dir(env["device"])
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_suite{' DRY RUN' if args.dry_run else ''} on {env['device']}: torch {env['torch']}, "
          f"triton {env['triton']}, backend {env['backend']} -> {env['impl']}, commit {env['commit']}; "
          f"references: {ref_name}; out {out}", flush=True)

    if args.dry_run:
        case_list = bench.select_cases("dry-run")
        # one timed call per measurement on one buffer set: the interpreter's timings mean nothing,
        # and every call runs the kernels in Python (the rotation and the sample counts have
        # tests of their own in tests/test_bench.py)
        opts = bench.MeasureOptions(repeats=1, warmup=1, graph=False, eager_timing=False,
                                    compile_baseline=args.compile_baseline, check_max_elems=4096,
                                    max_sets=1, device_draw_above=1 << 14)
        ceilings = bench.measure_ceilings(device, copy_bytes=16 << 20, mm_n=256, quick=True)
    else:
        case_list = bench.select_cases("gpu")
        opts = bench.MeasureOptions(target_s=args.target_s, warmup=3, min_repeats=5, max_repeats=60,
                                    graph=True, eager_timing=True, compile_baseline=args.compile_baseline)
        ceilings = bench.measure_ceilings(device)
    print(bench.ceilings_line(ceilings), flush=True)
    if args.family:
        case_list = [c for fam in args.family for c in case_list if c.family == fam]
    skipped_families = unavailable_families(sorted({c.family for c in case_list}))
    for family, why in skipped_families.items():
        n = sum(c.family == family for c in case_list)
        print(f"SKIPPING the {family} family ({n} cases): {why}", flush=True)
    case_list = [c for c in case_list if c.family not in skipped_families]

    rows, skipped = [], []
    budget_s = args.max_minutes * 60
    for i, case in enumerate(case_list, 1):
        if time.perf_counter() - t_start > budget_s:
            skipped.append(case.id)
            continue
        rows += bench.measure_cases([case], device, ceilings, opts, name_filter=args.filter, progress=None)
        # the record so far, after every case: a run killed by the call's time limit keeps its rows
        bench.write_json(out / JSON_NAME, {"kind": "mmkernels-gpu-suite", "dry_run": args.dry_run, "partial": True,
                                           "environment": env, "reference": ref_name, "ceilings": ceilings,
                                           "results": rows})
        done = [r for r in rows if r["case"] == case.id]
        if done:
            state = ", ".join(_progress(r) for r in done)
            print(f"[{i}/{len(case_list)} {time.perf_counter() - t_start:5.0f} s] {case.id}: {state}", flush=True)
    if skipped:
        print(f"time budget ({args.max_minutes} min) spent: skipped {len(skipped)} cases", flush=True)

    host = None
    if not args.family or {"routing", "experts"} & set(args.family):
        host = host_times(device, args.dry_run)
        for line in host["lines"]:
            print(line, flush=True)

    from mmkernels.bench import explore as ex
    from mmkernels.families import FAMILIES

    explored = []
    probes = [p for name, fam in FAMILIES.items() if not args.family or name in args.family
              for p in (fam.dry_run_probes if args.dry_run else fam.probes)
              if not args.filter or all(word in p.id for word in args.filter.split())]
    if not probes:
        print("config exploration: no probes in the families run", flush=True)
    elif time.perf_counter() - t_start < budget_s:
        print(f"config exploration: {len(probes)} probes", flush=True)
        explored = ex.explore(probes, device, ceilings, **opts.timing_kwargs())
    else:
        print("time budget spent: config exploration skipped", flush=True)

    targets = bench.evaluate_targets(rows, bench.all_targets())
    elapsed = time.perf_counter() - t_start
    payload = {
        "kind": "mmkernels-gpu-suite", "dry_run": args.dry_run, "environment": env,
        "reference": ref_name, "ceilings": ceilings, "options": {**vars(args), "measure": dataclasses.asdict(opts)},
        "elapsed_s": elapsed, "results": rows, "targets": targets, "skipped": skipped,
        "skipped_families": skipped_families, "explore": explored, "host_time": host,
    }
    bench.write_json(out / JSON_NAME, payload)
    write_markdown(out / MD_NAME, payload)
    if args.plot:
        bench.plot_results(rows, out / "gpu_suite.png", ceilings, title=f"gpu_suite: {env['device']}")

    failed = [r for r in rows if not r["check"]["passed"]]
    failed_probes = [r for r in explored if not r["check"]]
    print()
    print(bench.result_table(rows, compact=True))
    if explored:
        print()
        print(bench.format_table(ex.EXPLORE_HEADERS, ex.explore_table_rows(explored)))
    print()
    print(f"== summary: {env['device']}{' (DRY RUN: timings meaningless)' if args.dry_run else ''} ==")
    print(bench.ceilings_line(ceilings))
    print(f"correctness: {len(rows) - len(failed)}/{len(rows)} passed vs {ref_name}")
    for r in failed:
        print(f"  FAILED {r['case']} {r['direction']}: {r['check'].get('detail')}")
    for r in failed_probes:
        print(f"  MISMATCH config {r['config']} of {r['probe']}: max_rel {r['max_rel_vs_resolver']:.2e} vs the resolver's")
    print(bench.format_table(["target", "status", "worst", "rows"],
                             [[t["target"], t["status"], bench.fmt_num(t["worst"], ".3f"), t["rows"]] for t in targets]))
    for t in targets:
        for line in t["failing"][:4]:
            print(f"  {t['status']} {line}")
    for line in (host or {}).get("lines", []):
        print(line)
    for family, why in skipped_families.items():
        print(f"SKIPPED family {family}: {why}")
    if skipped:
        print(f"skipped (budget): {len(skipped)} cases")
    print(f"wrote {out / JSON_NAME} and {out / MD_NAME}; elapsed {elapsed:.1f} s")
    if failed or failed_probes:
        return 1
    if args.strict and any(t["status"] == "FAIL" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
