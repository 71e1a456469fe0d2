"""Compile tier: every kernel, at every config it can launch with, compiled ahead of time for
``sm_80`` / ``sm_90`` on a CPU machine, with its resource usage checked (docs/DESIGN.md,
"Verification tiers", item 3).

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
target. ``"min_load_bits": 128`` requires a global load at least that wide in the PTX (16-byte
vectors: what a launch variant for unaligned sizes declares when its kernel splits rows into an
aligned body and a scalar head and tail). Whatever the declarations, a kernel must also be launchable on its target: shared memory
within the per-block limit and ``registers * threads`` within the register file.

What is compiled: each family's own launchers, called on meta tensors by its declaration's
``launches(recorder, target)`` (:mod:`mmkernels.family`, ``mmkernels/families/<name>.py``) with
every kernel of its kernel module replaced by a recorder (:class:`LaunchRecorder`); each distinct
recorded launch is specialised by Triton's own binder (:func:`jit_specialization`: argument
types, constexprs, 16-byte divisibility of pointers, sizes and strides, strides of 1 as constexpr
1) into one :class:`Job` per target. The jobs cannot drift from the launchers: they are the
launchers' own launches. A kernel of a kernel module that no recorded launch reaches is a failure
(``_coverage``).

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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mmkernels._backend import kernel_names
from mmkernels.ops._launch import named_arguments

DEFAULT_TARGETS: Tuple[int, ...] = (80, 90)

#: Per-block shared memory a kernel may use (opt-in maximum) and the register file per SM.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTER_FILE = 65536
MAX_REGISTERS_PER_THREAD = 255

#: Tensor-core instructions looked for in the SASS.
MMA_OPCODES = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")

EXPECTATION_KEYS = ("local_memory", "stack", "spills", "max_registers", "mma", "min_load_bits")

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
    #: the SASS of the innermost loop holding tensor-core instructions (:func:`parse_main_loop`):
    #: {"instructions", "mma", "mma_flops", "loads": {opcode: count}}; None without one
    main_loop: Optional[dict] = None
    n_spills: Optional[int] = None  # compiled.metadata's, where the runtime filled it in
    compile_s: float = 0.0
    #: "python": Triton's front end ran on the kernel's source; "ttir": the build started from
    #: the TTIR another target's build of the same job made (:func:`compile_for_targets`)
    front_end: str = "python"
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
    if exp.get("min_load_bits") is not None:
        want = _for_target(exp["min_load_bits"], result.target)
        if want is not None and (result.load_bits or 0) < want:
            out.append(f"min_load_bits: widest global load is {result.load_bits} bits, expected >= {want}")
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
# Jobs from the families' own launchers
# ----------------------------------------------------------------------------------------------


def constexpr_json(v):
    """A constexpr value as a Job holds it (Triton dtypes as ``"tl.<name>"``)."""
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"fp32": "tl.float32", "fp64": "tl.float64", "fp16": "tl.float16", "bf16": "tl.bfloat16"}[str(v)]
    return v


class LaunchRecorder:
    """What a family's ``launches(recorder, target)`` runs under (see
    :class:`mmkernels.family.LaunchRecorder`): every kernel of the family's kernel module is replaced
    by a stand-in whose ``kernel[grid](*args, **kw)`` appends ``(name, real kernel, kw, variant, config,
    expect)`` to :attr:`entries` and runs nothing, so the launchers, called on meta tensors, show
    exactly what they would launch."""

    def __init__(self, module, names: Sequence[str]):
        self.module, self.names = module, tuple(names)
        self.entries: List[tuple] = []
        self._label: Optional[tuple] = None

    @contextlib.contextmanager
    def variant(self, label: str, config: Optional[str] = None, expect=None):
        saved, self._label = self._label, (label, config, expect)
        try:
            yield
        finally:
            self._label = saved

    def _stand_in(self, name: str, real):
        recorder = self

        class StandIn:
            arg_names = real.arg_names  # what positional launches bind by (mmkernels.ops._launch)

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    kw = named_arguments(real, args, kw)
                    if recorder._label is None:
                        raise RuntimeError(f"{name} was launched outside recorder.variant(...): label it")
                    label, config, expect = recorder._label
                    if callable(expect):
                        expect = expect(name, kw)
                    recorder.entries.append((name, real, kw, label, config, expect))
                return launch
        return StandIn()

    @contextlib.contextmanager
    def installed(self):
        """Within the block, the module's kernels are stand-ins."""
        real = {n: getattr(self.module, n) for n in self.names}
        try:
            for n in self.names:
                setattr(self.module, n, self._stand_in(n, real[n]))
            yield self
        finally:
            for n in self.names:
                setattr(self.module, n, real[n])


