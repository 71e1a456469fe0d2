"""Bench specs: what to run for one registry case. The only family-specific module of the package.

A :class:`Variant` is one measurable function of one case (ours, the PyTorch baselines, the float64
reference, the minimum bytes); a :class:`Target` an acceptance target on the result rows.

Adding an op family (its cases and input builder already in :mod:`mmkernels.testing`, tagged
``bench`` for CPU and ``gpu`` for CUDA):

1. write a spec class like :class:`SoftmaxBench`: ``family`` (the registry family name),
   ``variants(case, refs, compile_baseline)`` -> the case's :class:`Variant` list (``baselines``
   holds ``"eager"`` first; :func:`compiled` wraps a baseline for ``--compile-baseline``) and
   ``targets()`` -> its :class:`Target` list (may be empty);
2. give :class:`TorchReferences` the family's float64 references under the names
   ``tests/reference.py`` uses (the GPU suite runs against that file, this class is the fallback);
3. add the class to :data:`FAMILIES`.

Nothing else in :mod:`mmkernels.bench` names a family.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from mmkernels.testing import Case

from .inputs import Inputs


# ----------------------------------------------------------------------------------------------
# What a spec returns, and helpers for writing one
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One measurable function of one registry case (e.g. the softmax backward of a 8192x4096 case).

    All callables take this variant's inputs (from :meth:`prepare`): ``ours`` runs the package,
    each of ``baselines`` a PyTorch baseline (the first, ``"eager"``, is what ratios refer to),
    ``reference`` the float64 reference (on float64 copies of the inputs).
    """

    case: Case
    direction: str  # "fwd" | "bwd"
    ours: Callable[[Inputs], torch.Tensor]
    baselines: Dict[str, Callable[[Inputs], torch.Tensor]]
    reference: Callable[[Inputs], torch.Tensor]
    prepare: Callable[[Inputs], Inputs]  # registry inputs (make_inputs) -> this variant's inputs
    bytes_moved: int  # minimum traffic of one call
    passes: int  # minimum tensor passes (bytes_moved in units of one tensor)
    reduced_dims: Tuple[int, ...]  # dims a row sample for the reference must keep whole

    @property
    def label(self) -> str:
        return f"{self.case.op} {self.direction}"

    @property
    def key(self) -> str:
        return f"{self.case.id}:{self.direction}"


@dataclasses.dataclass(frozen=True)
class Target:
    """An acceptance target: ``metric`` (a key of a result row) must be >= ``threshold`` on every
    result row ``applies`` selects."""

    name: str
    metric: str
    threshold: float
    applies: Callable[[Mapping[str, Any]], bool]


def _unpack(fn: Callable[[Inputs], torch.Tensor], names: Sequence[str]) -> Callable[..., torch.Tensor]:
    """``fn(dict)`` as a function of positional tensors (what torch.compile traces best)."""
    return lambda *ts: fn(dict(zip(names, ts)))


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def compiled(fn: Callable[..., torch.Tensor], names: Sequence[str]) -> Callable[[Inputs], torch.Tensor]:
    """``torch.compile(fn, dynamic=False)`` of a baseline, called with this variant's inputs.

    Compilation happens at the first call (the timing warm-up). Dynamo's caches are reset first, so
    the per-code-object recompile limit never silently sends a later case back to eager."""
    state: Dict[str, Any] = {}

    def call(inputs: Inputs) -> torch.Tensor:
        if "fn" not in state:
            torch._dynamo.reset()
            state["fn"] = torch.compile(fn, dynamic=False)
        return state["fn"](*(inputs[n] for n in names))

    return call


# ----------------------------------------------------------------------------------------------
# Float64 references (the fallback of tests/reference.py) and the softmax family
# ----------------------------------------------------------------------------------------------


class TorchReferences:
    """Float64 references computed by the torch baseline ops themselves (the installed package
    cannot import ``tests/reference.py``). Same interface as ``tests/reference.py``:
    float64 in, float64 out."""

    name = "torch float64 (the baseline computed in float64)"

    @staticmethod
    def softmax_ref(x, dim):
        return torch.softmax(x.double(), dim)

    @staticmethod
    def log_softmax_ref(x, dim):
        return torch.log_softmax(x.double(), dim)

    @staticmethod
    def softmin_ref(x, dim):
        return torch.nn.functional.softmin(x.double(), dim)

    @staticmethod
    def softmax_backward_ref(y, dy, dim, kind):
        y, dy = y.double(), dy.double()
        if kind == "log_softmax":
            return torch._log_softmax_backward_data(dy, y, dim, torch.float64)
        dx = torch._softmax_backward_data(dy, y, dim, torch.float64)
        return dx.neg() if kind == "softmin" else dx


