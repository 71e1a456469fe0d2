"""Compile tier: every kernel, at every config it can launch with, compiled ahead of time for
``sm_80`` / ``sm_90`` on a CPU machine, with its resource usage checked (DESIGN.md, "Verification
tiers", item 3).

For each (kernel, config, variant, target) the kernel is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options={"num_warps": ...})`` -- no GPU or driver needed -- and the cubin is inspected with the
tools shipped in the triton wheel (``triton/backends/nvidia/bin/``):

* ``cuobjdump --dump-resource-usage``: registers, stack frame, local memory, static shared memory
  (Triton's own shared memory is dynamic: ``compiled.metadata.shared``, added in);
* ``ptxas -v`` re-run on the kernel's PTX (tens of ms): spill stores / loads. cuobjdump's LOCAL
  stays 0 for a kernel whose spills live in its stack frame, so ``local_memory`` here is the
  larger of the stack frame and LOCAL: ``{"local_memory": 0}`` means no spills;
* ``nvdisasm``: whether the SASS holds tensor-core instructions (``HGMMA`` = wgmma on sm_90,
  ``HMMA`` = mma.sync). SASS tensor-core instructions only come from PTX ``mma`` / ``wgmma``, and
  nvdisasm costs ~0.3 s a call, so the SASS is disassembled where the PTX has one (``--sass``:
  always); the reduction kernels then report no MMA without the call.

What each kernel must meet is declared next to the kernels, in an ``EXPECTATIONS`` dict of the
kernel module (e.g. ``triton_kernels/softmax.py``)::

    EXPECTATIONS = {
        "softmax_fwd_fused_kernel": {"local_memory": 0},          # max bytes; 0 = no spills
        "some_gemm_kernel": {"stack": 0, "spills": 0,             # max bytes (stack frame / spill
                             "max_registers": 232,                # stores) / max registers
                             "mma": {90: "HGMMA", 80: "HMMA"}},   # required on the named target
    }

Numeric limits may also be given per target (``{"max_registers": {80: 255, 90: 168}}``);
``"mma": "HGMMA"`` is short for ``{90: "HGMMA"}`` and ``"mma": "HMMA"`` requires HMMA on every
target. Whatever the declarations, a kernel must also be launchable on its target: shared memory
within the per-block limit and ``registers * threads`` within the register file.

Compile configurations: every config at one representative specialisation (fp32 in and out,
or fp64 for the configs the resolver picks for float64 math; softmax kind, rows layout -- or columns for the configs the resolver picks for a strided reduced
dim --, aligned pointers and strides, int32 indexing); the largest one-pass config and the looped
config of each kernel (per layout) additionally at every other variant: bf16 / fp16
storage, each kind (LOG / NEG / KIND), ``USE_INT64=True``, and unaligned pointers and strides.
Strides that are 1 in real launches (``s*_n`` for rows, ``s*_i`` for columns) are constexpr 1,
as Triton's launcher specialises them (``tests/test_compile_tier.py`` checks the job signatures
against launches captured from the launchers and specialised by Triton's own binder). The configs
are exactly those the family's ``launch_configs()`` yields: ``(config, layout, f64)`` triples.

A failed compile, a compile that kills its worker process, and a violated expectation are
failures: ``run`` (``python -m mmkernels compile``) then returns 1 and lists them.

Usage::

    python -m mmkernels compile [--family softmax] [--targets 80,90] [--jobs 2] [--json out.json]

or from Python: :func:`compile_all`. Triton's interpreter (``TRITON_INTERPRET=1`` when the
kernels were imported) replaces the kernels by ``InterpretedFunction`` objects that cannot be
compiled: :func:`compile_all` then re-runs itself in a subprocess with ``TRITON_INTERPRET``
removed from the environment.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULT_TARGETS: Tuple[int, ...] = (80, 90)

#: Per-block shared memory a kernel may use (opt-in maximum) and the register file per SM.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTER_FILE = 65536
MAX_REGISTERS_PER_THREAD = 255

#: Tensor-core instructions looked for in the SASS.
MMA_OPCODES = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")

EXPECTATION_KEYS = ("local_memory", "stack", "spills", "max_registers", "mma")

_DIV16 = [["tt.divisibility", 16]]


# ----------------------------------------------------------------------------------------------
# Jobs and results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One ahead-of-time compile: a kernel at one config and one specialisation, for one target.

    ``signature`` maps every kernel argument to its Triton type (``"*fp32"``, ``"i32"``,
    ``"constexpr"``); ``constexprs`` gives the value of each constexpr argument (dtypes as the
    string ``"tl.float32"``); ``attrs`` maps argument names to Triton attributes
    (``[["tt.divisibility", 16]]``).
    """

    family: str
    module: str
    kernel: str
    config: str
    variant: str
    target: int
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[str, list]
    options: Dict[str, object]
    #: disassemble the cubin: None = only when the PTX holds an MMA instruction (SASS tensor-core
    #: instructions come from nowhere else; nvdisasm costs ~0.3 s a call), True = always.
    disassemble: Optional[bool] = None
    #: overrides of the kernel's EXPECTATIONS for this job only (a key set to None drops it), e.g.
    #: no tensor-core requirement for an fp32 build with IEEE dots
    expect: Optional[dict] = None


@dataclasses.dataclass
class Result:
    """What one compile gave, and what it violated."""

    family: str
    kernel: str
    config: str
    variant: str
    target: int
    num_warps: int
    compiled: bool = False
    error: Optional[str] = None
    registers: Optional[int] = None
    stack: Optional[int] = None  # stack frame, bytes per thread (cuobjdump STACK)
    #: local memory per thread in bytes: the stack frame, where ptxas puts spills, or cuobjdump's
    #: LOCAL if larger (cuobjdump reports LOCAL 0 for a kernel that spills to its stack frame)
    local_memory: Optional[int] = None
    spill_stores: Optional[int] = None  # bytes, from ``ptxas -v`` on the kernel's PTX
    spill_loads: Optional[int] = None
    shared_static: Optional[int] = None
    shared_dynamic: Optional[int] = None
    mma: List[str] = dataclasses.field(default_factory=list)
    load_bits: Optional[int] = None  # widest global load in the PTX (128: 16-byte vectors)
    n_spills: Optional[int] = None  # compiled.metadata's, where the runtime filled it in
    compile_s: float = 0.0
    violations: List[str] = dataclasses.field(default_factory=list)

    @property
    def shared(self) -> Optional[int]:
        if self.shared_static is None and self.shared_dynamic is None:
            return None
        return (self.shared_static or 0) + (self.shared_dynamic or 0)

    @property
    def passed(self) -> bool:
        return self.compiled and not self.violations

    @property
    def status(self) -> str:
        if not self.compiled:
            return "COMPILE FAILED"
        return "ok" if not self.violations else "FAIL"

    def label(self) -> str:
        return f"{self.kernel} [{self.config}] [{self.variant}] sm_{self.target}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shared"] = self.shared
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Expectations
# ----------------------------------------------------------------------------------------------


def _target_key(t) -> int:
    if isinstance(t, int):
        return t
    s = str(t).lower().replace("sm_", "").replace("sm", "").rstrip("a")
    return int(s)


def _for_target(value, target: int):
    """A limit given either for every target or as ``{target: value}``; None when not for this one."""
    if isinstance(value, dict):
        for k, v in value.items():
            if _target_key(k) == target:
                return v
        return None
    return value