def _jobs_from_launches(family: str, module: str, launches, target: int) -> List[Job]:
    """One job per distinct specialisation of the recorded ``launches`` (see
    :class:`LaunchRecorder`) for ``target``, through :func:`jit_specialization`: the signatures
    are Triton's own for those launches."""
    jobs: List[Job] = []
    seen = set()
    for name, kernel, kw, variant, config, expect in launches:
        sig, cons, attrs, opts = jit_specialization(kernel, kw, target)
        cons = {k: constexpr_json(v) for k, v in cons.items()}
        key = (name, tuple(sorted(sig.items())), tuple(sorted(cons.items(), key=str)),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), opts.get("num_warps"), opts.get("num_stages"))
        if key in seen:
            continue
        seen.add(key)
        if config is None:
            config = " ".join(f"{k}={v}" for k, v in cons.items() if k.startswith("BLOCK"))
        stages = f" s={kw['num_stages']}" if "num_stages" in kw else ""
        jobs.append(Job(
            family=family, module=module, kernel=name, config=f"{config} w={opts.get('num_warps')}{stages}",
            variant=variant, target=int(target), signature=sig, constexprs=cons, attrs=attrs,
            options={k: opts[k] for k in ("num_warps", "num_stages") if opts.get(k) is not None},
            expect=expect,
        ))
    return jobs


def family_jobs(fam, targets: Sequence[int]) -> List[Job]:
    """Every job of one family (:class:`mmkernels.family.Family`) for ``targets``: its
    ``launches(recorder, target)`` run once per target with the kernels of its kernel module
    recorded."""
    module = importlib.import_module(fam.kernels_module)
    jobs: List[Job] = []
    for target in targets:
        rec = LaunchRecorder(module, kernel_names(module))
        with rec.installed():
            fam.launches(rec, int(target))
        jobs += _jobs_from_launches(fam.name, fam.kernels_module, rec.entries, int(target))
    return jobs


def _families():
    from mmkernels.families import FAMILIES

    return FAMILIES


YARDSTICK_MODULE = "mmkernels._triton.yardstick"
#: The yardstick's tile: the grouped expert GEMMs' on sm_90 (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages).
YARDSTICK_TILE = (128, 256, 64, 8, 3)


def yardstick_jobs(targets: Sequence[int]) -> List[Job]:
    """The yardstick GEMM (``triton_kernels/yardstick.py``) at :data:`YARDSTICK_TILE`, bf16, aligned
    4096-sized operands, once per target: the main loop every GEMM-shaped job is compared with."""
    import torch

    module = importlib.import_module(YARDSTICK_MODULE)
    bm, bn, bk, warps, stages = YARDSTICK_TILE
    a = torch.empty((4096, 4096), dtype=torch.bfloat16, device="meta")
    kw = dict(a_ptr=a, b_ptr=a, c_ptr=a, M=4096, N=4096, K=4096, s_am=4096, s_bk=4096, s_cm=4096,
              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    jobs: List[Job] = []
    for target in targets:
        jobs += _jobs_from_launches("yardstick", YARDSTICK_MODULE,
                                    [("yardstick_gemm", module.yardstick_gemm, kw, "bf16", f"BLOCK={bm}x{bn}x{bk}",
                                      None)], int(target))
    for j in jobs:
        j.disassemble = True
    return jobs


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


_SASS_LINE_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)(.*)$")
_SASS_LABEL_RE = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH_RE = re.compile(r"`\((\.L_x_\d+)\)")
#: FLOPs of one tensor-core instruction: warpgroup MMA ``HGMMA.64x128x16`` -> 2·64·128·16; warp
#: MMA ``HMMA.16816`` (m16n8k16) -> 2·16·8·16.
_MMA_SHAPE_RE = re.compile(r"^(?:HGMMA|QGMMA|IGMMA)\.(\d+)x(\d+)x(\d+)")
_WARP_MMA = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32), "8816": (8, 8, 16)}
#: Global-memory loads by kind: plain (LDG), async copies into shared memory (LDGSTS), TMA.
_LOAD_OPCODES = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def _mma_flops(opcode: str) -> int:
    m = _MMA_SHAPE_RE.match(opcode)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    parts = opcode.split(".")
    if parts[0] in ("HMMA", "IMMA") and len(parts) > 1 and parts[1] in _WARP_MMA:
        mm, nn, kk = _WARP_MMA[parts[1]]
        return 2 * mm * nn * kk
    return 0


