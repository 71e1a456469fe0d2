"""The softmax family: softmax, log-softmax and softmin, forward and the fused backward.

Cases: ops ``softmax`` / ``log_softmax`` / ``softmin``; ``params["dim"]`` the reduced dim; inputs
``x`` and an incoming gradient ``dy`` (layouts per input). Bench: forward and backward against
torch eager; minimum traffic 2 tensor passes forward (read x, write y), 3 backward (read y and dy,
write dx). Compile tier: every config of :func:`mmkernels.ops.softmax.launch_configs` at fp32 (or
fp64 for the float64 configs); the largest one-pass and the looped config of each layout also in
bf16 / fp16, each kind, int64 offsets and unaligned pointers, sizes and strides; and
:data:`ROW_SHAPES` (odd lengths on the one-pass, looped and split kernels, few long aligned rows on
the split kernels) at every storage and kind, each required to hold 128-bit global loads.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from mmkernels import reference as ref
from mmkernels.family import (Case, Family, Inputs, Probe, Target, Variant, case_builder, compiled, laid_out,
                              nbytes, randn)
from mmkernels.ops import softmax as S

OPS = ("softmax", "log_softmax", "softmin")
#: Row lengths every test covers; the long one goes through the online path (past
#: :data:`mmkernels.ops.softmax.MAX_FUSED_N`; a test keeps them in step).
ROW_LENGTHS = (1, 2, 3, 31, 33, 127, 1023, 1024, 1025, 4097, 16385)

_case = case_builder("softmax")


def cases() -> List[Case]:
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    edge = {"interp", "edge"}
    out: List[Case] = []

    def add(op, shape, dim, dtype, tags, **layouts):
        out.append(_case(op, shape, dtype, tags, layouts, dim=dim))

    for n in ROW_LENGTHS:
        for dt in (f32, f16, bf16):
            for op in OPS:
                add(op, (3 if n <= 4097 else 2, n), -1, dt, edge)
    for shape in ((4, 5, 6), (3, 4, 5, 6)):
        for dim in (0, 1, -1):
            for dt in (f32, f16, bf16):
                for op in OPS:
                    add(op, shape, dim, dt, edge)
    # layouts: transposed / sliced inputs, expanded (zero-stride) incoming gradients
    for shape, dim in (((7, 33), -1), ((7, 33), 0), ((3, 5, 17), 1), ((2, 3, 4, 9), 2)):
        for op in OPS:
            for lx, ldy in (("transposed", "contiguous"), ("sliced", "expanded"), ("contiguous", "expanded"),
                            ("transposed", "transposed")):
                add(op, shape, dim, f32, edge, x=lx, dy=ldy)
    # reductions over a strided dim whose rows do not fit one tile (columns layout, online path)
    for op in OPS:
        add(op, (2, 200, 20), 1, f32, edge)
        add(op, (2, 1100, 20), 1, f32, edge)
        add(op, (2, 1100, 20), 1, f16, edge)
    # float64 rows past the float64 fused limit (half of MAX_FUSED_N)
    for op in OPS:
        add(op, (2, 9000), -1, f64, edge)
        add(op, (3, 40, 5), 1, f64, edge)
    # size-0 and 0-dim
    for shape, dim in (((0, 5), -1), ((4, 0), -1), ((0,), 0), ((), 0), ((), -1), ((1,), 0), ((1, 1), 0)):
        for op in OPS:
            add(op, shape, dim, f32, edge)
    # the main job on CPU (sizes a CPU handles in well under a second per call)
    for n in (128, 1024, 4096, 32768):
        for dt in (f32, bf16):
            add("softmax", (max(1, (1 << 22) // n), n), -1, dt, {"bench"})
    add("log_softmax", (1024, 4096), -1, f32, {"bench"})
    add("softmax", (64, 4096, 16), 1, f32, {"bench"})
    # the GPU suite: M = 8192 rows, N from 128 to 262144, fp32 and bf16; plus one very long row set
    for n in (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144):
        for dt in (f32, bf16):
            add("softmax", (8192, n), -1, dt, {"gpu"})
    for dt in (f32, bf16):
        add("softmax", (64, 1 << 20), -1, dt, {"gpu"})
        add("log_softmax", (8192, 4096), -1, dt, {"gpu"})
        add("softmin", (8192, 4096), -1, dt, {"gpu"})
        add("softmax", (32, 4096, 64), 1, dt, {"gpu"})
    # the GPU suite's dry run: one-pass rows (with and without a row sample for the reference), a
    # row past the on-chip limit (online / looped kernels), a non-last dim, every op, fp32 and fp16
    for op, shape, dt, dim in (("softmax", (4, 128), f32, -1), ("softmax", (4, 128), f16, -1),
                               ("softmax", (16, 512), f32, -1), ("softmax", (3, 1000), f16, -1),
                               ("softmax", (2, S.MAX_FUSED_N + 17), f32, -1), ("log_softmax", (4, 256), f32, -1),
                               ("softmin", (4, 256), f16, -1), ("softmax", (2, 64, 8), f32, 1)):
        add(op, shape, dim, dt, {"dry-run"})
    return out


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    scale = float(case.params.get("scale", 3.0))
    x = laid_out(randn(case.shape, case.dtype, device, gen, scale), case.layouts.get("x", "contiguous"))
    dy = laid_out(randn(case.shape, case.dtype, device, gen), case.layouts.get("dy", "contiguous"),
                  keep_dim=case.params["dim"] if case.shape else None)
    return {"x": x, "dy": dy}


# ----------------------------------------------------------------------------------------------
# Bench spec
# ----------------------------------------------------------------------------------------------

def _fns(op: str):
    """(ours, torch eager, float64 reference) forward of ``op``."""
    import mmkernels

    eager = {"softmax": torch.softmax, "log_softmax": torch.log_softmax,
             "softmin": torch.nn.functional.softmin}[op]
    return getattr(mmkernels, op), eager, ref.FORWARD[op]


def _eager_backward(op: str, dim: int):
    """The backward eager autograd runs: ``_softmax_backward_data`` (softmin: and a negation)."""
    if op == "log_softmax":
        return lambda i: torch._log_softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)
    if op == "softmin":
        return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype).neg()
    return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward (ours vs ``torch.softmax`` / ``torch.log_softmax`` / ``F.softmin``) and the fused
    backward (:func:`mmkernels.softmax_backward` vs the backward eager autograd runs)."""
    import mmkernels

    dim = int(case.params.get("dim", -1))
    reduced = (dim % max(len(case.shape), 1),)
    ours_fwd, eager_fwd, ref_fwd = _fns(case.op)
    tensor = nbytes(case.shape, case.dtype)

    fwd_base = {"eager": lambda i: eager_fwd(i["x"], dim)}
    fwd = Variant(case=case, direction="fwd", ours=lambda i: ours_fwd(i["x"], dim), baselines=fwd_base,
                  reference=lambda i: ref_fwd(i["x"], dim), prepare=lambda raw: {"x": raw["x"]},
                  bytes_moved=2 * tensor, passes=2, reduced_dims=reduced)

    def prepare_bwd(raw: Inputs) -> Inputs:
        with torch.no_grad():
            y = eager_fwd(raw["x"], dim)
        return {"y": y, "dy": raw["dy"]}

    bwd_base = {"eager": _eager_backward(case.op, dim)}
    bwd = Variant(case=case, direction="bwd",
                  ours=lambda i: mmkernels.softmax_backward(i["dy"], i["y"], dim, kind=case.op),
                  baselines=bwd_base, reference=lambda i: ref.softmax_backward_ref(i["y"], i["dy"], dim, case.op),
                  prepare=prepare_bwd, bytes_moved=3 * tensor, passes=3, reduced_dims=reduced)
    if compile_baseline:
        fwd_base["compile"] = compiled(lambda x: eager_fwd(x, dim), ("x",))
        bwd_base["compile"] = compiled(lambda y, dy: bwd_base["eager"]({"y": y, "dy": dy}), ("y", "dy"))
    return [fwd, bwd]