def _mma_required(value, target: int) -> Optional[str]:
    if isinstance(value, dict):
        return _for_target(value, target)
    if isinstance(value, str):
        if value.upper() in ("HGMMA", "QGMMA", "IGMMA"):  # warpgroup MMA exists on sm_90 only
            return value if target == 90 else None
        return value
    raise TypeError(f"mma expectation must be a str or {{target: str}}, got {value!r}")


def check_expectations(result: Result, expectations: Optional[dict]) -> List[str]:
    """Violations of ``expectations`` (a kernel's entry of ``EXPECTATIONS``) and of the target's
    launch limits by a compiled ``result``; empty when it meets them all. A result that did not
    compile has no resource usage to check: it fails on its own (``Result.compiled``)."""
    out: List[str] = []
    if not result.compiled:
        return out
    exp = dict(expectations or {})
    for key in exp:
        if key not in EXPECTATION_KEYS:
            out.append(f"unknown expectation {key!r} (known: {', '.join(EXPECTATION_KEYS)})")

    def limit(key: str, measured: Optional[int], what: str) -> None:
        if key not in exp:
            return
        bound = _for_target(exp[key], result.target)
        if bound is None:
            return
        if measured is None:
            out.append(f"{key}: {what} unknown (resource usage not parsed), expected <= {bound}")
        elif measured > bound:
            out.append(f"{key}: {what} is {measured}, expected <= {bound}")

    limit("local_memory", result.local_memory, "local memory (stack frame / spills) in bytes")
    limit("stack", result.stack, "stack frame in bytes")
    limit("spills", result.spill_stores, "spill stores in bytes")
    limit("max_registers", result.registers, "registers per thread")
    if "mma" in exp:
        need = _mma_required(exp["mma"], result.target)
        if need and need.upper() not in result.mma:
            found = ", ".join(result.mma) or "none"
            out.append(f"mma: {need.upper()} required on sm_{result.target}, SASS has {found}")

    # Launchability on the target, whatever the declarations.
    smem_cap = SHARED_LIMIT.get(result.target)
    if smem_cap is not None and result.shared is not None and result.shared > smem_cap:
        out.append(f"shared memory {result.shared} B exceeds the sm_{result.target} limit {smem_cap} B")
    if result.registers is not None:
        threads = 32 * result.num_warps
        if result.registers * threads > REGISTER_FILE:
            out.append(f"{result.registers} registers x {threads} threads exceeds the register file "
                       f"({REGISTER_FILE})")
    return out


# ----------------------------------------------------------------------------------------------
# Families: which (kernel, config, specialisation) each compiles
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Family:
    """A kernel module and the jobs that cover all its kernels at all their launch configs."""

    name: str
    module: str
    jobs: Callable[[Sequence[int], bool], List[Job]]  # (targets, exhaustive) -> jobs


_STORAGE = {  # storage dtype -> (pointer type, ACC)
    "fp32": ("*fp32", "tl.float32"),
    "bf16": ("*bf16", "tl.float32"),
    "fp16": ("*fp16", "tl.float32"),
    "fp64": ("*fp64", "tl.float64"),
}
_SOFTMAX_KINDS = ("softmax", "log_softmax", "softmin")
_SOFTMAX_MODULE = "mmkernels._triton.softmax"


#: Warnings of the last job enumeration (coverage gaps in a family's own config list).
WARNINGS: List[str] = []


def _warn(msg: str) -> None:
    if msg in WARNINGS:
        return
    WARNINGS.append(msg)
    print(f"compile tier: warning: {msg}", file=sys.stderr, flush=True)


def _softmax_spec(kernel: str, cfg, layout: str, storage: str = "fp32", kind: int = 0,
                  int64: bool = False, aligned: bool = True):
    """(signature, constexprs, attrs) of a softmax-family kernel as ``_triton_forward`` /
    ``_triton_backward`` launch it for ``layout``."""
    fwd = "_fwd_" in kernel
    tensors = ("x", "y") if fwd else ("y", "dy", "dx")
    ptr_type, acc = _STORAGE[storage]
    sig: Dict[str, str] = {}
    cons: Dict[str, object] = {}
    attrs: Dict[str, list] = {}
    for t in tensors:
        sig[f"{t}_ptr"] = ptr_type
        if aligned:
            attrs[f"{t}_ptr"] = _DIV16
    sig["N"] = "i32"
    sig["I"] = "i32"
    if aligned:  # sizes that are multiples of 16, as Triton specialises them: vector loads
        attrs["N"] = attrs["I"] = _DIV16
    for t in tensors:
        so, sn, si = f"s{t}_o", f"s{t}_n", f"s{t}_i"
        if layout == "rows":  # (0, 1, row stride): O is folded into I, so s*_o is always 0
            sig[so] = "i32"
            attrs[so] = _DIV16  # Triton specialises 0 as divisible by 16
            sig[sn], cons[sn] = "constexpr", 1
            sig[si] = "i32"
            if aligned:
                attrs[si] = _DIV16
        else:  # columns: (O stride, N stride, 1)
            sig[so] = "i32"
            sig[sn] = "i32"
            if aligned:
                attrs[so] = attrs[sn] = _DIV16
            sig[si], cons[si] = "constexpr", 1
    cons["BLOCK_I"] = cfg.block_i
    cons["BLOCK_N"] = cfg.block_n
    if fwd:
        cons["LOG"] = kind == 1
        cons["NEG"] = kind == 2
    else:
        cons["KIND"] = kind
    cons["ACC"] = acc
    cons["USE_INT64"] = bool(int64)
    for k in cons:
        sig.setdefault(k, "constexpr")
    return sig, cons, attrs


def _softmax_config_label(cfg) -> str:
    return f"BLOCK_I={cfg.block_i} BLOCK_N={cfg.block_n} w={cfg.num_warps}" + (" online" if cfg.online else "")


def _softmax_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """Every ``(config, layout, f64)`` that :func:`mmkernels.ops.softmax.launch_configs` yields,
    at the representative specialisation (fp32 storage, or fp64 for the float64 configs); the
    largest one-pass and the looped config of each layout also at every other variant.
    (``exhaustive`` is accepted for the CLI; the resolver's own list is already complete.)"""
    from mmkernels.ops import softmax as S

    triples = list(S.launch_configs())

    def kernels_for(cfg):
        if cfg.online:
            return ("softmax_fwd_online_kernel", "softmax_bwd_looped_kernel")
        return ("softmax_fwd_fused_kernel", "softmax_bwd_fused_kernel")

    # specialisations: (variant label, storage, kind, int64, aligned)
    others = [(f"{s} softmax", s, 0, False, True) for s in ("bf16", "fp16")]
    others += [(f"fp32 {_SOFTMAX_KINDS[k]}", "fp32", k, False, True) for k in (1, 2)]
    others += [("fp32 softmax int64", "fp32", 0, True, True),
               ("fp32 softmax unaligned", "fp32", 0, False, False)]

    # the configs that get every variant: per layout, the largest one-pass config and the looped one
    full: set = set()
    for layout in ("rows", "columns"):
        for online in (False, True):
            cands = [c for c, l, f64 in triples if l == layout and c.online == online and not f64]
            if cands:
                best = max(cands, key=lambda c: (c.tile, c.num_warps, c.block_i, c.block_n))
                full.add((best, layout))

    jobs: List[Job] = []
    for target in targets:
        for cfg, layout, f64 in triples:
            base = ("fp64 softmax", "fp64", 0, False, True) if f64 else ("fp32 softmax", "fp32", 0, False, True)
            variants = [base] + (others if not f64 and (cfg, layout) in full else [])
            for kernel in kernels_for(cfg):
                for label, storage, kind, int64, aligned in variants:
                    sig, cons, attrs = _softmax_spec(kernel, cfg, layout, storage, kind, int64, aligned)
                    jobs.append(Job(
                        family="softmax", module=_SOFTMAX_MODULE, kernel=kernel,
                        config=_softmax_config_label(cfg), variant=f"{label} {layout}",
                        target=int(target), signature=sig, constexprs=cons, attrs=attrs,
                        options={"num_warps": cfg.num_warps},
                    ))
    return jobs


