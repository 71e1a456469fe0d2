"""Config exploration: a family's launcher timed at alternative launch configs next to the
resolver's own choice, so that one GPU run can decide a resolver change (configs are data; change
the heuristic from measurements, not guesses).

A family declares its :class:`~mmkernels.family.Probe` s (``Family.probes``, and interpreter-sized
twins in ``Family.dry_run_probes``); :func:`explore` checks each alternative against the resolver's
output (same function, another tile) and times both the same way. The GPU suite runs them after
its cases.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from mmkernels.bench.environment import free_device_memory
from mmkernels.bench.timing import time_fn
from mmkernels.family import Probe
from mmkernels.testing import error_report, tolerance


def explore(probes: Sequence[Probe], device: torch.device, ceilings: Optional[Dict[str, Any]] = None,
            **timing) -> List[Dict[str, Any]]:
    """Time every probe at the resolver's config and at each alternative; one row per config.

    An alternative whose output differs from the resolver's beyond the tolerance table is
    reported as failed (``check`` False) and not timed."""
    rows: List[Dict[str, Any]] = []
    copy = (ceilings or {}).get("copy", {}).get("GBps")
    for probe in probes:
        call, nbytes = probe.setup(device)
        base = call(None)
        for cfg in (None,) + tuple(probe.configs):
            row: Dict[str, Any] = {"probe": probe.id, "why": probe.why,
                                   "config": "resolver" if cfg is None else probe.label(cfg)}
            out = call(cfg)
            rep = error_report(out, base)
            tol = tolerance("triton", probe.dtype)
            row["check"] = not rep.special_mismatch and rep.max_rel <= tol.max_rel
            row["max_rel_vs_resolver"] = rep.max_rel
            del out
            if row["check"]:
                t = time_fn([lambda cfg=cfg: call(cfg)], device, **timing)
                row["ms"] = t.median_ms
                row["GBps"] = nbytes / (t.median_ms * 1e-3) / 1e9
                if copy:
                    row["frac_copy"] = row["GBps"] / copy
            rows.append(row)
        del base
        free_device_memory(device)
    return rows


def explore_table_rows(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """Rows for :func:`mmkernels.bench.report.format_table` (headers :data:`EXPLORE_HEADERS`)."""
    out = []
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else "-"
        frac = f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else "-"
        out.append([r["probe"], r["config"], ms, frac, "ok" if r["check"] else "MISMATCH"])
    return out


EXPLORE_HEADERS = ["probe", "config", "ms", "%copy", "check"]