def targets() -> List[Target]:
    """GPU, rows M = 8192 of fp32 and bf16, dim -1. ratio = torch eager time / ours; frac_copy =
    (bytes / time) / measured copy bandwidth."""

    def rows(direction: str, lo: int, hi: int = 1 << 62):
        def applies(r: Dict[str, Any]) -> bool:
            return (r.get("family") == "softmax" and r.get("op") == "softmax"
                    and r.get("direction") == direction and len(r.get("shape", ())) == 2
                    and r["shape"][0] == 8192 and r.get("dim") in (-1, 1)
                    and r.get("dtype") in ("float32", "bfloat16") and lo <= r["shape"][1] <= hi)
        return applies

    return [
        Target("softmax fwd >= 85% of copy bandwidth (M=8192, N>=4096)", "frac_copy", 0.85, rows("fwd", 4096)),
        Target("softmax fwd never slower than torch.softmax (M=8192, 128<=N<=262144)", "ratio", 1.0,
               rows("fwd", 128, 262144)),
        Target("softmax bwd >= 80% of copy bandwidth (M=8192, N>=1024)", "frac_copy", 0.80, rows("bwd", 1024)),
        Target("softmax bwd >= 1.6x torch eager backward (M=8192, N>=1024)", "ratio", 1.6, rows("bwd", 1024)),
    ]