_BILINEAR_MODULE = "mmkernels._triton.bilinear"
#: per kernel: its tensors, each (pointer name, stride names); the last stride is 1 when contiguous
_BILINEAR_TENSORS = {
    "bilinear_fwd_kernel": (("z", ("s_zn", "s_zh")), ("x", ("s_xn", "s_xi")),
                            ("w", ("s_wj", "s_wh", "s_wi")), ("bias", ("s_b",)), ("y", ("s_yn", "s_yj"))),
    "bilinear_bwd_dzdx_kernel": (("z", ("s_zn", "s_zh")), ("x", ("s_xn", "s_xi")),
                                 ("w", ("s_wj", "s_wh", "s_wi")), ("dy", ("s_dyn", "s_dyj")),
                                 ("dz", ("s_dzn", "s_dzh")), ("dzacc", ("s_an", "s_ah")),
                                 ("dx", ("s_dxn", "s_dxi"))),
    "bilinear_bwd_dw_kernel": (("z", ("s_zn", "s_zh")), ("x", ("s_xn", "s_xi")),
                               ("dy", ("s_dyn", "s_dyj")), ("dw", ("s_dwj", "s_dwk"))),
}


def _bilinear_config_label(cfg) -> str:
    return " ".join(f"{f.name.upper()}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                    if f.name not in ("num_warps", "num_stages")) + f" w={cfg.num_warps} s={cfg.num_stages}"


def _bilinear_spec(kernel: str, cfg, storage: str, precision: str, int64: bool = False,
                   aligned: bool = True, w_flat: bool = True, need=(True, True), multi_i: bool = False):
    """(signature, constexprs, attrs) of a bilinear kernel as ``mmkernels.ops.bilinear``
    launches it for contiguous inputs (the innermost strides are 1: constexpr 1, as Triton
    specialises them; ``dzacc`` is dz itself unless it carries partial sums, in the ACC dtype)."""
    ptr_type = _STORAGE[storage][0]
    sig: Dict[str, str] = {}
    cons: Dict[str, object] = {}
    attrs: Dict[str, list] = {}
    tensors = _BILINEAR_TENSORS[kernel]
    for t, _ in tensors:  # the launcher passes dz as dzacc unless it carries sums (fp32 then)
        sig[f"{t}_ptr"] = ("*fp64" if storage == "fp64" else "*fp32") if t == "dzacc" and multi_i else ptr_type
        if aligned:
            attrs[f"{t}_ptr"] = _DIV16
    for n in ("N", "B", "C", "D"):
        sig[n] = "i32"
        if aligned:
            attrs[n] = _DIV16
    for t, strides in tensors:
        for k, sname in enumerate(strides):
            if k == len(strides) - 1 and (w_flat or t != "w" or kernel != "bilinear_fwd_kernel"):
                sig[sname], cons[sname] = "constexpr", 1
            else:
                sig[sname] = "i32"
                if aligned:
                    attrs[sname] = _DIV16
    if kernel == "bilinear_fwd_kernel" and not w_flat:  # a permuted weight: no stride is 1
        for sname in ("s_wj", "s_wh", "s_wi"):
            sig[sname] = "i32"
            cons.pop(sname, None)
    for f in dataclasses.fields(cfg):
        if f.name not in ("num_warps", "num_stages"):
            cons[f.name.upper()] = getattr(cfg, f.name)
    if kernel == "bilinear_fwd_kernel":
        cons["HAS_BIAS"] = True
        cons["W_FLAT"] = bool(w_flat)
    elif kernel == "bilinear_bwd_dzdx_kernel":
        cons["NEED_DZ"], cons["NEED_DX"] = bool(need[0]), bool(need[1])
        cons["MULTI_I"] = bool(multi_i)
    cons["PRECISION"] = precision
    cons["USE_INT64"] = bool(int64)
    cons["DOT_F32"] = False  # interpreter-only (bf16 there)
    cons["ACC"] = _STORAGE[storage][1]
    for k in cons:
        sig.setdefault(k, "constexpr")
    return sig, cons, attrs


def _bilinear_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """Every ``(kernel, config, dtype class)`` of :func:`mmkernels.ops.bilinear.launch_configs`:
    16-bit configs in bf16 (fp16 too at the largest config), ``tf32`` configs in fp32 with TF32 dots, ``ieee`` configs in
    fp32 with IEEE dots and ``fp64`` configs in float64 (FMA units: no tensor-core requirement); each also with unaligned pointers /
    sizes / strides. The largest config of each kernel and dtype class also at int64 indexing, a permuted weight
    (forward) and dz-only / dx-only (dz/dx kernel); the dz/dx configs whose i-block can be
    smaller than c also with carried dz partial sums (``MULTI_I``)."""
    from mmkernels.ops import bilinear as B

    triples = list(B.launch_configs())

    def size(cfg):
        return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))

    largest = {}
    for kernel, cfg, dclass in triples:
        key = (kernel, dclass)
        if key not in largest or size(cfg) > size(largest[key]):
            largest[key] = cfg
    jobs: List[Job] = []
    for target in targets:
        for kernel, cfg, dclass in triples:
            storages = {"16bit": ("bf16", "fp16"), "fp64": ("fp64",)}.get(dclass, ("fp32",))
            if dclass == "16bit" and cfg != largest[(kernel, dclass)]:
                storages = ("bf16",)  # fp16 builds the same code: at the largest config only
            precision = "tf32" if dclass == "tf32" else "ieee"
            expect = {"mma": None} if dclass in ("ieee", "fp64") else None
            # unaligned (odd sizes and strides) at every config: launches with them are common
            variants = [(s, {}) for s in storages] + [(f"{storages[0]} unaligned", dict(aligned=False))]
            if cfg == largest[(kernel, dclass)]:
                extra = [("int64", dict(int64=True))]
                if kernel == "bilinear_fwd_kernel":
                    extra.append(("strided w", dict(w_flat=False)))
                if kernel == "bilinear_bwd_dzdx_kernel":
                    extra += [("dz only", dict(need=(True, False))), ("dx only", dict(need=(False, True)))]
                variants += [(f"{storages[0]} {label}", kw) for label, kw in extra]
            if kernel == "bilinear_bwd_dzdx_kernel" and cfg.block_i == B.MAX_BLOCK_I:
                # c > block_i: several i-blocks, dz partial sums carried in fp32 (MULTI_I)
                variants += [(f"{s} multi-i", dict(multi_i=True)) for s in storages]
                variants += [(f"{storages[0]} multi-i {lab}", dict(kw, multi_i=True))
                             for lab, kw in (("int64", dict(int64=True)), ("unaligned", dict(aligned=False)))]
            for label, kw in variants:
                storage = label.split()[0]
                sig, cons, attrs = _bilinear_spec(kernel, cfg, storage, precision, **kw)
                jobs.append(Job(
                    family="bilinear", module=_BILINEAR_MODULE, kernel=kernel,
                    config=_bilinear_config_label(cfg), variant=f"{label} {dclass}" if dclass != "16bit" else label,
                    target=int(target), signature=sig, constexprs=cons, attrs=attrs,
                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                    expect=expect,
                ))
    return jobs


