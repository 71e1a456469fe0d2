"""The main job, ``python -m mmkernels bench``: its options (:func:`add_arguments`), the cases it
runs (:func:`select_cases`) and the run itself (:func:`run`: table on stdout, progress on stderr,
optional JSON and PNG)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import List, Optional, Sequence

import torch

from mmkernels.family import Case
from mmkernels.testing import cases as registry_cases

from .ceilings import best_of, measure_ceilings
from .environment import default_device, environment
from .host import MOE_FAMILIES, STACK_LAYERS, host_time_line, moe_layer_host_time
from .measure import MeasureOptions, all_targets, evaluate_targets, measure_cases, rescore
from .report import baselines_table, ceilings_line, fmt_num, plot_results, result_table, write_json

#: What every check compares with.
REFERENCE = "mmkernels.reference (float64)"

#: On CPU, a row whose samples of some entry spread more than this (quartiles over median) takes
#: more, for up to SETTLE_S seconds (timing.py time_interleaved; not with ``--quick``). In six runs
#: of the main job on the 2-core VM, 26% of the timings spread more than 0.10 and 12% more than 0.15,
#: with five to seven samples each on the rows of ~9 ms.
SETTLE_SPREAD = 0.10
SETTLE_S = 1.0


def _family_names() -> List[str]:
    from mmkernels.families import FAMILIES

    return list(FAMILIES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--tag", default=None,
                        help="registry tag of the cases (default: 'gpu' on CUDA, 'bench' on CPU)")
    parser.add_argument("--family", action="append", default=None, choices=_family_names(),
                        help="op family to run (repeatable; default: all)")
    parser.add_argument("--filter", default=None, metavar="SUBSTR",
                        help="only variants whose '<case id> <op> <direction>' (direction: fwd, "
                             "bwd, fwd+bwd) contains every space-separated word of SUBSTR "
                             "(e.g. 'float32 bwd', 'bilinear')")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="run every selected case in this dtype instead of its own (the CPU rows "
                             "are float32 but for the softmax's: e.g. --dtype bfloat16 times them in bf16)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller ceiling measurements (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per measurement (default: as many as fit ~0.2 s)")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="also time torch.compile of each baseline (a second baseline)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; recorded in the JSON)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    parser.add_argument("--plot", metavar="PATH.png", default=None, help="write a PNG plot (matplotlib)")


#: The dtypes ``--dtype`` takes.
DTYPES = ("float32", "bfloat16", "float16", "float64")


def select_cases(tag: str, families: Optional[Sequence[str]] = None, dtype: Optional[str] = None) -> List[Case]:
    """Registry cases of ``families`` (default: every family, in the manifest's order) tagged ``tag``;
    with ``dtype`` (one of :data:`DTYPES`), each in that dtype instead of its own, the cases that then
    coincide once."""
    out: List[Case] = []
    for fam in families or _family_names():
        out.extend(registry_cases(fam, tag))
    if dtype is None:
        return out
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    seen, unique = set(), []
    for case in (dataclasses.replace(c, dtype=getattr(torch, dtype)) for c in out):
        if case.id not in seen:
            seen.add(case.id)
            unique.append(case)
    return unique


def run(args: argparse.Namespace) -> int:
    """``python -m mmkernels bench``: returns 0 when every correctness check passed, 1 otherwise."""
    t_start = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    tag = args.tag or ("gpu" if device.type == "cuda" else "bench")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:  # fail before measuring, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib; install it with `pip install matplotlib`", file=sys.stderr)
            return 2
    case_list = select_cases(tag, args.family, args.dtype)
    if not case_list:
        print(f"error: no registry cases tagged {tag!r}", file=sys.stderr)
        return 2
    opts = MeasureOptions(
        repeats=args.repeats,
        warmup=2 if args.quick else 3,
        target_s=0.05 if args.quick else 0.2,
        min_repeats=3 if args.quick else 5,
        settle_spread=0.0 if args.quick else SETTLE_SPREAD,
        settle_s=SETTLE_S,
        compile_baseline=args.compile_baseline,
        memory=not args.no_memory,
    )
    env = environment(device)
    print(f"mmkernels bench on {env['device']} ({device.type}, impl {env['impl']}), torch {env['torch']}, "
          f"triton {env['triton']}, {len(case_list)} '{tag}' cases", file=sys.stderr, flush=True)
    if "cpu_ops" in env:
        print(f"CPU ops: {env['cpu_ops']}", file=sys.stderr, flush=True)
    ceilings = measure_ceilings(device, quick=args.quick)
    print(ceilings_line(ceilings), file=sys.stderr, flush=True)
    rows = measure_cases(case_list, device, ceilings, opts, name_filter=args.filter)
    if not rows:
        print(f"error: no variant matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    if device.type == "cpu":  # measured again at the end: the fractions use the better of the two
        ceilings = best_of(ceilings, measure_ceilings(device, quick=args.quick))
        rescore(rows, ceilings)
    host = None
    if not args.family or any(f in args.family for f in MOE_FAMILIES):
        host = moe_layer_host_time(repeats=50 if args.quick else 200)
        host["stack"] = moe_layer_host_time(repeats=25 if args.quick else 100, layers=STACK_LAYERS)
    elapsed = time.perf_counter() - t_start

    print(f"\nmmkernels bench: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    print(ceilings_line(ceilings))
    print("ratio = baseline / ours (> 1: ours faster); err = max |out - ref| / max |ref| vs float64 "
          f"({REFERENCE}); mem = {rows[0].get('memory_method', 'n/a')}; "
          "%copy = (min bytes / time) / copy ceiling"
          + ("; TFLOP/s = useful FLOPs / time; %mm = that / mm ceiling" if any("flops" in r for r in rows) else ""))
    print(result_table(rows))
    every = baselines_table(rows)
    if every:
        print("\nevery baseline (ratio = its time / ours; torch_path = ours on the vectorised-torch CPU path)")
        print(every)
    if host:
        print("\n" + host_time_line(host, host["stack"]))
    failed = [r for r in rows if not r["check"]["passed"]]
    # the targets name the cases' own dtypes: a --dtype run has none of their rows
    targets = evaluate_targets(rows, all_targets()) if args.dtype is None else []
    if args.dtype is not None:
        print(f"targets not evaluated: they name the cases' own dtypes, this run is all {args.dtype}")
    on_gpu = [t for t in targets if t["status"] != "NO DATA"]
    for t in on_gpu:
        print(f"target {t['status']}: {t['target']} (worst {fmt_num(t['worst'], '.3f')})")
    for r in failed:
        print(f"CHECK FAILED {r['case']} {r['direction']}: {r['check'].get('detail')}")
    print(f"{len(rows)} results, {len(failed)} failed checks, {elapsed:.1f} s")

    if args.json:
        write_json(args.json, {
            "kind": "mmkernels-bench", "environment": env, "ceilings": ceilings,
            "options": dataclasses.asdict(opts), "tag": tag, "filter": args.filter, "dtype": args.dtype,
            "reference": REFERENCE, "elapsed_s": elapsed, "results": rows,
            "targets": targets, "moe_layer_host_time": host,
        })
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot, ceilings, title=f"mmkernels bench: {env['device']}")
        print(f"wrote {args.plot}")
    return 1 if failed else 0
