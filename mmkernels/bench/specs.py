"""Bench specs: what to run for one registry case. The only family-specific module of the package.

A :class:`Variant` is one measurable function of one case (ours, the PyTorch baselines, the float64
reference, the minimum bytes, the useful FLOPs of a matmul family); a :class:`Target` an acceptance
target on the result rows.

Adding an op family (its cases and input builder already in :mod:`mmkernels.testing`, tagged
``bench`` for CPU and ``gpu`` for CUDA):

1. write a spec class like :class:`SoftmaxBench`: ``family`` (the registry family name),
   ``variants(case, refs, compile_baseline)`` -> the case's :class:`Variant` list (``baselines``
   holds ``"eager"`` first; :func:`compiled` wraps a baseline for ``--compile-baseline``) and
   ``targets()`` -> its :class:`Target` list (may be empty). A variant that returns several
   tensors (e.g. an output and its gradients) names them in ``outputs``: each is checked on its own
   scale. A matmul family sets ``flops`` (rows then show TFLOP/s and ``frac_mm``) and, when a row
   sample of the inputs is no sample of its outputs (a reduction over rows, such as a weight
   gradient), its own ``check_samples`` (:class:`CheckSample`; see :class:`BilinearBench`);
2. give :class:`TorchReferences` the family's float64 references under the names
   ``tests/reference.py`` uses (the GPU suite runs against that file, this class is the fallback);
3. add the class to :data:`FAMILIES`.

Nothing else in :mod:`mmkernels.bench` names a family.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from mmkernels.testing import Case

from .inputs import Inputs


# ----------------------------------------------------------------------------------------------
# What a spec returns, and helpers for writing one
# ----------------------------------------------------------------------------------------------


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
    """One measurable function of one registry case (e.g. the softmax backward of a 8192x4096 case).

    All callables take this variant's inputs (from :meth:`prepare`): ``ours`` runs the package,
    each of ``baselines`` a PyTorch baseline (the first, ``"eager"``, is what ratios refer to),
    ``reference`` the float64 reference (on float64 copies of the inputs). Each returns one tensor,
    or a tuple with one tensor per name of ``outputs`` (checked one by one, each on its own scale).

    ``check_samples(inputs, max_elems, generator)`` -> the :class:`CheckSample` list that the
    check compares; None: one sample of whole rows of the (single) output and of every input along
    the same dim, keeping ``reduced_dims`` whole (right when each output row depends on the same
    row of every input only, as in softmax).
    """

    case: Case
    direction: str  # "fwd" | "bwd" | "fwd+bwd"
    ours: Callable[[Inputs], Outputs]
    baselines: Dict[str, Callable[[Inputs], Outputs]]
    reference: Callable[[Inputs], Outputs]
    prepare: Callable[[Inputs], Inputs]  # registry inputs (make_inputs) -> this variant's inputs
    bytes_moved: int  # minimum traffic of one call
    passes: Optional[int]  # minimum tensor passes (bytes_moved in units of one tensor); None: not one size
    reduced_dims: Tuple[int, ...]  # dims a row sample for the reference must keep whole
    outputs: Tuple[str, ...] = ("out",)  # names of the returned tensors
    flops: Optional[int] = None  # useful FLOPs of one call (matmul families): TFLOP/s and frac_mm
    check_samples: Optional[Callable[[Inputs, int, torch.Generator], List[CheckSample]]] = None
    shape_text: Optional[str] = None  # the shape as tables show it (default: the case's shape)

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
    def cross_entropy_ref(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        return torch.nn.functional.cross_entropy(logits.double(), target.long(), ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)

    @staticmethod
    def attention_module_ref(z, x, mask=None, temperature=1.0):
        return torch.einsum("rj,rjd->rd", torch.softmax(z.double() / temperature, dim=-1), x.double())

    @staticmethod
    def gated_fusion_ref(a, b, weight, bias=None):
        a, b = a.double(), b.double()
        g = torch.sigmoid(torch.nn.functional.linear(torch.cat([a, b], dim=-1), weight.double(),
                                                     None if bias is None else bias.double()))
        return g * a + (1 - g) * b

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

    @staticmethod
    def bilinear_ref(z, x, w, bias=None):
        f64 = [t.detach().double() for t in (z, x, w)]
        return torch.nn.functional.bilinear(*f64, None if bias is None else bias.detach().double())

    @staticmethod
    def bilinear_grads_ref(z, x, w, dy):
        """(dz, dx, dw, db) by autograd through the float64 ``F.bilinear``."""
        z, x, w = (t.detach().double().requires_grad_() for t in (z, x, w))
        dy = dy.detach().double()
        y = torch.nn.functional.bilinear(z, x, w)
        dz, dx, dw = torch.autograd.grad(y, (z, x, w), dy)
        return dz, dx, dw, dy.reshape(-1, dy.shape[-1]).sum(0)


    @staticmethod
    def route_ref(logits, top_k, *, scoring="softmax", renormalize=True, selection_bias=None, n_groups=None,
                  topk_groups=None, routed_scaling=1.0, softmax_after_topk=False, capacity_factor=None,
                  expert_ids=None, block_m=64):
        """``moe.route`` in float64 torch ops (vectorised; the tests' own reference loops over
        tokens): a dict of :class:`mmkernels.moe.Routing`'s tensor fields but the tile table."""
        l = logits.double()
        T, E = l.shape
        scores = torch.sigmoid(l) if scoring == "sigmoid" else torch.softmax(l, -1)

        def best_first(key, allowed=None):  # descending, NaN after -inf, ties to the lower index
            nan = torch.isnan(key)
            order = torch.sort(torch.where(nan, float("-inf"), key), dim=-1, descending=True, stable=True).indices
            for flag in ([nan] if allowed is None else [nan, ~allowed]):  # disallowed after all allowed
                order = order.gather(-1, torch.sort(flag.gather(-1, order).byte(), dim=-1, stable=True).indices)
            return order

        if expert_ids is not None:
            ids = expert_ids.long()
        elif selection_bias is None and n_groups is None:
            ids = best_first(l)[:, :top_k]
        else:
            key = scores + (0 if selection_bias is None else selection_bias.double())
            allowed = None
            if n_groups is not None and n_groups > 1:
                clean = torch.where(torch.isnan(key), float("-inf"), key)
                gs = clean.view(T, n_groups, E // n_groups).topk(2, -1).values.sum(-1)
                kept = best_first(gs)[:, :topk_groups]
                allowed = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, kept, True)
                allowed = allowed.repeat_interleave(E // n_groups, 1)
            ids = best_first(key, allowed)[:, :top_k]
        chosen = scores.gather(1, ids)
        if scoring == "softmax" and (renormalize or softmax_after_topk):
            w = chosen / chosen.sum(-1, keepdim=True)
        elif scoring == "sigmoid" and renormalize:
            w = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
        else:
            w = chosen
        w = w * routed_scaling
        flat = ids.reshape(-1)
        n = flat.numel()
        cap = n if capacity_factor is None else math.ceil(capacity_factor * T * top_k / E)
        order = torch.sort(flat, stable=True).indices
        total = torch.bincount(flat, minlength=E)
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(n) - (torch.cumsum(total, 0) - total)[flat[order]]
        dropped = rank >= cap
        key2 = dropped.long() * E + flat
        sorted_slots = torch.sort(key2, stable=True).indices
        counts = torch.clamp(total, max=cap)
        i32 = torch.int32
        slot_rows = torch.empty_like(sorted_slots)
        slot_rows[sorted_slots] = torch.arange(n)
        return {"weights": w, "expert_ids": ids.to(i32), "counts": counts.to(i32),
                "offsets": torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(i32),
                "sorted_slots": sorted_slots.to(i32), "slot_rows": slot_rows.to(i32),
                "dropped": dropped.view(T, top_k)}


    @staticmethod
    def experts_ref(x, weights, expert_ids, dropped, gate_up, down, b1=None, b2=None, activation="silu",
                    interleaved=False, alpha=1.702, limit=7.0):
        """SwiGLU experts in float64 by plain matrix products per expert (differentiable w.r.t. x);
        the tests' own reference loops over tokens."""
        if activation != "silu" or interleaved or b1 is not None or b2 is not None:
            raise NotImplementedError("the bench's fallback experts reference covers SwiGLU without biases only")
        x = x.double()
        gate_up, down, weights = gate_up.double(), down.double(), weights.double()
        T, H = x.shape
        I = gate_up.shape[1] // 2
        out = torch.zeros(T, H, dtype=torch.float64)
        ids = expert_ids.long()
        for e in ids.unique().tolist():
            t, j = ((ids == e) & ~dropped.bool()).nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            h = x[t] @ gate_up[e].t()
            y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ down[e].t()
            out = out.index_add(0, t, weights[t, j][:, None] * y)
        return out


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
# The sigma-pi / bilinear family
# ----------------------------------------------------------------------------------------------


class BilinearBench:
    """Bench spec of the sigma-pi / bilinear family (``mmkernels.bilinear``, F.bilinear semantics:
    z (*, b), x (*, c), w (d, b, c), bias (d,) -> y (*, d)).

    Variants: ``fwd`` (y) and ``fwd+bwd`` (the forward, then all four gradients (dz, dx, dw, db)
    by ``torch.autograd.grad``: the timed call runs both; outputs y, dz, dx, dw, db, each checked
    on its own scale). Baselines: ``eager`` = ``F.bilinear`` (ratios refer to it), ``einsum`` =
    ``torch.einsum("...h,...i,jhi->...j")`` (+ bias), ``gemm`` = plain ``torch.mm`` of the same
    FLOPs on the ``(N, b·c)`` outer product and the ``(d, b·c)`` weight (fwd: ``A @ W^T``; fwd+bwd
    also ``dy @ W`` and ``dy^T @ A``, the backward of a linear layer on A): its operands are built
    at the first call of each buffer set (the timing's warm-up), outside the timed calls.

    Useful FLOPs (DESIGN.md): forward ``2·N·b·c·d``, backward twice that, fwd+bwd 3x the forward;
    rows show TFLOP/s and ``frac_mm`` (over the mm rate measured in the same run: bf16 on CUDA).
    Bytes: each input read once, each output written once (fwd+bwd: z, x, w, bias, dy read;
    y, dz, dx, dw, db written).

    The float64 reference materialises 3-D products, so the check bounds its largest intermediate
    by ``max_elems``: y, dz, dx on a sample of whole rows (``k·max(b·c, d·c, d·b)`` elements; first
    and last row always in); dw and db, sums over every row, on a sample of output features j
    (``N·k·max(b, c)`` elements; at least 8, first and last always in) with every row.
    """

    family = "bilinear"

    @staticmethod
    def _fwd_bwd(fwd: Callable[[Inputs], torch.Tensor], leaves: Sequence[str]) -> Callable[[Inputs], Outputs]:
        """Forward, then the gradients of ``leaves`` for the incoming ``dy``: (y, *grads)."""

        def call(i: Inputs) -> Outputs:
            y = fwd(i)
            grads = torch.autograd.grad(y, [i[k] for k in leaves], i["dy"])
            return (y.detach(), *grads)

        return call

    @staticmethod
    def _gemm(n: int, b: int, c: int, d: int, backward: bool) -> Callable[[Inputs], Outputs]:
        """Plain ``torch.mm`` of the bilinear FLOPs; operands built once per buffer set (first call)."""

        def call(i: Inputs) -> Outputs:
            ops = i.get("_gemm")
            if ops is None:  # the warm-up call of this buffer set: not timed
                with torch.no_grad():
                    z, x = i["z"].detach().reshape(n, b), i["x"].detach().reshape(n, c)
                    a = (z[:, :, None] * x[:, None, :]).reshape(n, b * c)
                    w2 = i["w"].detach().reshape(d, b * c).contiguous()
                    dy = i["dy"].reshape(n, d).contiguous() if backward else None
                ops = i["_gemm"] = (a, w2, dy)
            a, w2, dy = ops
            y = torch.mm(a, w2.t())
            if not backward:
                return y
            return y, torch.mm(dy, w2), torch.mm(dy.t(), a)

        return call

    @classmethod
    def _check_samples(cls, refs, n: int, b: int, c: int, d: int, backward: bool, has_bias: bool):
        def samples(inputs: Inputs, max_elems: int, gen: torch.Generator) -> List[CheckSample]:
            from .check import _sample_index  # check imports this module

            z, x = inputs["z"].detach().reshape(n, b), inputs["x"].detach().reshape(n, c)
            w = inputs["w"].detach()
            bias = inputs["bias"].detach() if has_bias else None
            _, rows = _sample_index((n, max(b * c, d * c, d * b)), (1,), max_elems, gen)
            width = {"y": d, "dz": b, "dx": c}

            def take_rows(name: str, t: torch.Tensor) -> torch.Tensor:
                t = t.reshape(n, width[name])
                return t if rows is None else t.index_select(0, rows.to(t.device))

            def sel(t: torch.Tensor, idx, dim: int = 0) -> torch.Tensor:
                return t if idx is None else t.index_select(dim, idx.to(t.device))

            r_in = {"z": sel(z, rows), "x": sel(x, rows), "w": w}
            if bias is not None:
                r_in["bias"] = bias
            if not backward:
                return [CheckSample(r_in, ("y",), take_rows,
                                    lambda r: refs.bilinear_ref(r["z"], r["x"], r["w"], r.get("bias")))]
            dy = inputs["dy"].reshape(n, d)
            r_in["dy"] = sel(dy, rows)

            def ref_rows(r: Inputs) -> Outputs:
                dz, dx = refs.bilinear_grads_ref(r["z"], r["x"], r["w"], r["dy"])[:2]
                return refs.bilinear_ref(r["z"], r["x"], r["w"], r.get("bias")), dz, dx

            per_j = n * max(b, c)
            _, cols = _sample_index((d, per_j), (1,), max(max_elems, 8 * per_j), gen)
            c_in = {"z": z, "x": x, "w": sel(w, cols), "dy": sel(dy, cols, 1)}
            parts = ("dw", "db") if has_bias else ("dw",)

            def ref_cols(r: Inputs) -> Outputs:
                return refs.bilinear_grads_ref(r["z"], r["x"], r["w"], r["dy"])[2:2 + len(parts)]

            return [CheckSample(r_in, ("y", "dz", "dx"), take_rows, ref_rows),
                    CheckSample(c_in, parts, lambda name, t: sel(t, cols), ref_cols)]

        return samples

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        import mmkernels

        F = torch.nn.functional
        b, c, d = (int(case.params[k]) for k in ("b", "c", "d"))
        has_bias = bool(case.params.get("bias", True))
        n = math.prod(case.shape)
        names = ("z", "x", "w", "bias") if has_bias else ("z", "x", "w")
        esize = torch.empty((), dtype=case.dtype).element_size()
        inputs = n * (b + c) + d * b * c + (d if has_bias else 0)  # z, x, w, bias (elements)
        fwd_flops = 2 * n * b * c * d
        shape_text = f"{'x'.join(map(str, case.shape)) or 'scalar'} ({b}x{c}->{d}){'' if has_bias else ' nobias'}"

        def fwd_of(fn):
            return lambda i: fn(i["z"], i["x"], i["w"], i.get("bias"))

        def einsum(z, x, w, bias=None):
            y = torch.einsum("...h,...i,jhi->...j", z, x, w)
            return y if bias is None else y + bias

        ours_fwd, eager_fwd, einsum_fwd = fwd_of(mmkernels.bilinear), fwd_of(F.bilinear), fwd_of(einsum)
        common = dict(case=case, passes=None, reduced_dims=(), shape_text=shape_text)

        fwd_base = {"eager": eager_fwd, "einsum": einsum_fwd, "gemm": cls._gemm(n, b, c, d, False)}
        fwd = Variant(
            direction="fwd", ours=ours_fwd, baselines=fwd_base,
            reference=lambda i: refs.bilinear_ref(i["z"], i["x"], i["w"], i.get("bias")),
            prepare=lambda raw: {k: raw[k] for k in names},
            bytes_moved=(inputs + n * d) * esize, outputs=("y",), flops=fwd_flops,
            check_samples=cls._check_samples(refs, n, b, c, d, False, has_bias), **common,
        )

        def prepare_fb(raw: Inputs) -> Inputs:
            out = {k: raw[k].detach().requires_grad_() for k in names}
            out["dy"] = raw["dy"]
            return out

        def reference_fb(i: Inputs) -> Outputs:
            dz, dx, dw, db = refs.bilinear_grads_ref(i["z"], i["x"], i["w"], i["dy"])
            y = refs.bilinear_ref(i["z"], i["x"], i["w"], i.get("bias"))
            return (y, dz, dx, dw, db) if has_bias else (y, dz, dx, dw)

        fb_base = {"eager": cls._fwd_bwd(eager_fwd, names), "einsum": cls._fwd_bwd(einsum_fwd, names),
                   "gemm": cls._gemm(n, b, c, d, True)}
        fwd_bwd = Variant(
            direction="fwd+bwd", ours=cls._fwd_bwd(ours_fwd, names), baselines=fb_base,
            reference=reference_fb, prepare=prepare_fb,
            bytes_moved=2 * (inputs + n * d) * esize,  # read z, x, w, bias, dy; write y, dz, dx, dw, db
            outputs=("y", "dz", "dx", "dw", "db") if has_bias else ("y", "dz", "dx", "dw"),
            flops=3 * fwd_flops, check_samples=cls._check_samples(refs, n, b, c, d, True, has_bias), **common,
        )
        if compile_baseline:
            fwd_base["compile"] = compiled(_unpack(eager_fwd, names), names)
            fb_base["compile"] = cls._fwd_bwd(compiled(_unpack(eager_fwd, names), names), names)
        _cpp_baselines(case, fwd_base, fb_base, ours_fwd, fwd_bwd.ours)
        return [fwd, fwd_bwd]

    @staticmethod
    def targets() -> List[Target]:
        """Acceptance targets of the family (GPU, bf16, b = c = d = 256; N = 8192 and N = 64).

        ratio = F.bilinear time / ours; frac_mm = (useful FLOPs / time) / measured bf16 mm rate.
        """

        def rows(direction: str, n: int):
            def applies(r: Mapping[str, Any]) -> bool:
                p = r.get("params") or {}
                return (r.get("family") == "bilinear" and r.get("direction") == direction
                        and list(r.get("shape", ())) == [n] and r.get("dtype") == "bfloat16"
                        and (p.get("b"), p.get("c"), p.get("d")) == (256, 256, 256))
            return applies

        big, small = "(N=8192, b=c=d=256, bf16)", "(N=64, b=c=d=256, bf16)"
        return [
            Target(f"bilinear fwd >= 70% of the bf16 mm rate {big}", "frac_mm", 0.70, rows("fwd", 8192)),
            Target(f"bilinear fwd >= 10x F.bilinear {big}", "ratio", 10.0, rows("fwd", 8192)),
            Target(f"bilinear fwd+bwd >= 55% of the bf16 mm rate {big}", "frac_mm", 0.55, rows("fwd+bwd", 8192)),
            Target(f"bilinear fwd+bwd >= 10x F.bilinear {big}", "ratio", 10.0, rows("fwd+bwd", 8192)),
            Target(f"bilinear fwd faster than F.bilinear {small}", "ratio", 1.0, rows("fwd", 64)),
            Target(f"bilinear fwd+bwd faster than F.bilinear {small}", "ratio", 1.0, rows("fwd+bwd", 64)),
        ]


# ----------------------------------------------------------------------------------------------
# MoE routing
# ----------------------------------------------------------------------------------------------


def _torch_route(logits: torch.Tensor, k: int, op: str, params: Mapping[str, Any], bias: Optional[torch.Tensor],
                 counts_by: str = "bincount") -> Tuple[torch.Tensor, ...]:
    """The torch composition users write today: scores -> topk -> renormalise -> argsort -> bincount
    -> cumsum (``counts_by="scatter"``: counts by ``scatter_add_``, which needs no host sync and
    so can be captured in a CUDA graph; ``bincount`` on CUDA reads the maximum back to the host).
    Returns (weights fp32, expert_ids, counts, offsets, sorted_slots), the ids in topk's order."""
    T, E = logits.shape
    if op == "gptoss":
        top, ids = torch.topk(logits, k, dim=-1)
        w = torch.softmax(top.float(), dim=-1)
    elif op == "deepseek":  # transformers' DeepseekV3TopkRouter after its linear layer
        scores = torch.sigmoid(logits.float())
        choice = scores + bias
        g = int(params["n_groups"])
        group_scores = choice.view(T, g, E // g).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=int(params["topk_groups"]), dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(T, g, E // g).reshape(T, E)
        ids = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * float(params.get("routed_scaling", 2.5))
    else:
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if op == "mixtral":
            w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    sorted_slots = torch.argsort(flat, stable=True)
    if counts_by == "bincount":
        counts = torch.bincount(flat, minlength=E)
    else:
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    i32 = torch.int32
    return w, ids.to(i32), counts.to(i32), offsets.to(i32), sorted_slots.to(i32)


class RoutingBench:
    """Bench spec of MoE routing (``mmkernels.moe.route``), one case per router style
    (registry op: ``mixtral``, ``qwen3``, ``deepseek``, ``gptoss``) and shape ``(T, E)``.

    Variants: ``fwd`` (route + metadata; outputs weights, expert_ids, counts, offsets,
    sorted_slots — the integers checked exactly against the float64 reference, every output of
    the whole case, no sample) and ``fwd+bwd`` (weights, then d logits for an incoming ``dw`` by
    ``torch.autograd.grad``). Baselines: ``eager`` = the torch composition of :func:`_torch_route`
    (softmax -> topk -> renormalise -> argsort -> bincount -> cumsum; DeepSeek-V3: transformers'
    router); ``nosync`` = the same with counts by ``scatter_add_`` (no host sync, so it is timed
    like ours, in CUDA graphs). Bytes: the logits read once; weights, ids, sorted_slots and the
    inverse written once (fwd+bwd: plus dw read and d logits written).
    """

    family = "routing"
    OUTPUTS = ("weights", "expert_ids", "counts", "offsets", "sorted_slots")

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        from mmkernels import moe
        from mmkernels.testing.registry import routing_kwargs

        T, E = case.shape
        k = int(case.params["k"])
        esize = torch.empty((), dtype=case.dtype).element_size()
        names = ("logits", "bias") if case.op == "deepseek" else ("logits",)
        shape_text = f"{T}x{E} k={k}" + (f" cap={case.params['capacity_factor']}"
                                         if case.params.get("capacity_factor") else "")
        everything = lambda inputs, max_elems, gen: [  # noqa: E731 - metadata depends on every token
            CheckSample(inputs, cls.OUTPUTS if "dw" not in inputs else ("weights", "dlogits"), lambda n, t: t)]

        def ours(i: Inputs) -> Outputs:
            r = moe.route(i["logits"], k, **routing_kwargs(case, i))
            return r.weights, r.expert_ids, r.counts, r.offsets, r.sorted_slots

        def base(counts_by: str):
            return lambda i: _torch_route(i["logits"], k, case.op, case.params, i.get("bias"), counts_by)

        def reference(i: Inputs) -> Outputs:
            r = refs.route_ref(i["logits"], k, **routing_kwargs(case, i))
            return tuple(r[n] for n in cls.OUTPUTS)

        fwd_base = {"eager": base("bincount"), "nosync": base("scatter")}
        common = dict(case=case, passes=None, reduced_dims=(), shape_text=shape_text, check_samples=everything)
        slots = T * k * (4 + 4 + 4 + 4 + 1)  # weights, ids, sorted_slots, slot_rows, dropped
        fwd = Variant(direction="fwd", ours=ours, baselines=fwd_base, reference=reference,
                      prepare=lambda raw: {n: raw[n] for n in names},
                      bytes_moved=T * E * esize + slots, outputs=cls.OUTPUTS, **common)

        def fwd_bwd(fn):
            def call(i: Inputs) -> Outputs:
                w = fn(i)
                (g,) = torch.autograd.grad(w, i["logits"], i["dw"])
                return w.detach(), g
            return call

        def ref_fb(i: Inputs) -> Outputs:
            logits = i["logits"].detach().requires_grad_()
            w = refs.route_ref(logits, k, **routing_kwargs(case, i))["weights"]
            (g,) = torch.autograd.grad(w, logits, i["dw"].to(w.dtype))
            return w.detach(), g

        def prepare_fb(raw: Inputs) -> Inputs:
            out = {n: raw[n] for n in names}
            out["logits"] = raw["logits"].detach().requires_grad_()
            out["dw"] = raw["dw"]
            return out

        fb_base = {"eager": fwd_bwd(lambda i: base("bincount")(i)[0]),
                   "nosync": fwd_bwd(lambda i: base("scatter")(i)[0])}
        fb = Variant(direction="fwd+bwd", ours=fwd_bwd(lambda i: ours(i)[0]), baselines=fb_base,
                     reference=ref_fb, prepare=prepare_fb,
                     bytes_moved=2 * T * E * esize + slots + T * k * 4, outputs=("weights", "dlogits"), **common)
        if compile_baseline:
            fwd_base["compile"] = compiled(
                lambda *ts: _torch_route(ts[0], k, case.op, case.params, ts[1] if len(ts) > 1 else None, "scatter"),
                names)
        _cpp_baselines(case, fwd_base, fb_base, ours, fb.ours)
        return [fwd, fb]

    @staticmethod
    def targets() -> List[Target]:
        """Acceptance targets (GPU; T = 16384, E = 128, k = 8, dropless, softmax routers):
        route + metadata >= 3x the torch composition (both timed alike: ``ratio_nosync``; and the
        composition with bincount, ``ratio``), in at most 3 launches. CPU (issue 6): >= 3x the
        torch composition at T = 2048, E = 64, k = 8 (the Qwen3 router)."""

        def rows(r: Mapping[str, Any]) -> bool:
            p = r.get("params") or {}
            return (r.get("family") == "routing" and r.get("direction") == "fwd"
                    and list(r.get("shape", ())) == [16384, 128] and p.get("k") == 8
                    and r.get("op") in ("mixtral", "qwen3") and not p.get("capacity_factor"))

        def cpu_rows(r: Mapping[str, Any]) -> bool:  # issue 6: the C++ CPU path at the Qwen3 block's shape
            p = r.get("params") or {}
            return (r.get("family") == "routing" and r.get("direction") == "fwd" and r.get("op") == "qwen3"
                    and list(r.get("shape", ())) == [2048, 64] and p.get("k") == 8 and not p.get("capacity_factor"))

        size = "(T=16384, E=128, k=8)"
        cpu = "(CPU, Qwen3 router, T=2048, E=64, k=8, fp32)"
        return [
            Target(f"route + metadata >= 3x the torch composition {size}", "ratio", 3.0, rows),
            Target(f"route + metadata >= 3x the sync-free torch composition {size}", "ratio_nosync", 3.0, rows),
            Target(f"route + metadata in at most 3 launches {size}", "launches", 3, rows, at_most=True),
            Target(f"route + metadata >= 3x the torch composition {cpu}", "ratio", 3.0, cpu_rows),
        ]


# ----------------------------------------------------------------------------------------------
# MoE experts
# ----------------------------------------------------------------------------------------------


def _hf_experts(H: int, I: int, E: int, k: int, gate_up: torch.Tensor, down: torch.Tensor):
    """transformers' Qwen3-MoE experts module holding ``gate_up`` / ``down`` (shared, not copied),
    or None without transformers."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    # the very tensors (Parameters, see ExpertsBench's prepare): gradients reach the same leaves
    mod.gate_up_proj = gate_up if isinstance(gate_up, torch.nn.Parameter) else torch.nn.Parameter(gate_up, False)
    mod.down_proj = down if isinstance(down, torch.nn.Parameter) else torch.nn.Parameter(down, False)
    return mod


def _torch_experts(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   k: int) -> torch.Tensor:
    """A plain torch MoE layer (the fallback ``eager`` baseline without transformers): softmax ->
    topk, then a Python loop over the experts of ``index_select`` / ``mm`` / ``index_add``."""
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        h = x[t] @ gate_up[e].t()
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ down[e].t()
        out = out.index_add(0, t, y * w[t, j, None].to(x.dtype))
    return out


def _torch_grouped_mm_experts(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                              k: int) -> torch.Tensor:
    """A ``torch._grouped_mm`` MoE layer written directly (no transformers): softmax -> topk, the
    slots sorted by expert (a permuted copy of x's rows), one grouped GEMM per projection over
    the experts' row ranges (``offs``: cumulative counts), SwiGLU between, the routing weight on
    the output rows and ``index_add`` back to the tokens. Differentiable (torch's autograd of
    ``_grouped_mm``). None of the ops synchronises with the host."""
    T, H = x.shape
    E, I2, _ = gate_up.shape
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    h = torch._grouped_mm(x.index_select(0, tok), gate_up.transpose(-2, -1), offs=offs)
    a = torch.nn.functional.silu(h[:, : I2 // 2]) * h[:, I2 // 2:]
    y = torch._grouped_mm(a, down.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1).index_select(0, order)[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, tok, y)


def _on_torch_path(fn: Callable) -> Callable:
    """``fn`` with the CPU ops on their vectorised-torch path (the C++ kernels of csrc/ off): the
    ``torch_path`` baseline of the CPU cases, so the main job shows what the C++ kernels buy."""
    from mmkernels import _cpp

    def call(i):
        with _cpp.use_cpu_impl("torch"):
            return fn(i)
    return call


def _cpp_baselines(case: Case, fwd: Dict[str, Callable], fb: Dict[str, Callable], ours_fwd: Callable,
                   ours_fb: Callable) -> None:
    """Add ``torch_path`` (ours on the vectorised-torch CPU path) to a CPU case's baselines when
    the C++ kernels are active."""
    from mmkernels import _cpp

    if "gpu" not in case.tags and _cpp.load():
        fwd["torch_path"] = _on_torch_path(ours_fwd)
        fb["torch_path"] = _on_torch_path(ours_fb)


class ExpertsBench:
    """Bench spec of the MoE experts (``mmkernels.moe.experts`` after ``moe.route``): SwiGLU experts
    of a Qwen3-style router (softmax, top-k, no renormalisation), one case per model shape.

    Variants: ``fwd`` (route + experts) and ``fwd+bwd`` (then the gradients of x, gate_up_proj,
    down_proj and the router logits by ``torch.autograd.grad``). Baselines: ``eager`` =
    transformers' Qwen3-MoE experts module with its ``eager`` implementation (a Python loop over
    the experts hit), ``grouped_mm`` = the same with ``experts_implementation="grouped_mm"``; both
    after the torch router (softmax -> topk); without transformers installed, ``eager`` is
    :func:`_torch_experts` (the same loop written in torch) and ``grouped_mm`` is absent;
    ``torch_grouped_mm`` = :func:`_torch_grouped_mm_experts` (torch's grouped GEMM composed
    directly), where torch has ``_grouped_mm``. Useful FLOPs (DESIGN.md): ``6·T·k·H·I`` forward,
    3x that forward + backward. Bytes: the expert weights touched (every expert at these sizes)
    plus x and out — the measure at decode sizes. The check compares the output (and dx) on a
    sample of whole tokens with the float64 per-token reference; the weight gradients are checked
    by the tests (every expert's rows would be needed).
    """

    family = "experts"

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        from mmkernels import moe

        (T,) = case.shape
        H, I, E, k = (int(case.params[n]) for n in ("H", "I", "E", "k"))
        esize = torch.empty((), dtype=case.dtype).element_size()
        flops = 6 * T * k * H * I
        weight_bytes = 3 * E * H * I * esize
        shape_text = f"T={T} H={H} I={I} E={E} k={k}"

        def ours_fwd(i: Inputs) -> torch.Tensor:
            r = moe.route(i["logits"], k, renormalize=False, block_m=moe.suggest_block_m(T, E, k))
            return moe.experts(i["x"], r, i["gate_up"], i["down"])

        def hf(impl: str):
            def call(i: Inputs) -> torch.Tensor:
                mod = i.get("_hf")
                if mod is None:
                    mod = i["_hf"] = _hf_experts(H, I, E, k, i["gate_up"], i["down"])
                mod.config._experts_implementation = impl
                w, ids = torch.topk(torch.softmax(i["logits"], dim=-1, dtype=torch.float32), k, dim=-1)
                return mod(i["x"], ids, w.to(i["x"].dtype))
            return call

        def sample(inputs: Inputs, max_elems: int, gen: torch.Generator) -> List[CheckSample]:
            n = min(T, 16)  # the float64 reference runs per token on the CPU: 16 tokens, first and last in
            rows = torch.cat([torch.tensor([0, T - 1]), torch.randperm(T, generator=gen)[: n - 2]]).unique()[:n]
            take = lambda name, t: t.index_select(0, rows.to(t.device))  # noqa: E731
            r_in = {"x": take("x", inputs["x"]), "logits": take("logits", inputs["logits"]),
                    "gate_up": inputs["gate_up"], "down": inputs["down"]}
            parts = ("out",)
            if "dout" in inputs:
                r_in["dout"] = take("dout", inputs["dout"])
                parts = ("out", "dx")
            return [CheckSample(r_in, parts, take)]

        def reference(i: Inputs) -> Outputs:
            r = refs.route_ref(i["logits"], k, renormalize=False)
            x = i["x"].detach().requires_grad_()
            out = refs.experts_ref(x, r["weights"].detach(), r["expert_ids"], r["dropped"], i["gate_up"], i["down"])
            if "dout" not in i:
                return out
            (dx,) = torch.autograd.grad(out, x, i["dout"])
            return out.detach(), dx

        have_hf = _hf_experts(1, 1, 1, 1, torch.empty(1, 2, 1), torch.empty(1, 1, 1)) is not None
        fwd_base = {"eager": hf("eager"), "grouped_mm": hf("grouped_mm")} if have_hf else {}
        if hasattr(torch, "_grouped_mm"):
            fwd_base["torch_grouped_mm"] = lambda i: _torch_grouped_mm_experts(  # noqa: E731
                i["x"], i["logits"], i["gate_up"], i["down"], k)
        common = dict(case=case, passes=None, reduced_dims=(), shape_text=shape_text, check_samples=sample)
        def params(raw: Inputs, grad: bool) -> Inputs:
            """The expert weights as Parameters (what a model holds, and what transformers' module
            must be given for its gradients to reach the same leaves as ours)."""
            out = {n: raw[n].detach().requires_grad_(grad) for n in ("x", "logits")}
            out.update({n: torch.nn.Parameter(raw[n].detach(), requires_grad=grad) for n in ("gate_up", "down")})
            return out

        fwd = Variant(direction="fwd", ours=ours_fwd, baselines=fwd_base, reference=reference,
                      prepare=lambda raw: params(raw, False),
                      bytes_moved=weight_bytes + 2 * T * H * esize, outputs=("out",), flops=flops, **common)

        def fb(fn):
            def call(i: Inputs) -> Outputs:
                out = fn(i)
                grads = torch.autograd.grad(out, [i["x"], i["gate_up"], i["down"], i["logits"]], i["dout"])
                return out.detach(), grads[0]
            return call

        def prepare_fb(raw: Inputs) -> Inputs:
            out = params(raw, True)
            out["dout"] = raw["dout"]
            return out

        fb_base = {name: fb(fn) for name, fn in fwd_base.items()}
        fwd_bwd = Variant(direction="fwd+bwd", ours=fb(ours_fwd), baselines=fb_base, reference=reference,
                          prepare=prepare_fb, bytes_moved=2 * weight_bytes + 4 * T * H * esize,
                          outputs=("out", "dx"), flops=3 * flops, **common)
        if not have_hf:  # without transformers the ratio baseline is a plain torch loop over the experts
            loop = lambda i: _torch_experts(i["x"], i["logits"], i["gate_up"], i["down"], k)  # noqa: E731
            fwd.baselines["eager"] = loop
            fwd_bwd.baselines["eager"] = fb(loop)
        _cpp_baselines(case, fwd.baselines, fwd_bwd.baselines, ours_fwd, fwd_bwd.ours)
        return [fwd, fwd_bwd]

    @staticmethod
    def targets() -> List[Target]:
        """Acceptance targets (issue 5): bf16 GPU, T = 16384 forward+backward >= 1x grouped_mm and
        >= 5x eager on the three shapes; forward >= 65% of the bf16 mm rate on Mixtral's shape;
        T = 64 >= 60% of copy bandwidth over the touched expert weights; CPU: the Qwen3 block
        forward+backward >= 1.5x grouped_mm."""

        def rows(direction: str, T: int, ops=("mixtral", "qwen3", "olmoe")):
            def applies(r: Mapping[str, Any]) -> bool:
                return (r.get("family") == "experts" and r.get("direction") == direction
                        and list(r.get("shape", ())) == [T] and r.get("op") in ops)
            return applies

        return [
            Target("experts fwd+bwd >= 1x transformers grouped_mm (T=16384, bf16)", "ratio_grouped_mm", 1.0,
                   rows("fwd+bwd", 16384)),
            Target("experts fwd+bwd >= 5x transformers eager (T=16384, bf16)", "ratio", 5.0, rows("fwd+bwd", 16384)),
            Target("experts fwd >= 65% of the bf16 mm rate (Mixtral, T=16384)", "frac_mm", 0.65,
                   rows("fwd", 16384, ("mixtral",))),
            Target("experts fwd >= 60% of copy over the touched weights (T=64)", "frac_copy", 0.60, rows("fwd", 64)),
            Target("experts CPU fwd+bwd >= 1.5x grouped_mm (Qwen3 block, T=2048, fp32)", "ratio_grouped_mm", 1.5,
                   rows("fwd+bwd", 2048, ("qwen3_cpu",))),
            # issue 6 (the C++ CPU path): transformers' fastest CPU experts at this shape is
            # grouped_mm (eager's backward is ~10x slower; batched_mm would copy T·k weight
            # matrices, 17 GB here)
            Target("experts CPU fwd+bwd >= 2x transformers' fastest (grouped_mm; Qwen3 block, T=2048, fp32)",
                   "ratio_grouped_mm", 2.0, rows("fwd+bwd", 2048, ("qwen3_cpu",))),
            Target("experts CPU fwd+bwd >= 1.3x the vectorised-torch path (Qwen3 block, T=2048, fp32)",
                   "ratio_torch_path", 1.3, rows("fwd+bwd", 2048, ("qwen3_cpu",))),
            Target("experts CPU fwd+bwd >= 60% of the fp32 mm rate (Qwen3 block, T=2048)", "frac_mm", 0.6,
                   rows("fwd+bwd", 2048, ("qwen3_cpu",))),
        ]


# ----------------------------------------------------------------------------------------------
# The seeds' other modules (issue 7)
# ----------------------------------------------------------------------------------------------


def _grads(fn: Callable[[Inputs], torch.Tensor], wrt: Sequence[str], upstream: Optional[str]):
    """forward + backward of ``fn``: (its output, d output / d each of ``wrt``), the incoming
    gradient from input ``upstream`` (None: a scalar loss)."""
    def call(i: Inputs) -> Outputs:
        leaves = {n: i[n].detach().requires_grad_() for n in wrt}
        out = fn({**i, **leaves})
        grads = torch.autograd.grad(out, [leaves[n] for n in wrt], None if upstream is None else i[upstream])
        return (out.detach(),) + tuple(grads)
    return call


def _eager_attention(i: Inputs) -> torch.Tensor:
    p = torch.softmax(i["z"].float() if i["z"].dtype != torch.float64 else i["z"], dim=-1)
    return torch.einsum("rj,rjd->rd", p, i["x"].to(p.dtype)).to(i["x"].dtype)


def _eager_gated(i: Inputs) -> torch.Tensor:
    g = torch.sigmoid(torch.nn.functional.linear(torch.cat([i["a"], i["b"]], dim=-1), i["weight"], i["bias"]))
    return g * i["a"] + (1 - g) * i["b"]


from mmkernels.ops.gating import GatedBlendFunction  # noqa: E402 - the blend alone (gated_blend)


def refs_dense_moe(x, gate_weight, gate_up, down):
    """Dense MoE as users write it: softmax gate, then a Python loop over the experts (SwiGLU)."""
    p = torch.softmax(x @ gate_weight.T, dim=-1)
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gate_weight.shape[0]):
        h = x @ gate_up[e].T
        out = out + p[:, e:e + 1] * ((torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ down[e].T)
    return out


def _eager_product_unit(x, weight, out_weight):
    """Product units in log space with torch ops (what the CPU path computes)."""
    lg = torch.log(x.abs().clamp_min(2.0 ** -100))
    neg = (x < 0).to(x.dtype)
    return (torch.exp(lg @ weight.T) * torch.cos(math.pi * (neg @ weight.T))) @ out_weight.T


def _eager_sigma_pi(z, conjuncts, weight, bias):
    """Sigma-pi units with a Python loop over the conjuncts."""
    feats = []
    for q in conjuncts.tolist():
        f = torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
        for i in q:
            if i >= 0:
                f = f * z[..., i]
        feats.append(f)
    return torch.stack(feats, dim=-1) @ weight.T + bias


def _eager_pi_sigma(z, weight, bias):
    return (torch.einsum("nd,ksd->nks", z, weight) + bias).prod(dim=-1)


class ModulesBench:
    """Bench spec of the seeds' other modules (issue 7), forward + backward each:

    * ``cross_entropy`` (N, C): ours :func:`mmkernels.cross_entropy` vs ``F.cross_entropy`` (label
      smoothing, every 16th row ignored); outputs loss and d logits. Bytes: the logits read twice
      and d logits written (forward reads once, backward reads and writes).
    * ``attention`` (R, J, D): :func:`mmkernels.attention_module` vs softmax + einsum; outputs s,
      dz, dx. Minimum traffic: forward reads z, x and writes s; backward reads z, x, s, ds, writes
      dz, dx.
    * ``gated_fusion`` (R, D): :func:`mmkernels.gated_fusion` vs cat + linear + sigmoid + blend;
      outputs out, da, db, d weight, d bias; useful FLOPs: the gate's GEMMs (3 x 4·R·D² forward +
      backward). Bytes: the blend's minimum, as below.
    * ``hard_switch`` (R, J, D): :func:`mmkernels.hard_switch` (dx) vs ``gather``.
    * ``dense_moe`` (T, H, I, E): :func:`mmkernels.moe.dense_moe` vs a softmax gate and a Python
      loop over the experts; useful FLOPs 3 x 6·T·E·H·I.
    * ``product_unit`` (N, I, J, K): :func:`mmkernels.product_unit` vs the same log-space formula
      in torch ops.
    * ``sigma_pi_unit`` (N, n, Q, m, K) and ``pi_sigma`` (N, n, K, S): the compositions vs a loop
      over the conjuncts / an einsum and a product.
    * ``gated_blend`` (R, D): the fused blend alone (``ops.gating.GatedBlendFunction``) vs
      ``lerp(b, a, sigmoid(pre))`` under autograd; outputs out, dpre, da, db. Minimum traffic 11
      tensors (forward pre, a, b, out; backward dout, pre, a, b, da, db, dpre).

    The float64 references: ``refs``' ``cross_entropy_ref``, ``attention_module_ref`` and
    ``gated_fusion_ref`` (``tests/reference.py`` in the GPU suite), differentiated by autograd; the
    blend's is ``lerp`` and ``sigmoid`` in float64.
    """

    family = "modules"

    @classmethod
    def variants(cls, case: Case, refs=TorchReferences, compile_baseline: bool = False) -> List[Variant]:
        import mmkernels

        esize = torch.empty((), dtype=case.dtype).element_size()
        everything = lambda names: (lambda inputs, max_elems, gen: [  # noqa: E731 - whole outputs
            CheckSample(inputs, names, lambda n, t: t)])
        if case.op == "cross_entropy":
            N, C = case.shape
            eps = float(case.params.get("label_smoothing", 0.0))
            ours = _grads(lambda i: mmkernels.cross_entropy(i["logits"], i["target"].long(), label_smoothing=eps),
                          ("logits",), None)
            eager = _grads(lambda i: torch.nn.functional.cross_entropy(i["logits"], i["target"].long(),
                                                                      label_smoothing=eps), ("logits",), None)
            ref = _grads(lambda i: refs.cross_entropy_ref(i["logits"], i["target"].long(), label_smoothing=eps),
                         ("logits",), None)
            names, outputs = ("logits", "target"), ("loss", "dlogits")
            nbytes, flops = 3 * N * C * esize, None
        elif case.op == "attention":
            R, J, D = case.shape
            ours = _grads(lambda i: mmkernels.attention_module(i["z"], i["x"]), ("z", "x"), "ds")
            eager = _grads(_eager_attention, ("z", "x"), "ds")
            ref = _grads(lambda i: refs.attention_module_ref(i["z"], i["x"]), ("z", "x"), "ds")
            names, outputs = ("z", "x", "ds"), ("s", "dz", "dx")
            nbytes, flops = (2 * R * J + 2 * R * J * D + 3 * R * D + R * J * D + R * J) * esize, None
        elif case.op == "gated_fusion":
            R, D = case.shape
            ours = _grads(lambda i: mmkernels.gated_fusion(i["a"], i["b"], i["weight"], i["bias"]),
                          ("a", "b", "weight", "bias"), "dout")
            eager = _grads(_eager_gated, ("a", "b", "weight", "bias"), "dout")
            ref = _grads(lambda i: refs.gated_fusion_ref(i["a"], i["b"], i["weight"], i["bias"]),
                         ("a", "b", "weight", "bias"), "dout")
            names, outputs = ("a", "b", "weight", "bias", "dout"), ("out", "da", "db", "dweight", "dbias")
            nbytes, flops = 11 * R * D * esize, 3 * 2 * R * (2 * D) * D
        elif case.op == "hard_switch":
            R, J, D = case.shape
            ours = _grads(lambda i: mmkernels.hard_switch(i["z"], i["x"]), ("x",), "ds")
            eager = _grads(lambda i: i["x"].gather(1, i["z"].argmax(1)[:, None, None].expand(-1, 1, D)).squeeze(1),
                           ("x",), "ds")
            ref = eager  # a selection: exact in any dtype
            names, outputs = ("z", "x", "ds"), ("s", "dx")
            nbytes, flops = (R * J + 2 * R * D + R * J * D + R * D) * esize, None
        elif case.op == "dense_moe":
            from mmkernels import moe

            T, H, I, E = case.shape
            wrt = ("x", "gate_weight", "gate_up", "down")
            ours = _grads(lambda i: moe.dense_moe(*(i[n] for n in wrt)), wrt, "dout")
            eager = _grads(lambda i: refs_dense_moe(*(i[n] for n in wrt)), wrt, "dout")
            ref = _grads(lambda i: getattr(refs, "dense_moe_ref", refs_dense_moe)(*(i[n] for n in wrt)), wrt, "dout")
            names, outputs = wrt + ("dout",), ("out", "dx", "dgate_weight", "dgate_up", "ddown")
            nbytes, flops = (T * H * 2 + 3 * E * H * I) * esize, 3 * 6 * T * E * H * I
        elif case.op == "product_unit":
            N, I, J, K = case.shape
            wrt = ("x", "weight", "out_weight")
            ours = _grads(lambda i: mmkernels.product_unit(*(i[n] for n in wrt)), wrt, "dout")
            eager = _grads(lambda i: _eager_product_unit(*(i[n] for n in wrt)), wrt, "dout")
            ref = _grads(lambda i: getattr(refs, "product_unit_ref", _eager_product_unit)(*(i[n] for n in wrt)),
                         wrt, "dout")
            names, outputs = wrt + ("dout",), ("out", "dx", "dweight", "dout_weight")
            nbytes, flops = (2 * N * I + N * K) * esize, 3 * 2 * N * (2 * I * J + J * K)
        elif case.op == "sigma_pi_unit":
            N, n, Q, m, K = case.shape
            wrt = ("z", "weight", "bias")
            ours = _grads(lambda i: mmkernels.sigma_pi_unit(i["z"], i["conjuncts"].long(), i["weight"], i["bias"]),
                          wrt, "dout")
            eager = _grads(lambda i: _eager_sigma_pi(i["z"], i["conjuncts"].long(), i["weight"], i["bias"]), wrt, "dout")
            ref = _grads(lambda i: getattr(refs, "sigma_pi_unit_ref", _eager_sigma_pi)(
                i["z"], i["conjuncts"].long(), i["weight"], i["bias"]), wrt, "dout")
            names, outputs = ("z", "conjuncts", "weight", "bias", "dout"), ("out", "dz", "dweight", "dbias")
            nbytes, flops = (2 * N * n + N * K) * esize, 3 * 2 * N * Q * K
        elif case.op == "pi_sigma":
            N, n, K, S = case.shape
            wrt = ("z", "weight", "bias")
            ours = _grads(lambda i: mmkernels.pi_sigma(i["z"], i["weight"], i["bias"], activation=None), wrt, "dout")
            eager = _grads(lambda i: _eager_pi_sigma(i["z"], i["weight"], i["bias"]), wrt, "dout")
            ref = _grads(lambda i: getattr(refs, "pi_sigma_ref", _eager_pi_sigma)(i["z"], i["weight"], i["bias"]),
                         wrt, "dout")
            names, outputs = wrt + ("dout",), ("out", "dz", "dweight", "dbias")
            nbytes, flops = (2 * N * n + N * K) * esize, 3 * 2 * N * n * K * S
        elif case.op == "gated_blend":
            R, D = case.shape
            ours = _grads(lambda i: GatedBlendFunction.apply(i["pre"], i["a"], i["b"]), ("pre", "a", "b"), "dout")
            eager = _grads(lambda i: torch.lerp(i["b"], i["a"], torch.sigmoid(i["pre"])), ("pre", "a", "b"), "dout")
            ref = eager  # σ and a lerp: the eager ops in float64
            names, outputs = ("pre", "a", "b", "dout"), ("out", "dpre", "da", "db")
            nbytes, flops = 11 * R * D * esize, None
        else:
            raise KeyError(f"modules family has no op {case.op!r}")
        baselines = {"eager": eager}
        if compile_baseline:
            baselines["compile"] = compiled(lambda *ts: eager(dict(zip(names, ts)))[0], names)
        fb = Variant(case=case, direction="fwd+bwd", ours=ours, baselines=baselines,
                     reference=ref,
                     prepare=lambda raw: {n: raw[n] for n in names}, bytes_moved=nbytes, passes=None,
                     reduced_dims=(), outputs=outputs, flops=flops, check_samples=everything(outputs),
                     shape_text="x".join(map(str, case.shape)))
        return [fb]

    @staticmethod
    def targets() -> List[Target]:
        """Issue 7's GPU targets: the attention module and gated fusion at >= 80% of the copy
        bandwidth on their minimum traffic (forward + backward here), cross-entropy >= 2x
        F.cross_entropy forward + backward at (8192, 32000) bf16."""

        def rows(op: str, shape, dtype: Optional[str] = None):
            def applies(r: Mapping[str, Any]) -> bool:
                return (r.get("family") == "modules" and r.get("op") == op and list(r.get("shape", ())) == list(shape)
                        and (dtype is None or r.get("dtype") == dtype))
            return applies

        return [
            Target("attention module fwd+bwd >= 80% of copy bandwidth (65536 x 8 x 512, GPU)", "frac_copy", 0.80,
                   rows("attention", (65536, 8, 512))),
            Target("gated fusion blend fwd+bwd >= 80% of copy bandwidth (65536 x 1024, GPU)", "frac_copy", 0.80,
                   rows("gated_blend", (65536, 1024))),
            Target("cross-entropy fwd+bwd >= 2x F.cross_entropy (8192 x 32000 bf16, GPU)", "ratio", 2.0,
                   rows("cross_entropy", (8192, 32000), "bfloat16")),
        ]


# ----------------------------------------------------------------------------------------------
# Every family
# ----------------------------------------------------------------------------------------------


#: Bench spec of each op family, by registry family name.
FAMILIES: Dict[str, Any] = {"softmax": SoftmaxBench, "bilinear": BilinearBench, "routing": RoutingBench,
                            "experts": ExpertsBench, "modules": ModulesBench}


def variants_for(case: Case, refs=None, compile_baseline: bool = False) -> List[Variant]:
    """The variants (e.g. forward and backward) of a registry case, with ``refs`` as the float64
    references (default :class:`TorchReferences`)."""
    spec = FAMILIES[case.family]
    return spec.variants(case, refs or TorchReferences, compile_baseline=compile_baseline)


def all_targets() -> List[Target]:
    return [t for spec in FAMILIES.values() for t in spec.targets()]