_ROUTING_MODULE = "mmkernels._triton.routing"
_ROUTING_KERNELS = ("route_topk_kernel", "route_scan_kernel", "route_scatter_kernel", "route_bwd_kernel")


def _constexpr_json(v):
    """A constexpr value as a Job holds it (Triton dtypes as ``"tl.<name>"``)."""
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"fp32": "tl.float32", "fp64": "tl.float64", "fp16": "tl.float16", "bf16": "tl.bfloat16"}[str(v)]
    return v


class LaunchRecorder:
    """Stands in for a kernel: ``recorder[grid](**kw)`` appends ``(name, real kernel, kw)`` to
    ``calls`` and runs nothing (also used by the tests, through ``monkeypatch``)."""

    def __init__(self, name: str, real, calls: list):
        self.name, self.real, self.calls = name, real, calls

    def __getitem__(self, grid):
        return lambda **kw: self.calls.append((self.name, self.real, kw))


@contextlib.contextmanager
def _recorded_launches(module, names: Sequence[str]):
    """Within the block, the kernels ``names`` of ``module`` are :class:`LaunchRecorder` s appending
    to the yielded list: a family's launchers can run on meta tensors to show the compile tier
    exactly what they would launch."""
    calls: List[tuple] = []
    real = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, LaunchRecorder(n, real[n], calls))
        yield calls
    finally:
        for n in names:
            setattr(module, n, real[n])


def _jobs_from_launches(family: str, module: str, launches, targets: Sequence[int]) -> List[Job]:
    """One job per distinct specialisation of the recorded ``launches`` — ``(kernel name, kernel,
    launch kwargs, variant label, config label or None, expect)`` — for each target, through
    :func:`jit_specialization` (so the signatures cannot drift from the launchers)."""
    jobs: List[Job] = []
    seen = set()
    for target in targets:
        for name, kernel, kw, variant, config, expect in launches:
            sig, cons, attrs, opts = jit_specialization(kernel, kw, target)
            cons = {k: _constexpr_json(v) for k, v in cons.items()}
            key = (target, name, tuple(sorted(sig.items())), tuple(sorted(cons.items(), key=str)),
                   opts.get("num_warps"), opts.get("num_stages"))
            if key in seen:
                continue
            seen.add(key)
            if config is None:
                config = " ".join(f"{k}={v}" for k, v in cons.items() if k.startswith("BLOCK"))
            jobs.append(Job(
                family=family, module=module, kernel=name,
                config=f"{config} w={opts.get('num_warps')}" + (f" s={opts['num_stages']}" if opts.get("num_stages") else ""),
                variant=variant, target=int(target), signature=sig, constexprs=cons, attrs=attrs,
                options={k: opts[k] for k in ("num_warps", "num_stages") if opts.get(k) is not None},
                expect=expect,
            ))
    return jobs


