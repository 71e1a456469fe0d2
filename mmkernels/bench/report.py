"""Reporting: the results table (:func:`result_table` on :func:`format_table`), the ceilings line,
the JSON file (:func:`write_json`) and the PNG plot (:func:`plot_results`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Aligned plain-text table, or a Markdown one."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_num(v: Optional[float], fmt: str) -> str:
    """``v`` formatted with ``fmt``; empty for None and NaN."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mib(v: Optional[int]) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def result_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False, compact: bool = False) -> str:
    """The results table: op, shape, dtype, ours (ms), baseline (ms), ratio = baseline / ours
    (> 1: we are faster), max error of ours (and of the baseline) vs the float64 reference (the
    worst output's, for variants with several), peak memory, GB/s and the fraction of the
    measured copy bandwidth; when some row has useful FLOPs (matmul families), also TFLOP/s and
    the fraction of the measured mm rate (blank on the other rows); on CUDA, the kernels one call of
    ours launches."""
    has_compile = any("compile" in r.get("baseline_ms", {}) for r in rows)
    has_flops = any("flops" in r for r in rows)
    has_launches = any(r.get("launches") is not None for r in rows)
    headers = ["op", "shape", "dtype", "ours ms", "base ms", "ratio"]
    if has_compile:
        headers += ["compile ms", "ratio c"]
    headers += ["err ours", "err base", "check"]
    if not compact:
        headers += ["mem ours MiB", "mem base MiB"]
    headers += ["GB/s", "%copy"]
    if has_flops:
        headers += ["TFLOP/s", "%mm"]
    if has_launches:
        headers += ["launches"]
    body = []
    for r in rows:
        shape = r.get("shape_text") or (
            "x".join(map(str, r["shape"])) + (f" d{r['dim']}" if r.get("dim") not in (None, -1) else ""))
        if "error" in r:  # the message is listed under the table
            line = [r["label"], shape, r["dtype"], "ERROR"] + [""] * (len(headers) - 4)
            line[headers.index("check")] = "CRASH"
            body.append(line)
            continue
        chk = r["check"]
        line = [r["label"], shape, r["dtype"], fmt_num(r["ours_ms"], ".4f"),
                fmt_num(r["baseline_ms"].get("eager"), ".4f"), fmt_num(r.get("ratio"), ".2f")]
        if has_compile:
            line += [fmt_num(r["baseline_ms"].get("compile"), ".4f"), fmt_num(r.get("ratio_compile"), ".2f")]
        line += [fmt_num(chk.get("max_rel"), ".1e"), fmt_num(chk.get("baseline_max_rel"), ".1e"),
                 "ok" if chk["passed"] else "FAIL"]
        if not compact:
            line += [_mib(r.get("peak_bytes")), _mib(r.get("baseline_peak_bytes"))]
        line += [fmt_num(r.get("GBps"), ".1f"), fmt_num(100 * r["frac_copy"], ".0f") if "frac_copy" in r else ""]
        if has_flops:
            line += [fmt_num(r.get("TFLOPs"), ".3g"), fmt_num(100 * r["frac_mm"], ".0f") if "frac_mm" in r else ""]
        if has_launches:
            line += ["" if r.get("launches") is None else str(r["launches"])]
        body.append(line)
    return format_table(headers, body, markdown=markdown)


def baselines_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> Optional[str]:
    """Every baseline of the rows that have more than ``eager`` (and ``compile``): one line per
    (row, baseline) with its time, ratio = baseline / ours and fraction of the mm rate, after a
    line for ours (on CPU: ``torch_path`` is ours on the vectorised-torch fallback); None if no
    row has such baselines."""
    body = []
    for r in rows:
        if "error" in r or not set(r.get("baseline_ms", {})) - {"eager", "compile"}:
            continue
        shape = r.get("shape_text") or "x".join(map(str, r["shape"]))
        pct = lambda f: fmt_num(None if f is None else 100 * f, ".0f")  # noqa: E731
        body.append([r["label"], shape, r["dtype"], "ours", fmt_num(r["ours_ms"], ".3f"), "1.00",
                     pct(r.get("frac_mm"))])
        for name, ms in sorted(r["baseline_ms"].items(), key=lambda kv: kv[1]):
            body.append(["", "", "", name, fmt_num(ms, ".3f"), fmt_num(ms / r["ours_ms"], ".2f"),
                         pct(r.get("baseline_frac_mm", {}).get(name))])
    if not body:
        return None
    return format_table(["op", "shape", "dtype", "impl", "ms", "ratio", "%mm"], body, markdown=markdown)


def ceilings_line(ceilings: Mapping[str, Any]) -> str:
    c, m = ceilings["copy"], ceilings["mm"]
    both = " (best of the start and end of the run)" if "samples" in m else ""
    return (f"ceilings{both}: copy {c['GBps']:.1f} GB/s (read+write, {c['bytes'] / 2**20:.0f} MiB), "
            f"mm {m['TFLOPs']:.2f} TFLOP/s ({m['dtype']} {m['n']}^3)")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json(path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (non-finite floats as null) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def plot_results(rows: Sequence[Mapping[str, Any]], path, ceilings: Optional[Mapping[str, Any]] = None,
                 title: str = "") -> None:
    """PNG with two panels: the ratio baseline / ours per variant, and achieved GB/s of ours and
    the baselines against the measured copy bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib ({exc}); install it with `pip install matplotlib`") from None
    rows = [r for r in rows if "error" not in r]
    labels = [f"{r['label']} {'x'.join(map(str, r['shape']))} {r['dtype']}" for r in rows]
    n = max(len(rows), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.3 * n + 2), sharey=True)
    y = list(range(len(rows)))
    names = sorted({k for r in rows for k in r["baseline_ms"]})
    h = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        vals = [r["baseline_ms"].get(name, float("nan")) / r["ours_ms"] for r in rows]
        ax1.barh([v + j * h for v in y], vals, height=h, label=f"{name} / ours")
    ax1.axvline(1.0, color="k", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("baseline time / ours (> 1: ours faster)")
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7)
    series = [("ours", [r["GBps"] for r in rows])] + [
        (name, [r["baseline_GBps"].get(name, float("nan")) for r in rows]) for name in names]
    h = 0.8 / len(series)
    for j, (name, vals) in enumerate(series):
        ax2.barh([v + j * h for v in y], vals, height=h, label=name)
    if ceilings:
        ax2.axvline(ceilings["copy"]["GBps"], color="r", lw=1, ls="--", label="copy ceiling")
    ax2.set_xlabel("GB/s (minimum bytes / time)")
    ax2.legend(fontsize=7)
    fig.suptitle(title or "mmkernels bench")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