# ----------------------------------------------------------------------------------------------
# Compile-tier launches
# ----------------------------------------------------------------------------------------------

_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _meta(layout: str, dtype: torch.dtype, aligned: bool):
    """A meta input and its reduced dim in ``layout``: rows (the reduced dim contiguous) or columns
    (a strided reduced dim over contiguous lanes); aligned: pointer, sizes and strides multiples of
    16 elements, else all odd (a storage offset of one element)."""
    shape = {("rows", True): (48, 64), ("rows", False): (3, 17),
             ("columns", True): (2, 32, 64), ("columns", False): (3, 17, 19)}[(layout, aligned)]
    n = 1
    for s in shape:
        n *= s
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta"), len(shape) - 1 if layout == "rows" else 1
    flat = torch.empty(n + 1, dtype=dtype, device="meta")[1:]
    return flat.view(shape), len(shape) - 1 if layout == "rows" else 1


def config_label(cfg: S.SoftmaxConfig) -> str:
    return f"BLOCK_I={cfg.block_i} BLOCK_N={cfg.block_n}" + (" online" if cfg.online else "")


def launches(rec, target: int) -> None:
    """Every ``(config, layout, f64)`` of :func:`mmkernels.ops.softmax.launch_configs`, forward and
    backward, at fp32 softmax (fp64 for the float64 configs); the largest one-pass and the looped
    config of each layout also at every other variant (storage, kind, int64, unaligned); and
    :func:`odd_n`'s odd row lengths, which must keep 128-bit loads."""
    triples = list(S.launch_configs())
    full = set()
    for layout in ("rows", "columns"):
        for online in (False, True):
            cands = [c for c, lay, f64 in triples if lay == layout and c.online == online and not f64]
            if cands:
                full.add((max(cands, key=lambda c: (c.tile, c.num_warps, c.block_i, c.block_n)), layout))
    others = [(f"{s} softmax", s, S.Kind.SOFTMAX, False, True) for s in ("bf16", "fp16")]
    others += [(f"fp32 {k.name.lower()}", "fp32", k, False, True) for k in (S.Kind.LOG_SOFTMAX, S.Kind.SOFTMIN)]
    others += [("fp32 softmax int64", "fp32", S.Kind.SOFTMAX, True, True),
               ("fp32 softmax unaligned", "fp32", S.Kind.SOFTMAX, False, False)]
    odd_n(rec)
    for cfg, layout, f64 in triples:
        base = ("fp64 softmax", "fp64", S.Kind.SOFTMAX, False, True) if f64 else \
            ("fp32 softmax", "fp32", S.Kind.SOFTMAX, False, True)
        for label, storage, kind, int64, aligned in [base] + (others if not f64 and (cfg, layout) in full else []):
            dtype = _STORAGE[storage]
            x, dim = _meta(layout, dtype, aligned)
            dy, _ = _meta(layout, dtype, aligned)
            with rec.variant(f"{label} {layout}", config=config_label(cfg)):
                S.triton_forward(x, dim, kind, dtype, force_int64=int64, config=cfg)
                S.triton_backward(x, dy, dim, kind, dtype, force_int64=int64, config=cfg)


#: (rows, length, storages) the compile tier builds: odd lengths for the one-pass kernels, the looped
#: kernels (many rows) and the split kernels (few rows), and few long aligned rows (split kernels).
#: fp32 at every kind, the other storages at softmax.
ROW_SHAPES = ((64, 1001, ("fp32", "bf16", "fp16", "fp64")), (256, 3 * S.MAX_FUSED_N + 1, ("fp32", "bf16")),
              (64, 3 * S.MAX_FUSED_N + 1, ("fp32", "bf16", "fp16")), (64, 1 << 20, ("fp32",)))