def _routing_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The routing kernels as :mod:`mmkernels.ops.routing` really launches them: its launchers run
    on meta tensors with the kernels recorded (:func:`_recorded_launches`).

    Coverage: every launch config :func:`mmkernels.ops.routing.launch_configs` stands for (expert
    counts 1 .. 1024, top-k 1, 8 and E, a few tokens and 2**20), at fp32 Mixtral routing forward
    and backward; at top-k min(8, E) and 2**20 tokens also bf16 Qwen3 (no renormalisation) and its
    backward, DeepSeek-V3 (sigmoid, bias, groups) and its backward, caller-given expert ids, fp64."""
    import torch

    from mmkernels._triton import routing as K
    from mmkernels.ops import routing as R

    entries = []
    with _recorded_launches(K, _ROUTING_KERNELS) as calls:
        def launches(T, E, k, variant, dtype=torch.float32, **kw):
            logits = torch.empty((T, E), dtype=dtype, device="meta")
            bias = torch.empty((E,), device="meta") if kw.pop("bias", False) else None
            ids_in = torch.empty((T, k), dtype=torch.int32, device="meta") if kw.pop("given", False) else None
            spec = R.RouterSpec(k, **kw)
            start = len(calls)
            R._triton_route(logits, bias, ids_in, spec, 2**31 - 1, R.DEFAULT_BLOCK_M)
            ids = torch.empty((T, k), dtype=torch.int32, device="meta")
            R._triton_route_backward(torch.empty((T, k), device="meta"), logits, ids, spec)
            cfg = R.resolve_config(T, E, k, dtype == torch.float64)
            label = f"BLOCK_T={cfg.block_t} E_PAD={cfg.e_pad} K_PAD={cfg.k_pad}"
            entries.extend(tuple(c) + (variant, label, None) for c in calls[start:])

        for E in (1, 2, 8, 61, 128, 256, 1024, R.MAX_EXPERTS):
            for k in sorted({1, min(8, E), E}):
                for T in (5, 1 << 20):
                    launches(T, E, k, "fp32 mixtral")
            k, T = min(8, E), 1 << 20
            launches(T, E, k, "bf16 qwen3", torch.bfloat16, renormalize=False)
            launches(T, E, k, "fp32 given ids", given=True)
            launches(T, E, k, "fp64 mixtral", torch.float64)
            if E >= 4:
                g = min(8, E // 2)
                launches(T, E, k, "fp32 deepseek", scoring="sigmoid", bias=True, n_groups=g,
                         topk_groups=max(1, g // 2), routed_scaling=2.5, key_on_scores=True)
                launches(T, E, k, "fp32 sigmoid", scoring="sigmoid", renormalize=False)
    return _jobs_from_launches("routing", _ROUTING_MODULE, entries, targets)


_EXPERTS_MODULE = "mmkernels._triton.experts"
_EXPERTS_KERNELS = ("experts_up_kernel", "experts_rows_kernel", "experts_combine_kernel", "experts_dact_kernel",
                    "experts_dweight_kernel", "experts_gather_kernel", "experts_dw_kernel")


def _experts_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The expert kernels as :mod:`mmkernels.ops.experts` launches them (forward with the saved
    pre-activation, and the whole backward), recorded on meta tensors like the routing jobs:
    bf16 (the tensor-core configs; HGMMA required on sm_90), fp16, fp32 and fp64 (IEEE / FMA dots:
    no tensor-core requirement), at the shapes of Mixtral (H 4096, I 14336, E 8, k 2), Qwen3-30B-A3B
    (H 2048, I 768, E 128, k 8) and a small odd one (H 24, I 40), every activation in bf16 at the
    Qwen3 shape, interleaved gate/up with biases (gpt-oss); routing tiles of
    :func:`~mmkernels.ops.routing.suggest_block_m` rows (128 at T = 16384; the Qwen3 shape also at
    T = 1024 and 64: 64- and 16-row tiles, the latter HMMA, not HGMMA — under its 64-row M)."""
    import torch

    from mmkernels._triton import experts as KX
    from mmkernels.ops import experts as X
    from mmkernels.ops.routing import Routing, max_tiles, suggest_block_m

    def routing(T, E, k):
        block_m = suggest_block_m(T, E, k)  # the tile height the library's callers take
        i32 = dict(dtype=torch.int32, device="meta")
        nt = max_tiles(T * k, E, block_m)
        return Routing(torch.empty((T, k), device="meta"), torch.empty((T, k), **i32), torch.empty((E,), **i32),
                       torch.empty((E + 1,), **i32), torch.empty((T * k,), **i32), torch.empty((T * k,), **i32),
                       torch.empty((T, k), dtype=torch.bool, device="meta"), torch.empty((nt,), **i32),
                       torch.empty((nt,), **i32), torch.empty((1,), **i32), block_m, None)

    def record() -> list:
        entries = []
        with _recorded_launches(KX, _EXPERTS_KERNELS) as calls:
            def launches(label, T, H, I, E, k, dtype, act="silu", interleaved=False, bias=False):
                r = routing(T, E, k)
                x = torch.empty((T, H), dtype=dtype, device="meta")
                gu = torch.empty((E, 2 * I, H), dtype=dtype, device="meta")
                dn = torch.empty((E, H, I), dtype=dtype, device="meta")
                b1 = torch.empty((E, 2 * I), dtype=dtype, device="meta") if bias else None
                b2 = torch.empty((E, H), dtype=dtype, device="meta") if bias else None
                spec = X.ExpertSpec(act, interleaved)
                start = len(calls)
                _, h, _, a = X._triton_forward(x, r.weights, gu, dn, b1, b2, r, spec, save_h=True)
                X._triton_backward(torch.empty((T, H), dtype=dtype, device="meta"), x, r.weights, gu, dn, b1, b2, r,
                                   h, a, spec, (True,) * 6)
                for name, kernel, kw in calls[start:]:
                    tensor_core = label.startswith(("bf16", "fp16")) and name not in ("experts_combine_kernel",
                                                                                      "experts_dw_kernel")
                    # 16-row decode tiles are under HGMMA's 64-row M: HMMA there
                    decode = kw.get("BLOCK_M", 64) < 64 and name != "experts_dweight_kernel"
                    expect = ({"mma": "HMMA"} if decode else None) if tensor_core else {"mma": None}
                    entries.append((name, kernel, kw, f"{label} bm={r.block_m}", None, expect))

            shapes = {"mixtral": (16384, 4096, 14336, 8, 2), "qwen3": (16384, 2048, 768, 128, 8), "odd": (64, 24, 40, 7, 3)}
            for name, shp in shapes.items():
                for dname, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    launches(f"{dname} {name}", *shp, dt)
            launches("fp16 qwen3", *shapes["qwen3"], torch.float16)
            for T in (1024, 64):  # 64-row tiles, and decode's 16-row tiles
                launches("bf16 qwen3", T, *shapes["qwen3"][1:], torch.bfloat16)
            launches("fp64 odd", *shapes["odd"], torch.float64)
            for act in X.ACTIVATIONS[1:]:
                launches(f"bf16 qwen3 {act}", *shapes["qwen3"], torch.bfloat16, act=act)
            launches("bf16 gpt-oss (interleaved, biases)", 16384, 2880, 2880, 32, 4, torch.bfloat16,
                     act="swiglu_oai", interleaved=True, bias=True)
        return entries

    jobs: List[Job] = []
    for target in targets:  # each target's launches with its own tiles (ops.experts.target_arch)
        with X.target_arch(int(target) // 10):
            jobs += _jobs_from_launches("experts", _EXPERTS_MODULE, record(), [target])
    return jobs


_CROSS_ENTROPY_MODULE = "mmkernels._triton.cross_entropy"
_CROSS_ENTROPY_KERNELS = ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel")


def _cross_entropy_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The cross-entropy kernels as :mod:`mmkernels.ops.cross_entropy` launches them (forward and
    backward on meta tensors): every config of ``launch_configs`` (C = 1 .. 4096 and 32000) in fp32
    with label smoothing; at C = 32000 also bf16 and fp16 logits, fp64, no smoothing, smoothing 1,
    and int64 offsets (2**17 rows)."""
    import torch

    from mmkernels._triton import cross_entropy as K
    from mmkernels.ops import cross_entropy as CE

    entries = []
    with _recorded_launches(K, _CROSS_ENTROPY_KERNELS) as calls:
        def launches(N, C, variant, dtype=torch.float32, eps=0.1):
            x = torch.empty((N, C), dtype=dtype, device="meta")
            t = torch.empty((N,), dtype=torch.int64, device="meta")
            start = len(calls)
            loss, lse = CE._triton_forward(x, t, -100, eps)
            g = torch.empty((), dtype=lse.dtype, device="meta").reshape(1).expand(N)
            CE._triton_backward(x, t, lse, g, -100, eps, torch.empty_like(x))
            entries.extend(tuple(c) + (variant, f"BLOCK_C={CE.resolve_config(C).block_c}", None)
                           for c in calls[start:])

        for cfg in CE.launch_configs():
            launches(64, cfg.block_c, "fp32 smoothing")
        launches(64, 32000, "fp32 smoothing")
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            launches(64, 32000, f"{str(dtype)[6:]}", dtype)
        launches(64, 32000, "fp32 no smoothing", eps=0.0)
        launches(64, 32000, "fp32 smoothing 1", eps=1.0)
        launches(1 << 17, 32000, "fp32 int64 offsets")
    return _jobs_from_launches("cross_entropy", _CROSS_ENTROPY_MODULE, entries, targets)


_ATTENTION_MODULE = "mmkernels._triton.attention"
_ATTENTION_KERNELS = ("attention_fwd_kernel", "attention_bwd_kernel")


def _attention_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The attention-module kernels as :mod:`mmkernels.ops.attention` launches them (forward and
    backward on meta tensors): every config of ``launch_configs`` (J = 1 .. MAX_J, D = 1 .. 4096)
    in fp32 with a mask; at J = 8, D = 512 and at J = MAX_J also bf16, fp16 and fp64, no mask, and
    int64 offsets."""
    import torch

    from mmkernels._triton import attention as K
    from mmkernels.ops import attention as A

    entries = []
    with _recorded_launches(K, _ATTENTION_KERNELS) as calls:
        def launches(R, J, D, variant, dtype=torch.float32, masked=True):
            z = torch.empty((R, J), dtype=dtype, device="meta")
            x = torch.empty((R, J, D), dtype=dtype, device="meta")
            mask = torch.empty((R, J), dtype=torch.bool, device="meta") if masked else None
            start = len(calls)
            s, lse = A._triton_forward(z, x, mask, 0.5)
            A._triton_backward(z, x, mask, s, lse, torch.empty_like(s), 0.5)
            cfg = A.resolve_config(J, D)
            entries.extend(tuple(c) + (variant, f"BLOCK_J={cfg.block_j} BLOCK_D={cfg.block_d}", None)
                           for c in calls[start:])

        for cfg in A.launch_configs():
            launches(64, cfg.block_j, cfg.block_d, "fp32 mask")
        for J, D in ((8, 512), (A.MAX_J, 64)):
            for dtype in (torch.bfloat16, torch.float16, torch.float64):
                launches(64, J, D, str(dtype)[6:], dtype)
            launches(64, J, D, "fp32 no mask", masked=False)
            launches((1 << 31) // (J * D) + 1, J, D, "fp32 int64 offsets")
    return _jobs_from_launches("attention", _ATTENTION_MODULE, entries, targets)


_GATING_MODULE = "mmkernels._triton.gating"
_GATING_KERNELS = ("gated_blend_fwd_kernel", "gated_blend_bwd_kernel")


def _gating_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The gate-blend kernels as :mod:`mmkernels.ops.gating` launches them (forward and backward on
    meta tensors; one config): fp32, bf16, fp16, fp64, strided pathways, int64 offsets."""
    import torch

    from mmkernels._triton import gating as K
    from mmkernels.ops import gating as G

    entries = []
    with _recorded_launches(K, _GATING_KERNELS) as calls:
        def launches(R, D, variant, dtype=torch.float32, strided=False):
            a = torch.empty((R, D), dtype=dtype, device="meta")
            b = torch.empty((D, R), dtype=dtype, device="meta").t() if strided else torch.empty_like(a)
            pre = torch.empty_like(a)
            start = len(calls)
            out = G._triton_forward(pre, a, b)
            G._triton_backward(torch.empty_like(out), pre, a, b)
            entries.extend(tuple(c) + (variant, f"BLOCK={G.BLOCK}", None) for c in calls[start:])

        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            launches(4096, 1024, str(dtype)[6:], dtype)
        launches(4096, 1024, "fp32 strided b", strided=True)
        launches(1 << 20, 4096, "fp32 int64 offsets")
    return _jobs_from_launches("gating", _GATING_MODULE, entries, targets)


_PRODUCT_MODULE = "mmkernels._triton.product"
_PRODUCT_KERNELS = ("product_terms_kernel", "product_dweight_kernel")


def _product_jobs(targets: Sequence[int], exhaustive: bool = False) -> List[Job]:
    """The product-unit kernels as :mod:`mmkernels.ops.product` launches them (forward terms and
    the weight gradient on meta tensors; one tile config): fp32, bf16 and fp16 inputs (fp32 math),
    fp64, a transposed x."""
    import torch

    from mmkernels._triton import product as K
    from mmkernels.ops import product as P

    entries = []
    with _recorded_launches(K, _PRODUCT_KERNELS) as calls:
        def launches(variant, dtype=torch.float32, transposed=False):
            x = torch.empty((512, 256), dtype=dtype, device="meta")
            if transposed:
                x = torch.empty((256, 512), dtype=dtype, device="meta").t()
            w = torch.empty((128, 256), dtype=dtype, device="meta")
            start = len(calls)
            a, b = P._triton_terms(x, w)
            P._triton_dweight(x, a, b, w.dtype)
            cfg = P.resolve_config(1, 1, 1)
            entries.extend(tuple(c) + (variant, f"BLOCK={cfg.block_m}x{cfg.block_n}x{cfg.block_k}", None)
                           for c in calls[start:])

        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            launches(str(dtype)[6:], dtype)
        launches("fp32 transposed x", transposed=True)
    return _jobs_from_launches("product", _PRODUCT_MODULE, entries, targets)


#: Every op family the compile tier covers. A new family adds its kernel module and job builder.
FAMILIES: Dict[str, Family] = {
    "softmax": Family("softmax", _SOFTMAX_MODULE, _softmax_jobs),
    "bilinear": Family("bilinear", _BILINEAR_MODULE, _bilinear_jobs),
    "routing": Family("routing", _ROUTING_MODULE, _routing_jobs),
    "experts": Family("experts", _EXPERTS_MODULE, _experts_jobs),
    "cross_entropy": Family("cross_entropy", _CROSS_ENTROPY_MODULE, _cross_entropy_jobs),
    "attention": Family("attention", _ATTENTION_MODULE, _attention_jobs),
    "gating": Family("gating", _GATING_MODULE, _gating_jobs),
    "product": Family("product", _PRODUCT_MODULE, _product_jobs),
}


# ----------------------------------------------------------------------------------------------
# Compiling one job (runs in a worker process)
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - fall back to the wheel's bin folder
        pass
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_USAGE_RE = re.compile(
    r"Function\s+(\S+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", re.MULTILINE)


def parse_resource_usage(text: str, kernel: str) -> Dict[str, int]:
    """``cuobjdump --dump-resource-usage`` output -> registers / stack / shared / local of ``kernel``."""
    found = {m.group(1): m for m in _USAGE_RE.finditer(text)}
    m = found.get(kernel) or (next(iter(found.values())) if len(found) == 1 else None)
    if m is None:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump output:\n{text}")
    return {"registers": int(m.group(2)), "stack": int(m.group(3)),
            "shared_static": int(m.group(4)), "local_memory": int(m.group(5))}


def parse_mma(sass: str) -> List[str]:
    """Tensor-core opcodes present in SASS text."""
    return [op for op in MMA_OPCODES if re.search(rf"\b{op}\b", sass)]


_PTX_MMA_RE = re.compile(r"\b(?:wgmma|mma)\.")  # mma.sync, wgmma.mma_async, tcgen05.mma


_PTX_LD_RE = re.compile(r"\bld\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def parse_load_bits(ptx: str) -> Optional[int]:
    """Widest global load in the PTX, in bits (128 = 16-byte vector loads); None if no load."""
    widths = [int(v or 1) * int(b) for v, b in _PTX_LD_RE.findall(ptx)]
    return max(widths) if widths else None


_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_spills(log: str) -> Dict[str, int]:
    """``ptxas -v`` output -> stack frame and spill store / load bytes."""
    m = _PTXAS_RE.search(log)
    if m is None:
        raise RuntimeError(f"no spill information in the ptxas -v output:\n{log}")
    return {"ptxas_stack": int(m.group(1)), "spill_stores": int(m.group(2)),
            "spill_loads": int(m.group(3))}


def _ptxas_spills(ptx: str, target: int, metadata) -> Dict[str, int]:
    """Spills as ptxas reports them (cuobjdump has no spill counts, and its LOCAL stays 0 for a
    kernel whose spills live in the stack frame): ptxas -v on the kernel's PTX with the flags
    Triton compiled it with. ptxas is fast (tens of ms); only its log is kept."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fd, src = tempfile.mkstemp(suffix=".ptx", prefix="mmk_compile_tier_")
    out = src + ".cubin"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ptx)
        fmad = [] if getattr(metadata, "enable_fp_fusion", True) else ["--fmad=false"]
        extra = (getattr(metadata, "ptx_options", None) or "").split()
        cmd = [get_ptxas(target).path, "-lineinfo", *fmad, "-v", *extra,
               f"--gpu-name={sm_arch_from_capability(target)}", src, "-o", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return parse_ptxas_spills(proc.stdout + proc.stderr)
    finally:
        for p in (src, out):
            if os.path.exists(p):
                os.unlink(p)


def _inspect_cubin(cubin: bytes, kernel: str, disassemble: bool = True) -> dict:
    fd, path = tempfile.mkstemp(suffix=".cubin", prefix="mmk_compile_tier_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        out = parse_resource_usage(usage, kernel)
        out["mma"] = []
        if not disassemble:
            return out
        sass = subprocess.run([_tool("nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout
        out["mma"] = parse_mma(sass)
        return out
    finally:
        os.unlink(path)


def _resolve_constexpr(v):
    if isinstance(v, str) and v.startswith("tl."):
        import triton.language as tl

        return getattr(tl, v[3:])
    return v


def _error_text(e: BaseException, limit: int = 4000) -> str:
    """The innermost cause first (Triton's CompilationError wraps the reason), then the chain."""
    chain = [e]
    while chain[-1].__cause__ is not None or (chain[-1].__context__ is not None
                                              and not chain[-1].__suppress_context__):
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain or len(chain) > 8:
            break
        chain.append(nxt)
    parts = [f"{type(x).__name__}: {str(x).strip()}" for x in reversed(chain)]
    msg = "\n".join(parts)
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def compile_job(job: Job) -> Result:
    """Compile ``job`` and read its resource usage (no expectation checks here)."""
    res = Result(job.family, job.kernel, job.config, job.variant, job.target,
                 int(job.options.get("num_warps", 4)))
    t0 = time.perf_counter()
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        fn = getattr(importlib.import_module(job.module), job.kernel)
        if not isinstance(fn, JITFunction):
            raise TypeError(
                f"{job.module}.{job.kernel} is a {type(fn).__name__}, not a JITFunction (was "
                f"TRITON_INTERPRET set when the kernels were imported in this process?)")
        names = list(fn.arg_names)
        missing = [a for a in names if a not in job.signature]
        extra = [a for a in job.signature if a not in names]
        if missing or extra:
            raise ValueError(f"signature does not match {job.kernel}{tuple(names)}: "
                             f"missing {missing}, unknown {extra}")
        signature = {a: job.signature[a] for a in names}
        constexprs = {a: _resolve_constexpr(v) for a, v in job.constexprs.items()}
        attrs = {(names.index(a),): v for a, v in job.attrs.items()}
        src = ASTSource(fn, signature, constexprs, attrs)
        # ptxas's -v log (spills) is printed by Triton with dump_ptxas_log; on a ptxas failure
        # Triton prints the whole PTX: the exception carries the log
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.target, 32),
                                      options=dict(job.options))
        md = compiled.metadata
        res.shared_dynamic = int(getattr(md, "shared", 0) or 0)
        n_spills = getattr(md, "n_spills", None)
        res.n_spills = int(n_spills) if isinstance(n_spills, int) else None
        disassemble = job.disassemble
        if disassemble is None:
            disassemble = bool(_PTX_MMA_RE.search(compiled.asm.get("ptx", "") or "x"))
        usage = _inspect_cubin(compiled.asm["cubin"], getattr(md, "name", job.kernel), disassemble)
        try:
            spills = parse_ptxas_spills(stdout.getvalue())
        except RuntimeError:  # a hit in Triton's cache: no ptxas ran
            spills = _ptxas_spills(compiled.asm["ptx"], job.target, md)
        res.registers = usage["registers"]
        res.stack = usage["stack"]
        res.local_memory = max(usage["local_memory"], usage["stack"], spills["ptxas_stack"])
        res.spill_stores = spills["spill_stores"]
        res.spill_loads = spills["spill_loads"]
        res.shared_static = usage["shared_static"]
        res.mma = usage["mma"]
        res.load_bits = parse_load_bits(compiled.asm.get("ptx", "") or "")
        res.compiled = True
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
        res.error = _error_text(e)
    res.compile_s = round(time.perf_counter() - t0, 3)
    return res


def jit_specialization(kernel, kwargs: dict, target: int = 90):
    """(signature, constexprs, attrs, options) that Triton's launcher would compile ``kernel``
    with for a launch ``kernel[grid](**kwargs)``, keyed by argument name -- to check a family's
    job builder against real launches (the arguments may be CPU tensors; no GPU needed).
    ``kernel`` may be an interpreted function: its Python function is re-wrapped."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    backend = make_backend(GPUTarget("cuda", int(target), 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(**kwargs)
    names = list(fn.arg_names)
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {n: s[1] for n, s in zip(names, spec) if s[0] == "constexpr"}
    attrs = {n: backend.parse_attr(s[1]) for n, s in zip(names, spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and backend.parse_attr(s[1])}
    return signature, constexprs, attrs, dict(opts)


def _worker_init() -> None:
    # the kernels are imported in the worker: they must be JITFunctions, not interpreted ones
    os.environ.pop("TRITON_INTERPRET", None)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def interpreter_requested() -> bool:
    """True when this process's kernel objects are (or would be) Triton-interpreted functions."""
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        return True
    for fam in FAMILIES.values():
        mod = sys.modules.get(fam.module)
        if mod is None:
            continue
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except Exception:  # noqa: BLE001
            return False
        if any(isinstance(v, InterpretedFunction) for v in vars(mod).values()):
            return True
    return False


def _select(families: Optional[Iterable[str]]) -> List[Family]:
    if families is None:
        return list(FAMILIES.values())
    names = [f for f in families]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"known: {sorted(FAMILIES)}")
    return [FAMILIES[f] for f in names]


def _coverage(fam: Family, jobs: List[Job], expectations: dict) -> List[Result]:
    """Failures for kernels of the module that no job compiles, and for expectations that name
    no kernel of the module."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(fam.module)
    kernels = {n for n, v in vars(mod).items()
               if isinstance(v, JITFunction) and not n.startswith("_")}
    compiled = {j.kernel for j in jobs}
    out = []
    for name in sorted(kernels - compiled):
        out.append(Result(fam.name, name, "-", "-", 0, 0, compiled=False,
                          error=f"kernel {fam.module}.{name} is not covered by the compile tier"))
    for name in sorted(set(expectations) - kernels):
        out.append(Result(fam.name, name, "-", "-", 0, 0, compiled=False,
                          error=f"EXPECTATIONS names {name!r}, which is no kernel of {fam.module}"))
    return out


def _progress(i: int, n: int, r: Result) -> None:
    regs = "-" if r.registers is None else r.registers
    local = "-" if r.local_memory is None else r.local_memory
    extra = "" if r.passed else (": " + (r.error.splitlines()[0] if r.error else "; ".join(r.violations)))
    print(f"[{i}/{n}] {r.status:<14} {r.label()} regs={regs} local={local} "
          f"({r.compile_s:.1f}s){extra}", file=sys.stderr, flush=True)


def compile_all(families: Optional[Iterable[str]] = None, targets: Sequence[int] = DEFAULT_TARGETS,
                jobs: int = 2, progress: bool = True, exhaustive: bool = False,
                disassemble: Optional[bool] = None) -> List[Result]:
    """Compile every kernel of ``families`` (default: all) at every launch config for ``targets``
    in a pool of ``jobs`` processes; check each kernel module's ``EXPECTATIONS``.

    Returns one :class:`Result` per compile (``Result.passed`` tells), plus a failed result for a
    kernel of a module that no job compiles. Under Triton's interpreter the whole run happens in
    a subprocess without ``TRITON_INTERPRET``. ``exhaustive``: every config in every layout it
    serves, not one; ``disassemble=True``: run nvdisasm on every cubin (default: only where the
    PTX holds an MMA instruction).
    """
    fams = _select(families)
    targets = tuple(_target_key(t) for t in targets)
    WARNINGS.clear()
    if interpreter_requested():
        if os.environ.get("MMKERNELS_COMPILE_TIER_CHILD"):
            raise RuntimeError("compile tier: Triton's interpreter is still on in the subprocess "
                               "started without TRITON_INTERPRET")
        return _compile_in_subprocess([f.name for f in fams], targets, jobs, progress, exhaustive,
                                      disassemble)

    all_jobs: List[Job] = []
    results: List[Result] = []
    expectations: Dict[Tuple[str, str], dict] = {}
    for fam in fams:
        fam_jobs = fam.jobs(targets, exhaustive)
        if disassemble is not None:
            for j in fam_jobs:
                j.disassemble = disassemble
        mod = importlib.import_module(fam.module)
        exp = dict(getattr(mod, "EXPECTATIONS", {}) or {})
        for k, v in exp.items():
            expectations[(fam.name, k)] = v
        results += _coverage(fam, fam_jobs, exp)
        all_jobs += fam_jobs

    return results + run_jobs(all_jobs, expectations, jobs=jobs, progress=progress)


def _pool_starts(ctx) -> bool:
    """Whether a spawned worker can run anything at all."""
    try:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init) as pool:
            return pool.submit(os.getpid).result() > 0
    except cf.process.BrokenProcessPool:
        return False


def run_jobs(job_list: Sequence[Job], expectations: Optional[Dict[Tuple[str, str], dict]] = None,
             jobs: int = 2, progress: bool = False) -> List[Result]:
    """Compile ``job_list`` in a pool of ``jobs`` fresh (spawned) processes without
    ``TRITON_INTERPRET`` and check ``expectations`` (``{(family, kernel): {...}}``); results in the
    order of the jobs. A compile that kills its worker process (a crash in LLVM / MLIR) becomes a
    failed result of its own: the jobs left when a pool breaks are retried, one process per job
    once a pool breaks without finishing anything."""
    expectations = expectations or {}
    n = len(job_list)
    out: List[Optional[Result]] = [None] * n
    pending = list(range(n))
    finished = 0
    isolate = 0  # > 0: run that many of the next jobs one process each (a pool broke at once)
    ctx = multiprocessing.get_context("spawn")

    def record(k: int, r: Result) -> None:
        nonlocal finished
        exp = expectations.get((r.family, r.kernel))
        if job_list[k].expect:
            exp = {kk: v for kk, v in {**(exp or {}), **job_list[k].expect}.items() if v is not None}
        r.violations = check_expectations(r, exp)
        out[k] = r
        finished += 1
        if progress:
            _progress(finished, n, r)

    while pending:
        batch = pending[:1] if isolate else pending
        workers = 1 if isolate else max(1, min(int(jobs), len(batch)))
        isolate = max(0, isolate - 1)
        done_here = 0
        try:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                        initializer=_worker_init) as pool:
                futures = {pool.submit(compile_job, job_list[k]): k for k in batch}
                for fut in cf.as_completed(futures):
                    record(futures[fut], fut.result())
                    done_here += 1
        except cf.process.BrokenProcessPool:
            if workers == 1 and len(batch) == 1 and finished == 0 and not _pool_starts(ctx):
                raise RuntimeError(
                    "compile tier: worker processes die at start-up (spawn start method: a script "
                    "that calls the compile tier needs an `if __name__ == '__main__':` guard)"
                ) from None
            if len(batch) == 1:  # this one job kills its process
                job = job_list[batch[0]]
                record(batch[0], Result(job.family, job.kernel, job.config, job.variant, job.target,
                                        int(job.options.get("num_warps", 4)), compiled=False,
                                        error="the compiler process died (crash in triton / LLVM)"))
            elif done_here == 0:  # the crash is among the first jobs, those the workers had taken
                isolate = workers
        pending = [k for k in pending if out[k] is None]
    return out  # type: ignore[return-value]


def _compile_in_subprocess(families: List[str], targets: Sequence[int], jobs: int,
                           progress: bool, exhaustive: bool = False,
                           disassemble: Optional[bool] = None) -> List[Result]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKERNELS_COMPILE_TIER_CHILD"] = "1"
    fd, path = tempfile.mkstemp(suffix=".json", prefix="mmk_compile_tier_")
    os.close(fd)
    try:
        cmd = [sys.executable, "-m", "mmkernels.testing.compile_tier",
               "--targets", ",".join(str(t) for t in targets), "--jobs", str(jobs),
               "--json", path, "--no-table"]
        for f in families:
            cmd += ["--family", f]
        if not progress:
            cmd.append("--quiet")
        if exhaustive:
            cmd.append("--exhaustive")
        if disassemble:
            cmd.append("--sass")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"compile tier subprocess exited with {proc.returncode} without "
                               f"results:\n{' '.join(cmd)}\n{proc.stdout}") from None
        WARNINGS.extend(data.get("warnings", []))
        return [Result.from_dict(d) for d in data["results"]]
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """One block per kernel x target: variant/config, registers, stack, local, smem, MMA, status."""
    def cell(v):
        return "-" if v is None else str(v)

    groups: Dict[Tuple[str, int], List[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.target), []).append(r)
    head = ("kernel", "variant / config", "target", "regs", "stack", "local", "spills", "smem", "ld bits",
            "MMA", "status")
    lines = []
    for (kernel, target), rs in groups.items():
        rows = [(r.kernel, f"{r.variant} / {r.config}", f"sm_{r.target}" if r.target else "-",
                 cell(r.registers), cell(r.stack), cell(r.local_memory),
                 "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}", cell(r.shared),
                 cell(r.load_bits),
                 ",".join(r.mma) or "-",
                 r.status + ("" if r.passed else ": " + (r.error.splitlines()[0] if r.error
                                                          else "; ".join(r.violations))))
                for r in rs]
        w = [max(len(head[c]), *(len(row[c]) for row in rows)) for c in range(len(head) - 1)]
        fmt = "  ".join(f"{{:<{x}}}" if c < 3 else f"{{:>{x}}}" for c, x in enumerate(w)) + "  {}"
        nfail = sum(not r.passed for r in rs)
        lines.append(f"== {kernel} {f'sm_{target}' if target else '(no target)'}: {len(rs)} compiles, "
                     f"{'all ok' if not nfail else f'{nfail} FAILED'}")
        lines.append(fmt.format(*head))
        lines += [fmt.format(*row) for row in rows]
        lines.append("")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> Tuple[int, List[Result]]:
    """(exit code, failed results): 0 when every compile succeeded and met its expectations."""
    failed = [r for r in results if not r.passed]
    return (1 if failed or not results else 0), failed


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _targets_arg(s: str) -> Tuple[int, ...]:
    try:
        out = tuple(_target_key(t) for t in s.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"targets must look like 80,90 (got {s!r})") from None
    if not out:
        raise argparse.ArgumentTypeError("no target given")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", action="append", default=None, choices=sorted(FAMILIES),
                        help="op family to compile (repeatable; default: all)")
    parser.add_argument("--targets", type=_targets_arg, default=DEFAULT_TARGETS,
                        help="compute capabilities, comma-separated (default: 80,90)")
    parser.add_argument("--jobs", "-j", type=int, default=2,
                        help="compile processes (default: 2)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write every result to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--exhaustive", action="store_true",
                        help="compile every config in every layout it serves (default: one)")
    parser.add_argument("--sass", action="store_true",
                        help="disassemble every cubin (default: only where the PTX has MMA)")
    parser.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    results = compile_all(families=args.family, targets=args.targets, jobs=args.jobs,
                          progress=not args.quiet, exhaustive=getattr(args, "exhaustive", False),
                          disassemble=True if getattr(args, "sass", False) else None)
    wall = time.perf_counter() - t0
    code, failed = summary(results)
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "targets": list(args.targets),
                       "families": args.family or sorted(FAMILIES), "wall_s": round(wall, 2),
                       "passed": code == 0, "warnings": list(WARNINGS),
                       "results": [r.to_dict() for r in results]}, f, indent=1)
    if not getattr(args, "no_table", False):
        print(format_table(results))
        print(f"{len(results)} compiles for {', '.join(f'sm_{t}' for t in args.targets)} in "
              f"{wall:.1f}s: {len(results) - len(failed)} ok, {len(failed)} failed")
        for w in WARNINGS:
            print(f"warning: {w}")
        for r in failed:
            why = r.error if r.error else "; ".join(r.violations)
            print(f"FAILED {r.label()}: {why}")
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.testing.compile_tier",
                                     description="compile tier (see python -m mmkernels compile)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # run through the imported module, so that worker processes unpickle its functions by name
    from mmkernels.testing import compile_tier as _self

    sys.exit(_self.main())