def parse_main_loop(sass: str) -> Optional[dict]:
    """The innermost loop of ``sass`` (``nvdisasm -c`` text) that holds tensor-core instructions —
    the smallest span from a label to a backward branch to it containing one — as
    ``{"instructions": n, "mma": m, "mma_flops": f, "loads": {opcode: count}}``: instructions in
    the loop body, tensor-core instructions among them, the MMA FLOPs they perform (from their
    shapes) and the global loads by kind and width (``LDG.E.128``, ``LDGSTS.E.BYPASS.128``,
    ``UTMALDG``...). ``mma_flops / instructions`` is the figure of merit: how much of the loop is
    the matrix work. None when no loop holds an MMA."""
    insts, labels, branches = [], {}, []
    for line in sass.splitlines():
        lab = _SASS_LABEL_RE.match(line.strip())
        if lab:
            labels[lab.group(1)] = len(insts)
            continue
        m = _SASS_LINE_RE.match(line)
        if not m:
            continue
        opcode = m.group(2)
        insts.append(opcode)
        if opcode.startswith("BRA"):
            target = _SASS_BRANCH_RE.search(m.group(3))
            if target:
                branches.append((len(insts) - 1, target.group(1)))
    loops = []
    for at, label in branches:
        start = labels.get(label)
        if start is not None and start <= at:
            body = insts[start:at + 1]
            if any(op.split(".")[0] in MMA_OPCODES for op in body):
                loops.append(body)
    if not loops:
        return None
    body = min(loops, key=len)
    mma = [op for op in body if op.split(".")[0] in MMA_OPCODES]
    loads: Dict[str, int] = {}
    for op in body:
        if op.split(".")[0] in _LOAD_OPCODES:
            loads[op] = loads.get(op, 0) + 1
    return {"instructions": len(body), "mma": len(mma), "mma_flops": sum(_mma_flops(op) for op in mma),
            "loads": loads}


def main_loop_merit(main_loop: Optional[dict]) -> Optional[float]:
    """MMA FLOPs per main-loop instruction (None without a main loop)."""
    if not main_loop or not main_loop["instructions"]:
        return None
    return main_loop["mma_flops"] / main_loop["instructions"]


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
        out["main_loop"] = parse_main_loop(sass)
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


def _source(job: Job):
    """The ``ASTSource`` of ``job``: its kernel's Python source at its signature and constexprs."""
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
    return ASTSource(fn, signature, constexprs, attrs)


def compile_job(job: Job) -> Result:
    """Compile ``job`` from its kernel's source and read its resource usage (no expectation
    checks here)."""
    return _compile(job, None)[0]


def _compile(job: Job, ttir_path: Optional[str]) -> Tuple[Result, Optional[str]]:
    """Compile ``job`` from its kernel's source, or from the TTIR file ``ttir_path`` when given;
    the result and the build's TTIR (None when the build failed)."""
    res = Result(job.family, job.kernel, job.config, job.variant, job.target,
                 int(job.options.get("num_warps", 4)), front_end="ttir" if ttir_path else "python")
    t0 = time.perf_counter()
    ttir = None
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget

        src = ttir_path if ttir_path else _source(job)
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
        res.main_loop = usage.get("main_loop")
        res.load_bits = parse_load_bits(compiled.asm.get("ptx", "") or "")
        res.compiled = True
        ttir = compiled.asm.get("ttir")
    except Exception as e:  # noqa: BLE001 - a failed compile is a result, not a crash
        res.error = _error_text(e)
    res.compile_s = round(time.perf_counter() - t0, 3)
    return res, ttir


