"""What an op family declares: the one interface between a family and the generic machinery.

An *op family* is one kernel module ``triton_kernels/<name>.py`` (installed as
``mmkernels._triton.<name>``), one op module ``mmkernels/ops/<name>.py`` (launchers, custom ops,
autograd, public functionals), its float64 references in :mod:`mmkernels.reference`, optionally C++
kernels in ``csrc/<name>.cpp``, and one declaration, ``mmkernels/families/<name>.py``, holding a
:class:`Family`: its test and bench cases, how to build their inputs, its bench spec (what the
main job and the GPU suite time and check), its acceptance targets and the launches the compile
tier compiles. Everything generic — the case registry (:mod:`mmkernels.testing.registry`), the main
job (:mod:`mmkernels.bench`), the GPU suite (``bench/gpu_suite.py``), the compile tier
(:mod:`mmkernels.testing.compile_tier`), the C++ loader (:mod:`mmkernels._cpp`) and the CLI — reads
the declarations through :data:`mmkernels.families.FAMILIES` and names no family itself.

This module holds the types a declaration is made of and the helpers for writing one:

* cases: :class:`Case`, :func:`randn`, :func:`laid_out` (and :data:`LAYOUTS`);
* bench specs: :class:`Variant` (one measurable function of one case), :class:`CheckSample`,
  :class:`Target`, :func:`compiled`, :func:`nbytes`, :func:`with_grads`;
* compile-tier launches: :class:`LaunchRecorder` (what ``Family.launches`` is given);
* :class:`Family` itself.

It imports nothing from the package but torch, so every part can import it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import (Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Protocol, Sequence,
                    Tuple, Union)

import torch

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One test / bench case of a family: an op of the family, a logical shape, the op's
    parameters and how each input is laid out in memory. Tags say who uses it: ``interp`` (small
    enough for Triton's interpreter), ``edge`` (boundary shapes and layouts), ``bench`` (the main
    job on CPU), ``gpu`` (the GPU suite), ``dry-run`` (the GPU suite's check on CPU)."""

    family: str
    op: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    tags: FrozenSet[str]
    params: Mapping[str, object] = dataclasses.field(default_factory=dict, compare=False)
    layouts: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        shape = "x".join(map(str, self.shape)) or "scalar"
        extra = "-".join(f"{k}{v}" for k, v in self.params.items())
        lay = "-".join(f"{k}_{v}" for k, v in self.layouts.items() if v != "contiguous")
        return "-".join(p for p in (self.op, shape, extra, dt, lay) if p)