def odd_n(rec) -> None:
    """:data:`ROW_SHAPES`, forward and backward. The odd lengths make the kernels split each row
    into an aligned body and a scalar head and tail: each such build must hold 128-bit global
    loads (as must the aligned ones)."""
    for rows, n, storages in ROW_SHAPES:
        for storage in storages:
            dtype = _STORAGE[storage]
            for kind in (S.Kind if storage == "fp32" else (S.Kind.SOFTMAX,)):
                x = torch.empty((rows, n), dtype=dtype, device="meta")
                cfg = S.resolve_config(n, rows, False, f64=dtype == torch.float64)
                label = f"{storage} {kind.name.lower()} {rows} rows of {'odd N' if n % 2 else 'N'} = {n}"
                with rec.variant(label, config=config_label(cfg), expect={"min_load_bits": 128}):
                    S.triton_forward(x, 1, kind, dtype)
                    S.triton_backward(x, torch.empty_like(x), 1, kind, dtype)


# ----------------------------------------------------------------------------------------------
# Config exploration (the GPU suite)
# ----------------------------------------------------------------------------------------------

def _probe(shape, dtype, direction, configs, kind=S.Kind.SOFTMAX, why="") -> Probe:
    """Rows ``shape`` (reduced dim last) in ``dtype``, ``direction`` ``"fwd"`` or ``"bwd"``."""
    def setup(device: torch.device):
        gen = torch.Generator(device=device).manual_seed(7)
        x = torch.randn(shape, device=device, generator=gen).mul_(3).to(dtype)
        if direction == "fwd":
            return (lambda cfg: S.triton_forward(x, 1, kind, dtype, config=cfg)), 2 * x.numel() * x.element_size()
        y = S.triton_forward(x, 1, kind, dtype)
        dy = torch.randn(shape, device=device, generator=gen).to(dtype)
        return (lambda cfg: S.triton_backward(y, dy, 1, kind, dtype, config=cfg)), 3 * x.numel() * x.element_size()

    dt = str(dtype).replace("torch.", "")
    return Probe(f"{kind.name.lower()}-{'x'.join(map(str, shape))}-{dt}-{direction}", tuple(configs), setup, dtype,
                 why, lambda c: f"{c.block_i}x{c.block_n} w{c.num_warps}{' online' if c.online else ''}")


C, f32, bf16 = S.SoftmaxConfig, torch.float32, torch.bfloat16

#: What the first GPU runs should settle (predictions in bench/NOTES.md).
PROBES = (
    _probe((8192, 32768), f32, "fwd", (C(1, 32768, 16, False), C(1, 32768, 32, False), C(1, 8192, 16, True)),
           why="one-pass forward past MAX_FUSED_N (compiles without spills) vs the 3-pass online path"),
    _probe((8192, 32768), bf16, "fwd", (C(1, 32768, 16, False), C(1, 32768, 32, False)), why="as above, bf16"),
    _probe((4096, 262144), bf16, "fwd", (C(1, 8192, 16, True), C(1, 2048, 4, True)),
           why="online loop tile: bigger steps vs more programs per SM"),
    _probe((8192, 4096), f32, "fwd", (C(1, 4096, 4, False), C(1, 4096, 16, False), C(2, 4096, 16, False)),
           why="warps per 4096-element row"),
    _probe((8192, 128), f32, "fwd", (C(8, 128, 2, False), C(16, 128, 4, False), C(64, 128, 16, False)),
           why="rows per program for short rows (256 programs by default)"),
    _probe((8192, 1024), f32, "bwd", (C(1, 1024, 2, False), C(2, 1024, 4, False), C(8, 1024, 16, False)),
           why="backward tile for 1024-element rows (target: 1.6x torch)"),
    _probe((8192, 4096), bf16, "bwd", (C(1, 4096, 4, False), C(1, 4096, 16, False)),
           why="warps per 4096-element backward row"),
    _probe((8192, 32768), f32, "bwd", (C(1, 8192, 16, True), C(1, 2048, 4, True)), why="looped backward loop tile"),
)
#: The same code path at interpreter sizes (the GPU suite's dry run).
DRY_RUN_PROBES = (
    _probe((4, 128), f32, "fwd", (C(2, 128, 1, False), C(4, 128, 2, False))),
    _probe((2, S.MAX_FUSED_N + 17), f32, "fwd", (C(1, 2048, 4, True),)),
    _probe((4, 256), f32, "bwd", (C(1, 256, 1, False),), kind=S.Kind.LOG_SOFTMAX),
)

FAMILY = Family(name="softmax", summary="softmax, log-softmax and softmin: forward and the fused backward",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                probes=PROBES, dry_run_probes=DRY_RUN_PROBES, cpp_ops=("softmax_forward",))