#: TTIR that Triton's NVIDIA back end lowers differently by target (tensor descriptors become
#: pointers below sm_90): a job whose TTIR holds one is compiled from its source for every target.
_TARGET_DEPENDENT_TTIR = re.compile(r"descriptor|fp8|f8E")


def front_end_key(job: Job) -> str:
    """What Triton's front end (the kernel's Python source to TTIR, then the TTIR passes) sees of
    ``job``: jobs with equal keys differ only in their target."""
    return json.dumps([job.module, job.kernel, job.signature, job.constexprs, job.attrs, job.options],
                      sort_keys=True, default=repr)


def compile_for_targets(jobs: Sequence[Job]) -> List[Result]:
    """Compile ``jobs`` — one job for several targets (equal :func:`front_end_key`) — running
    Triton's front end once: the first from the kernel's source, the others from the TTIR it made.

    The front end and the TTIR passes are the same for every NVIDIA target (the kernel's code,
    constexprs and options decide the TTIR) except where the IR holds tensor descriptors or fp8
    types (:data:`_TARGET_DEPENDENT_TTIR`); those jobs, and any whose build from TTIR fails, are
    compiled from source. Each target's back end (TTGIR, LLVM IR, PTX, ptxas) runs in full, so
    what the tier measures is the target's own, and the same as from a build from source
    (``tests/test_compile_tier.py`` checks it on a kernel of each kind)."""
    if len({front_end_key(j) for j in jobs}) > 1:
        raise ValueError("compile_for_targets: the jobs differ in more than their target")
    first, ttir = _compile(jobs[0], None)
    out = [first]
    if len(jobs) == 1:
        return out
    shareable = ttir is not None and not _TARGET_DEPENDENT_TTIR.search(ttir)
    path = None
    try:
        if shareable:
            fd, path = tempfile.mkstemp(suffix=".ttir", prefix="mmk_front_end_")
            with os.fdopen(fd, "w") as f:
                f.write(ttir)
        for job in jobs[1:]:
            r = _compile(job, path)[0] if path else None
            if r is None or not r.compiled:  # no TTIR to start from, or the back end refused it
                r = _compile(job, None)[0]
            out.append(r)
    finally:
        if path:
            os.unlink(path)
    return out


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


