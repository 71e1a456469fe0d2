"""Config exploration: a family's kernels timed at alternative launch configs next to the
resolver's own choice, so that one GPU run can decide a resolver change (DESIGN.md: configs are
data; change the heuristic from measurements, not guesses).

Each :class:`Probe` names a shape, a direction and the configs to try; :func:`explore` checks each
alternative against the resolver's output (same function, another tile) and times both the same
way. The GPU suite runs :data:`SOFTMAX_PROBES` after its cases; its dry run runs
:data:`SOFTMAX_DRY_PROBES` through the interpreter.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmkernels.bench.environment import _free
from mmkernels.bench.timing import time_fn
from mmkernels.ops import softmax as S
from mmkernels.testing import error_report, tolerance

C = S.SoftmaxConfig


@dataclasses.dataclass(frozen=True)
class Probe:
    """Rows ``shape`` (reduced dim last) in ``dtype``; ``direction`` ``"fwd"`` or ``"bwd"``."""

    shape: Tuple[int, int]
    dtype: torch.dtype
    direction: str
    configs: Tuple[S.SoftmaxConfig, ...]
    kind: S.Kind = S.Kind.SOFTMAX
    why: str = ""

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.kind.name.lower()}-{'x'.join(map(str, self.shape))}-{dt}-{self.direction}"


f32, bf16 = torch.float32, torch.bfloat16

#: What the first GPU runs should settle (predictions in bench/NOTES.md).
SOFTMAX_PROBES: Tuple[Probe, ...] = (
    Probe((8192, 32768), f32, "fwd", (C(1, 32768, 16, False), C(1, 32768, 32, False), C(1, 8192, 16, True)),
          why="one-pass forward past MAX_FUSED_N (compiles without spills) vs the 3-pass online path"),
    Probe((8192, 32768), bf16, "fwd", (C(1, 32768, 16, False), C(1, 32768, 32, False)),
          why="as above, bf16"),
    Probe((4096, 262144), bf16, "fwd", (C(1, 8192, 16, True), C(1, 2048, 4, True)),
          why="online loop tile: bigger steps vs more programs per SM"),
    Probe((8192, 4096), f32, "fwd", (C(1, 4096, 4, False), C(1, 4096, 16, False), C(2, 4096, 16, False)),
          why="warps per 4096-element row"),
    Probe((8192, 128), f32, "fwd", (C(8, 128, 2, False), C(16, 128, 4, False), C(64, 128, 16, False)),
          why="rows per program for short rows (256 programs by default)"),
    Probe((8192, 1024), f32, "bwd", (C(1, 1024, 2, False), C(2, 1024, 4, False), C(8, 1024, 16, False)),
          why="backward tile for 1024-element rows (target: 1.6x torch)"),
    Probe((8192, 4096), bf16, "bwd", (C(1, 4096, 4, False), C(1, 4096, 16, False)),
          why="warps per 4096-element backward row"),
    Probe((8192, 32768), f32, "bwd", (C(1, 8192, 16, True), C(1, 2048, 4, True)),
          why="looped backward loop tile"),
)

#: The same code path at interpreter sizes (the GPU suite's --dry-run).
SOFTMAX_DRY_PROBES: Tuple[Probe, ...] = (
    Probe((4, 128), f32, "fwd", (C(2, 128, 1, False), C(4, 128, 2, False))),
    Probe((2, S.MAX_FUSED_N + 17), f32, "fwd", (C(1, 2048, 4, True),)),
    Probe((4, 256), f32, "bwd", (C(1, 256, 1, False),), kind=S.Kind.LOG_SOFTMAX),
)


def _label(cfg: Optional[S.SoftmaxConfig]) -> str:
    if cfg is None:
        return "resolver"
    return f"{cfg.block_i}x{cfg.block_n} w{cfg.num_warps}{' online' if cfg.online else ''}"


def explore(probes: Sequence[Probe], device: torch.device, ceilings: Optional[Dict[str, Any]] = None,
            **timing) -> List[Dict[str, Any]]:
    """Time every probe at the resolver's config and at each alternative; one row per config.

    An alternative whose output differs from the resolver's beyond the tolerance table is
    reported as failed (``check`` False) and not timed."""
    rows: List[Dict[str, Any]] = []
    copy = (ceilings or {}).get("copy", {}).get("GBps")
    for probe in probes:
        gen = torch.Generator(device=device).manual_seed(7)
        x = torch.randn(probe.shape, device=device, generator=gen).mul_(3).to(probe.dtype)
        if probe.direction == "fwd":
            nbytes = 2 * x.numel() * x.element_size()

            def call(cfg, x=x, probe=probe):
                return S._triton_forward(x, 1, probe.kind, probe.dtype, config=cfg)
        else:
            y = S._triton_forward(x, 1, probe.kind, probe.dtype)
            dy = torch.randn(probe.shape, device=device, generator=gen).to(probe.dtype)
            nbytes = 3 * x.numel() * x.element_size()

            def call(cfg, y=y, dy=dy, probe=probe):
                return S._triton_backward(y, dy, 1, probe.kind, probe.dtype, config=cfg)
        base = call(None)
        for cfg in (None,) + tuple(probe.configs):
            row: Dict[str, Any] = {"probe": probe.id, "why": probe.why, "config": _label(cfg)}
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
        _free(device)
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