class SoftmaxBench:
    """Bench spec of the softmax family: forward of softmax / log_softmax / softmin and the fused
    backward (``mmkernels.softmax_backward``), against torch eager (``torch.softmax``,
    ``torch.log_softmax``, ``F.softmin``; ``torch._softmax_backward_data`` /
    ``torch._log_softmax_backward_data``, softmin: that and a negation, as eager autograd runs it).

    Minimum traffic: forward 2 tensor passes (read x, write y), backward 3 (read y and dy, write dx).
    """

    family = "softmax"

    @staticmethod
    def _fns(op: str):
        import mmkernels

        F = torch.nn.functional
        if op == "softmax":
            return mmkernels.softmax, torch.softmax, "softmax_ref"
        if op == "log_softmax":
            return mmkernels.log_softmax, torch.log_softmax, "log_softmax_ref"
        if op == "softmin":
            return mmkernels.softmin, F.softmin, "softmin_ref"
        raise KeyError(f"softmax family has no op {op!r}")

    @staticmethod
    def _eager_backward(op: str, dim: int):
        if op == "log_softmax":
            return lambda i: torch._log_softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)
        if op == "softmin":
            return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype).neg()
        return lambda i: torch._softmax_backward_data(i["dy"], i["y"], dim, i["y"].dtype)

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        import mmkernels

        dim = int(case.params.get("dim", -1))
        ndim = max(len(case.shape), 1)
        reduced = (dim % ndim,)
        ours_fwd, eager_fwd, ref_name = cls._fns(case.op)
        ref_fwd = getattr(refs, ref_name)
        tensor = _nbytes(case.shape, case.dtype)

        fwd_base = {"eager": lambda i: eager_fwd(i["x"], dim)}
        fwd = Variant(
            case=case, direction="fwd",
            ours=lambda i: ours_fwd(i["x"], dim),
            baselines=fwd_base,
            reference=lambda i: ref_fwd(i["x"], dim),
            prepare=lambda raw: {"x": raw["x"]},
            bytes_moved=2 * tensor, passes=2, reduced_dims=reduced,
        )

        def prepare_bwd(raw: Inputs) -> Inputs:
            with torch.no_grad():
                y = eager_fwd(raw["x"], dim)
            return {"y": y, "dy": raw["dy"]}

        bwd_base = {"eager": cls._eager_backward(case.op, dim)}
        bwd = Variant(
            case=case, direction="bwd",
            ours=lambda i: mmkernels.softmax_backward(i["dy"], i["y"], dim, kind=case.op),
            baselines=bwd_base,
            reference=lambda i: refs.softmax_backward_ref(i["y"], i["dy"], dim, case.op),
            prepare=prepare_bwd,
            bytes_moved=3 * tensor, passes=3, reduced_dims=reduced,
        )
        if compile_baseline:
            fwd_base["compile"] = compiled(lambda x: eager_fwd(x, dim), ("x",))
            bwd_base["compile"] = compiled(_unpack(bwd_base["eager"], ("y", "dy")), ("y", "dy"))
        return [fwd, bwd]

    @staticmethod
    def targets() -> List[Target]:
        """Acceptance targets of the family (GPU, rows M = 8192 of fp32 and bf16, dim -1).

        ratio = torch eager time / ours; frac_copy = (bytes / time) / measured copy bandwidth.
        """

        def rows(direction: str, lo: int, hi: int = 1 << 62):
            def applies(r: Mapping[str, Any]) -> bool:
                return (r.get("family") == "softmax" and r.get("op") == "softmax"
                        and r.get("direction") == direction and len(r.get("shape", ())) == 2
                        and r["shape"][0] == 8192 and r.get("dim") in (-1, 1)
                        and r.get("dtype") in ("float32", "bfloat16") and lo <= r["shape"][1] <= hi)
            return applies

        return [
            Target("softmax fwd >= 85% of copy bandwidth (M=8192, N>=4096)", "frac_copy", 0.85,
                   rows("fwd", 4096)),
            Target("softmax fwd never slower than torch.softmax (M=8192, 128<=N<=262144)", "ratio", 1.0,
                   rows("fwd", 128, 262144)),
            Target("softmax bwd >= 80% of copy bandwidth (M=8192, N>=1024)", "frac_copy", 0.80,
                   rows("bwd", 1024)),
            Target("softmax bwd >= 1.6x torch eager backward (M=8192, N>=1024)", "ratio", 1.6,
                   rows("bwd", 1024)),
        ]


# ----------------------------------------------------------------------------------------------
# Every family
# ----------------------------------------------------------------------------------------------


#: Bench spec of each op family, by registry family name.
FAMILIES: Dict[str, Any] = {"softmax": SoftmaxBench}


def variants_for(case: Case, refs=None, compile_baseline: bool = False) -> List[Variant]:
    """The variants (e.g. forward and backward) of a registry case, with ``refs`` as the float64
    references (default :class:`TorchReferences`)."""
    spec = FAMILIES[case.family]
    return spec.variants(case, refs or TorchReferences, compile_baseline=compile_baseline)


def all_targets() -> List[Target]:
    return [t for spec in FAMILIES.values() for t in spec.targets()]