@contextlib.contextmanager
def _without_interpreter():
    """Within the block, ``TRITON_INTERPRET`` is out of the environment, so that workers spawned in
    it never see it: a worker that imports triton with it set (as unpickling a job does, before
    any initializer runs) has a half-interpreted triton whose compiler fails on later imports."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


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
    for fam in _families().values():
        mod = sys.modules.get(fam.kernels_module)
        if mod is None:
            continue
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except Exception:  # noqa: BLE001
            return False
        if any(isinstance(v, InterpretedFunction) for v in vars(mod).values()):
            return True
    return False


def _select(families: Optional[Iterable[str]]) -> list:
    fams = _families()
    if families is None:
        return list(fams.values())
    names = [f for f in families]
    unknown = [f for f in names if f not in fams]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {list(fams)}")
    return [fams[f] for f in names]


def _coverage(fam, jobs: List[Job], expectations: dict) -> List[Result]:
    """Failures for kernels of the module that no job compiles, and for expectations that name
    no kernel of the module."""

    mod = importlib.import_module(fam.kernels_module)
    kernels = set(kernel_names(mod))
    compiled = {j.kernel for j in jobs}
    out = []
    for name in sorted(kernels - compiled):
        out.append(Result(fam.name, name, "-", "-", 0, 0, compiled=False,
                          error=f"kernel {fam.kernels_module}.{name} is not covered by the compile tier"))
    for name in sorted(set(expectations) - kernels):
        out.append(Result(fam.name, name, "-", "-", 0, 0, compiled=False,
                          error=f"EXPECTATIONS names {name!r}, which is no kernel of {fam.kernels_module}"))
    return out


def _progress(i: int, n: int, r: Result) -> None:
    regs = "-" if r.registers is None else r.registers
    local = "-" if r.local_memory is None else r.local_memory
    extra = "" if r.passed else (": " + (r.error.splitlines()[0] if r.error else "; ".join(r.violations)))
    print(f"[{i}/{n}] {r.status:<14} {r.label()} regs={regs} local={local} "
          f"({r.compile_s:.1f}s){extra}", file=sys.stderr, flush=True)


def compile_all(families: Optional[Iterable[str]] = None, targets: Sequence[int] = DEFAULT_TARGETS,
                jobs: int = 2, progress: bool = True,
                disassemble: Optional[bool] = None, yardstick: bool = False) -> List[Result]:
    """Compile every kernel of ``families`` (default: all) at every launch config for ``targets``
    in a pool of ``jobs`` processes; check each kernel module's ``EXPECTATIONS``.

    Returns one :class:`Result` per compile (``Result.passed`` tells), plus a failed result for a
    kernel of a module that no job compiles. Under Triton's interpreter the whole run happens in
    a subprocess without ``TRITON_INTERPRET``. ``disassemble=True``: run nvdisasm on every cubin
    (default: only where the PTX holds an MMA instruction); ``yardstick``: also compile the
    yardstick GEMM (:func:`yardstick_jobs`; family ``"yardstick"``).
    """
    fams = _select(families)
    targets = tuple(_target_key(t) for t in targets)
    if interpreter_requested():
        if os.environ.get("MMKERNELS_COMPILE_TIER_CHILD"):
            raise RuntimeError("compile tier: Triton's interpreter is still on in the subprocess "
                               "started without TRITON_INTERPRET")
        return _compile_in_subprocess([f.name for f in fams], targets, jobs, progress, disassemble, yardstick)

    all_jobs: List[Job] = []
    results: List[Result] = []
    expectations: Dict[Tuple[str, str], dict] = {}
    for fam in fams:
        fam_jobs = family_jobs(fam, targets)
        if disassemble is not None:
            for j in fam_jobs:
                j.disassemble = disassemble
        mod = importlib.import_module(fam.kernels_module)
        exp = dict(getattr(mod, "EXPECTATIONS", {}) or {})
        for k, v in exp.items():
            expectations[(fam.name, k)] = v
        results += _coverage(fam, fam_jobs, exp)
        all_jobs += fam_jobs
    if yardstick:
        all_jobs += yardstick_jobs(targets)
        for k, v in importlib.import_module(YARDSTICK_MODULE).EXPECTATIONS.items():
            expectations[("yardstick", k)] = v

    return results + run_jobs(all_jobs, expectations, jobs=jobs, progress=progress)


def _pool_starts(ctx) -> bool:
    """Whether a spawned worker can run anything at all."""
    try:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init) as pool:
            return pool.submit(os.getpid).result() > 0
    except cf.process.BrokenProcessPool:
        return False


def run_jobs(job_list: Sequence[Job], expectations: Optional[Dict[Tuple[str, str], dict]] = None,
             jobs: int = 2, progress: bool = False, share_front_end: bool = True) -> List[Result]:
    """Compile ``job_list`` in a pool of ``jobs`` fresh (spawned) processes without
    ``TRITON_INTERPRET`` and check ``expectations`` (``{(family, kernel): {...}}``); results in the
    order of the jobs. With ``share_front_end``, jobs that differ only in their target go to one
    worker together, which runs Triton's front end once for them (:func:`compile_for_targets`);
    without, every job is built from its kernel's source. A compile that kills its
    worker process (a crash in LLVM / MLIR) becomes a failed result of its own: the jobs left when
    a pool breaks are retried, one process per job once a pool breaks without finishing anything."""
    expectations = expectations or {}
    n = len(job_list)
    out: List[Optional[Result]] = [None] * n
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

    def units_left() -> List[List[int]]:
        groups: Dict[str, List[int]] = {}
        for k in range(n):
            if out[k] is None:
                groups.setdefault(front_end_key(job_list[k]) if share_front_end else str(k), []).append(k)
        return list(groups.values())

    units = units_left()
    while units:
        batch = [[k] for k in units[0][:1]] if isolate else units
        workers = 1 if isolate else max(1, min(int(jobs), len(batch)))
        isolate = max(0, isolate - 1)
        done_here = 0
        try:
            with _without_interpreter(), cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                                initializer=_worker_init) as pool:
                futures = {pool.submit(compile_for_targets, [job_list[k] for k in unit]): unit for unit in batch}
                for fut in cf.as_completed(futures):
                    for k, r in zip(futures[fut], fut.result()):
                        record(k, r)
                    done_here += 1
        except cf.process.BrokenProcessPool:
            if workers == 1 and len(batch) == 1 and finished == 0 and not _pool_starts(ctx):
                raise RuntimeError(
                    "compile tier: worker processes die at start-up (spawn start method: a script "
                    "that calls the compile tier needs an `if __name__ == '__main__':` guard)"
                ) from None
            if len(batch) == 1 and len(batch[0]) == 1:  # this one job kills its process
                k = batch[0][0]
                job = job_list[k]
                record(k, Result(job.family, job.kernel, job.config, job.variant, job.target,
                                 int(job.options.get("num_warps", 4)), compiled=False,
                                 error="the compiler process died (crash in triton / LLVM)"))
            elif done_here == 0:  # the crash is among the first units, those the workers had taken
                isolate = workers * max(len(u) for u in batch[:workers])
        units = units_left()
    return out  # type: ignore[return-value]


def _compile_in_subprocess(families: List[str], targets: Sequence[int], jobs: int,
                           progress: bool, disassemble: Optional[bool] = None,
                           yardstick: bool = False) -> List[Result]:
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
        if disassemble:
            cmd.append("--sass")
        if not yardstick:
            cmd.append("--no-yardstick")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"compile tier subprocess exited with {proc.returncode} without "
                               f"results:\n{' '.join(cmd)}\n{proc.stdout}") from None
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
            "MMA", "loop flop/inst", "status")
    lines = []
    for (kernel, target), rs in groups.items():
        rows = [(r.kernel, f"{r.variant} / {r.config}", f"sm_{r.target}" if r.target else "-",
                 cell(r.registers), cell(r.stack), cell(r.local_memory),
                 "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}", cell(r.shared),
                 cell(r.load_bits),
                 ",".join(r.mma) or "-",
                 "-" if main_loop_merit(r.main_loop) is None else f"{main_loop_merit(r.main_loop):.0f}",
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
    parser.add_argument("--family", action="append", default=None, choices=list(_families()),
                        help="op family to compile (repeatable; default: all)")
    parser.add_argument("--targets", type=_targets_arg, default=DEFAULT_TARGETS,
                        help="compute capabilities, comma-separated (default: 80,90)")
    parser.add_argument("--jobs", "-j", type=int, default=2,
                        help="compile processes (default: 2)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write every result to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--sass", action="store_true",
                        help="disassemble every cubin (default: only where the PTX has MMA)")
    parser.add_argument("--no-yardstick", action="store_true",
                        help="leave out the yardstick GEMM (compiled by default: the main-loop figure's reference)")
    parser.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    results = compile_all(families=args.family, targets=args.targets, jobs=args.jobs,
                          progress=not args.quiet, yardstick=not getattr(args, "no_yardstick", False),
                          disassemble=True if getattr(args, "sass", False) else None)
    wall = time.perf_counter() - t0
    code, failed = summary(results)
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "targets": list(args.targets),
                       "families": args.family or list(_families()), "wall_s": round(wall, 2),
                       "passed": code == 0,
                       "results": [r.to_dict() for r in results]}, f, indent=1)
    if not getattr(args, "no_table", False):
        print(format_table(results))
        print(f"{len(results)} compiles for {', '.join(f'sm_{t}' for t in args.targets)} in "
              f"{wall:.1f}s: {len(results) - len(failed)} ok, {len(failed)} failed")
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