#: Layouts an input can take. ``transposed``: stored with its dims reversed; ``sliced``: every other
#: element of a twice-larger last dim; ``expanded``: size-1 storage broadcast (zero stride) along the
#: first dim that is not ``keep_dim`` (for a softmax gradient: not the reduced dim, where a constant
#: gradient would make dx vanish).
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def laid_out(values: torch.Tensor, layout: str, keep_dim: Optional[int] = None) -> torch.Tensor:
    """A tensor equal to ``values`` whose memory layout is ``layout`` (see :data:`LAYOUTS`)."""
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":
        dims = tuple(range(values.dim() - 1, -1, -1))
        return values.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        if values.dim() == 0:
            return values.clone()
        big = torch.empty(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "expanded":
        dims = [d for d in range(values.dim()) if d != (keep_dim % values.dim() if keep_dim is not None else None)]
        if not dims:
            return values.clone()
        return values.narrow(dims[0], 0, 1).clone().expand(values.shape)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def randn(shape, dtype: torch.dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal draws times ``scale`` from ``gen`` (float64 on a CPU generator, so that every device
    gets the same values; float32 on a device generator), stored as ``dtype`` on ``device``."""
    draw = torch.float64 if gen.device.type == "cpu" else torch.float32
    t = torch.randn(shape, generator=gen, dtype=draw, device=gen.device).mul_(scale)
    return t.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Bench specs
# ----------------------------------------------------------------------------------------------

#: A variant's (or a case's) input tensors, by name.
Inputs = Dict[str, torch.Tensor]
#: What ours, a baseline or a reference returns: one tensor, or one per name of ``Variant.outputs``.
Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclasses.dataclass
class CheckSample:
    """Some of a variant's outputs, recomputed by the float64 reference from part of the inputs.

    ``inputs``: what the reference runs on (the check makes float64 CPU copies), e.g. a sample of
    rows; ``parts``: the names of the outputs this sample checks; ``take(name, tensor)``: the same
    elements of that output of ours (and of the baseline); ``reference``: returns ``parts`` in
    order (None: the variant's ``reference``, which returns every output).
    """

    inputs: Inputs
    parts: Tuple[str, ...]
    take: Callable[[str, torch.Tensor], torch.Tensor]
    reference: Optional[Callable[[Inputs], Outputs]] = None


@dataclasses.dataclass
class Variant:
    """One measurable function of one case (e.g. the softmax backward of an 8192 x 4096 case).

    All callables take this variant's inputs (from :attr:`prepare`): ``ours`` runs the package,
    each of ``baselines`` a PyTorch baseline (the first, ``"eager"``, is what ratios refer to),
    ``reference`` the float64 reference of :mod:`mmkernels.reference` (on float64 copies of the
    inputs). Each returns one tensor, or a tuple with one tensor per name of ``outputs`` (checked
    one by one, each on its own scale).

    ``check_samples(inputs, max_elems, generator)`` -> the :class:`CheckSample` list that the
    check compares; None: one sample of whole rows of the (single) output and of every input along
    the same dim, keeping ``reduced_dims`` whole (right when each output row depends on the same
    row of every input only, as in softmax). ``flops``: the useful FLOPs of one call for a matmul
    family (rows then show TFLOP/s and the fraction of the measured mm rate). ``unchecked``: outputs
    no sample compares with the reference, each with the reason (the check still requires them
    finite where the baseline's are, and reports the reason) — for sizes whose float64 reference
    cannot run on the CPU in reasonable time; the same code is then checked in full on smaller cases.
    """

    case: Case
    direction: str  # "fwd" | "bwd" | "fwd+bwd"
    ours: Callable[[Inputs], Outputs]
    baselines: Dict[str, Callable[[Inputs], Outputs]]
    reference: Callable[[Inputs], Outputs]
    prepare: Callable[[Inputs], Inputs]  # case inputs (make_inputs) -> this variant's inputs
    bytes_moved: int  # minimum traffic of one call
    passes: Optional[int]  # minimum tensor passes (bytes_moved in units of one tensor); None: not one size
    reduced_dims: Tuple[int, ...]  # dims a row sample for the reference must keep whole
    outputs: Tuple[str, ...] = ("out",)  # names of the returned tensors
    flops: Optional[int] = None
    check_samples: Optional[Callable[[Inputs, int, torch.Generator], List[CheckSample]]] = None
    shape_text: Optional[str] = None  # the shape as tables show it (default: the case's shape)
    unchecked: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.case.op} {self.direction}"

    @property
    def key(self) -> str:
        return f"{self.case.id}:{self.direction}"

    def named(self, result: Outputs, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """``result`` (one tensor or a sequence) by name: ``names`` or :attr:`outputs`."""
        names = tuple(names or self.outputs)
        parts = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        if len(parts) != len(names):
            raise ValueError(f"{self.label}: expected {len(names)} outputs {names}, got {len(parts)}")
        return dict(zip(names, parts))


@dataclasses.dataclass(frozen=True)
class Target:
    """An acceptance target: ``metric`` (a key of a result row) must be >= ``threshold`` (``<=``
    with ``at_most``) on every result row ``applies`` selects."""

    name: str
    metric: str
    threshold: float
    applies: Callable[[Mapping[str, Any]], bool]
    at_most: bool = False

    def met(self, value: Optional[float]) -> bool:
        if value is None:
            return False
        return value <= self.threshold if self.at_most else value >= self.threshold


def rows_of(family: str, direction: Optional[str] = None, op=None, shape=None, dtype=None,
            **params) -> Callable[[Mapping[str, Any]], bool]:
    """A :attr:`Target.applies` selecting the result rows of ``family`` with the given direction,
    op (a name or a tuple of names), shape, dtype name (``"bfloat16"``) and case parameters."""
    ops = (op,) if isinstance(op, str) else op

    def applies(r: Mapping[str, Any]) -> bool:
        p = r.get("params") or {}
        return (r.get("family") == family and (direction is None or r.get("direction") == direction)
                and (ops is None or r.get("op") in ops)
                and (shape is None or list(r.get("shape", ())) == list(shape))
                and (dtype is None or r.get("dtype") == dtype)
                and all(p.get(k) == v for k, v in params.items()))
    return applies


def sample_index(shape: Sequence[int], keep: Sequence[int], max_elems: int,
                 gen: torch.Generator) -> Tuple[Optional[int], Optional[torch.Tensor]]:
    """A dim of ``shape`` to subsample and the indices to keep (the first, the last and random
    ones) so that the sample holds about ``max_elems`` elements (at least two slices; the dims in
    ``keep`` stay whole); ``(None, None)`` when everything fits. What a :class:`CheckSample` is
    usually made of."""
    numel = math.prod(shape)
    if numel <= max_elems:
        return None, None
    free = [d for d in range(len(shape)) if d not in keep and shape[d] > 1]
    if not free:
        return None, None
    d = max(free, key=lambda i: shape[i])
    per = numel // shape[d]
    k = max(2, min(shape[d], max_elems // max(per, 1)))
    middle = torch.randperm(shape[d] - 2, generator=gen)[: k - 2] + 1 if shape[d] > 2 else torch.empty(0, dtype=torch.long)
    idx = torch.cat([torch.tensor([0, shape[d] - 1]), middle]).unique().sort().values
    return d, idx


def nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` stored as ``dtype``."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def compiled(fn: Callable[..., torch.Tensor], names: Sequence[str]) -> Callable[[Inputs], torch.Tensor]:
    """``torch.compile(fn, dynamic=False)`` of a baseline ``fn(*tensors)``, called with a variant's
    inputs by ``names``: the ``compile`` baseline of ``--compile-baseline``.

    Compilation happens at the first call (the timing warm-up). Dynamo's caches are reset first, so
    the per-code-object recompile limit never silently sends a later case back to eager."""
    state: Dict[str, Any] = {}

    def call(inputs: Inputs) -> torch.Tensor:
        if "fn" not in state:
            torch._dynamo.reset()
            state["fn"] = torch.compile(fn, dynamic=False)
        return state["fn"](*(inputs[n] for n in names))

    return call


def with_grads(fn: Callable[[Inputs], torch.Tensor], wrt: Sequence[str],
               upstream: Optional[str]) -> Callable[[Inputs], Outputs]:
    """forward + backward of ``fn``: (its output, d output / d each of ``wrt``), the incoming
    gradient from input ``upstream`` (None: a scalar loss). The inputs ``wrt`` become fresh
    leaves at each call."""
    def call(i: Inputs) -> Outputs:
        leaves = {n: i[n].detach().requires_grad_() for n in wrt}
        out = fn({**i, **leaves})
        grads = torch.autograd.grad(out, [leaves[n] for n in wrt], None if upstream is None else i[upstream])
        return (out.detach(),) + tuple(grads)
    return call


def fwd_bwd_variant(case: Case, *, ours: Callable[[Inputs], torch.Tensor], eager: Callable[[Inputs], torch.Tensor],
                    reference: Callable[[Inputs], torch.Tensor], wrt: Sequence[str], upstream: Optional[str],
                    names: Sequence[str], outputs: Sequence[str], bytes_moved: int, flops: Optional[int] = None,
                    compile_baseline: bool = False) -> Variant:
    """The forward + backward of a module-like op as one variant, checked on whole outputs: ``ours``,
    ``eager`` and ``reference`` map the inputs ``names`` to the forward's output; each is
    differentiated (:func:`with_grads`) w.r.t. ``wrt`` for the incoming gradient ``upstream`` (None:
    a scalar loss); ``outputs`` names the output and then each gradient."""
    names = tuple(names)
    eager_fb = with_grads(eager, wrt, upstream)
    baselines = {"eager": eager_fb}
    if compile_baseline:
        baselines["compile"] = compiled(lambda *ts: eager_fb(dict(zip(names, ts)))[0], names)
    outputs = tuple(outputs)
    return Variant(case=case, direction="fwd+bwd", ours=with_grads(ours, wrt, upstream), baselines=baselines,
                   reference=with_grads(reference, wrt, upstream), prepare=lambda raw: {n: raw[n] for n in names},
                   bytes_moved=bytes_moved, passes=None, reduced_dims=(), outputs=outputs, flops=flops,
                   check_samples=lambda inputs, max_elems, gen: [CheckSample(inputs, outputs, lambda n, t: t)],
                   shape_text="x".join(map(str, case.shape)))


# ----------------------------------------------------------------------------------------------
# Compile-tier launches
# ----------------------------------------------------------------------------------------------


class LaunchRecorder(Protocol):
    """What :attr:`Family.launches` is given: while it runs, every kernel of the family's kernel
    module is replaced by a recorder, so the family's own launchers, called on ``meta`` tensors,
    show the compile tier exactly what they would launch (no GPU, nothing runs).

    ``with recorder.variant("bf16 qwen3", config=None, expect=None): launcher(...)`` labels the
    launches made inside the block: ``variant`` names the specialisation (dtypes, layout, options),
    ``config`` the tile (None: the ``BLOCK_*`` constexprs of each launch), ``expect`` overrides the
    kernel module's ``EXPECTATIONS`` for these launches (a dict, or a function of the kernel name
    and launch arguments returning one or None; a key set to None drops it)."""

    def variant(self, label: str, config: Optional[str] = None,
                expect: Union[None, dict, Callable[[str, dict], Optional[dict]]] = None
                ) -> contextlib.AbstractContextManager: ...


@dataclasses.dataclass(frozen=True)
class Probe:
    """One config-exploration probe (:mod:`mmkernels.bench.explore`): ``setup(device)`` makes its
    data and returns ``(call, bytes)``: ``call(config)`` runs the family's launcher at ``config``
    (None: the resolver's choice) and returns its output; ``bytes`` is one call's minimum traffic.
    ``configs`` are tried next to the resolver's, each checked against its output; ``label``
    names a config in the table."""

    id: str
    configs: Tuple[Any, ...]
    setup: Callable[[torch.device], Tuple[Callable[[Any], torch.Tensor], int]]
    dtype: torch.dtype
    why: str = ""
    label: Callable[[Any], str] = str


# ----------------------------------------------------------------------------------------------
# The declaration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """One op family, declared once (``mmkernels/families/<name>.py``, as ``FAMILY``).

    ``name`` is the family's one name everywhere: ``triton_kernels/<name>.py``,
    ``mmkernels/ops/<name>.py``, ``csrc/<name>.cpp``, ``--family <name>``, the ``family`` of its
    cases and result rows.

    ``cases()`` yields its :class:`Case` s (each with ``family == name``); ``inputs(case, device,
    generator)`` builds fresh random inputs for one. ``variants(case, compile_baseline)`` is its
    bench spec (the :class:`Variant` s of a case: forward, backward, ...); ``targets()`` its
    acceptance targets on the result rows. ``launches(recorder, target)`` calls the family's
    launchers on meta tensors for compute capability ``target`` (80, 90) at every config they can
    launch with (see :class:`LaunchRecorder`). ``cpp_ops``: the ``torch.ops.mmkernels_cpu``
    operators of its C++ CPU path (empty: the CPU path is torch). ``probes``: config-exploration
    probes for the GPU suite (see :mod:`mmkernels.bench.explore`), ``dry_run_probes`` their
    interpreter-sized twins.
    """

    name: str
    summary: str
    cases: Callable[[], Iterable[Case]]
    inputs: Callable[[Case, torch.device, torch.Generator], Inputs]
    variants: Callable[[Case, bool], List[Variant]]
    launches: Callable[[LaunchRecorder, int], None]
    targets: Callable[[], List[Target]] = lambda: []
    cpp_ops: Tuple[str, ...] = ()
    probes: Tuple[Any, ...] = ()
    dry_run_probes: Tuple[Any, ...] = ()

    @property
    def ops_module(self) -> str:
        return f"mmkernels.ops.{self.name}"

    @property
    def kernels_module(self) -> str:
        return f"mmkernels._triton.{self.name}"


def case_builder(family: str) -> Callable[..., Case]:
    """``add(op, shape, dtype, tags, layouts=None, **params)`` -> a :class:`Case` of ``family``
    (what a declaration's ``cases()`` uses to list its cases)."""
    def add(op: str, shape, dtype: torch.dtype, tags: Iterable[str], layouts: Optional[Mapping[str, str]] = None,
            **params) -> Case:
        return Case(family, op, tuple(shape), dtype, frozenset(tags), params, dict(layouts or {}))
    return add
