"""MoE routing (``moe.route``): selection, weights and their gradients, and the exact dispatch
metadata (counts, offsets, the expert-ordered permutation and its inverse, capacity drops, the tile
table) against the naive float64 reference of mmkernels/reference.py, on the CPU path and the Triton
path; the router styles of Mixtral / Qwen3 / DeepSeek-V3 / gpt-oss, given expert ids, ties, NaN,
bad input, torch.compile, gradcheck and the balancing losses.

The full (T, E, k, style) cross product runs on the CPU path; the Triton interpreter (~ms per
program) runs a curated list that still covers every T, E, k and style
(``test_triton_matrix_covers_every_axis`` keeps it so).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import pytest
import torch

import mmkernels
from mmkernels import moe
from mmkernels import testing as mt
from mmkernels.family import laid_out
from tests.conftest import backend_matrix, backends
from mmkernels.reference import (load_balancing_loss_ref, route_ref, router_z_loss_ref, routing_grad_magnitude_ref,
                             routing_keys_ref, routing_weights_ref)

TOKENS = (0, 1, 5, 257)
EXPERTS = (1, 2, 7, 8, 61, 128)
STYLES = (
    "mixtral",            # softmax, renormalised over the top-k (== Qwen3 with norm_topk_prob=True)
    "qwen3-nonorm",       # softmax, full probabilities (Qwen3 with norm_topk_prob=False)
    "deepseek",           # sigmoid + selection bias + group-limited + renormalised + routed_scaling
    "sigmoid",            # sigmoid scores, not renormalised, no bias (keys are the logits)
    "gptoss",             # top-k on the logits, softmax over the chosen ones (softmax_after_topk)
    "softmax-groups",     # softmax scores as keys (group-limited), full probabilities, scaled
    "given-ids",          # caller-supplied expert_ids (int64, duplicates), softmax renormalised
    "given-ids-sigmoid",  # caller-supplied expert_ids (int32, duplicates), sigmoid renormalised, scaled
    "capacity",           # Mixtral with capacity_factor 1.0
    "capacity-tight",     # Qwen3 without renormalisation, capacity_factor 0.5, block_m 1
)
#: logit patterns: random, all tokens preferring one expert, all-equal rows, integer-valued logits
#: (many ties), half the experts starved (-20: they receive nothing while k <= E/2), half masked (-inf)
PATTERNS = ("randn", "one-expert", "tied", "integer", "starved", "masked")
#: styles whose selection key is the logit itself (no bias, no groups)
LOGIT_KEY_STYLES = ("mixtral", "qwen3-nonorm", "sigmoid", "gptoss", "capacity", "capacity-tight")


def valid_ks(E: int):
    return sorted({k for k in (1, 2, 6, E) if k <= E})


def group_config(E: int, k: int) -> Optional[dict]:
    """DeepSeek-V3-like grouping of E experts: the most groups (<= 8) of >= 2 experts each, half of
    them kept (more when top_k needs them); None when E has no such grouping (E = 1)."""
    for n in (8, 4, 2, 1):
        if E % n == 0 and E // n >= 2:
            return {"n_groups": n, "topk_groups": max(n // 2, 1, -(-k // (E // n)))}
    return None


def style_kwargs(style: str, T: int, E: int, k: int, gen: torch.Generator) -> dict:
    """moe.route's keyword arguments for one router style (tensors on the CPU)."""
    groups = group_config(E, k)
    if style == "mixtral":
        return {}
    if style == "qwen3-nonorm":
        return {"renormalize": False, "block_m": 16}
    if style == "deepseek":
        bias = (torch.randn(E, generator=gen, dtype=torch.float64) * 0.1).float()
        return {"scoring": "sigmoid", "selection_bias": bias, "routed_scaling": 2.5, "block_m": 8, **(groups or {})}
    if style == "sigmoid":
        return {"scoring": "sigmoid", "renormalize": False, "block_m": 32}
    if style == "gptoss":
        return {"softmax_after_topk": True, "renormalize": False}
    if style == "softmax-groups":
        extra = groups if groups else {"selection_bias": torch.zeros(E)}
        return {"renormalize": False, "routed_scaling": 0.5, "block_m": 2, **extra}
    if style == "given-ids":
        return {"expert_ids": torch.randint(0, E, (T, k), generator=gen), "block_m": 4}
    if style == "given-ids-sigmoid":
        ids = torch.randint(0, E, (T, k), generator=gen).to(torch.int32)
        return {"scoring": "sigmoid", "routed_scaling": 2.0, "expert_ids": ids, "block_m": 128}
    if style == "capacity":
        return {"capacity_factor": 1.0, "block_m": 4}
    if style == "capacity-tight":
        return {"renormalize": False, "capacity_factor": 0.5, "block_m": 1}
    raise ValueError(style)


def draw_pattern(pattern: str, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """(T, E) float64 logits of one pattern (see PATTERNS)."""
    x = torch.randn(T, E, generator=gen, dtype=torch.float64) * 2
    if pattern == "one-expert":
        x[:, E // 3] += 8
    elif pattern == "tied":
        x = torch.zeros(T, E, dtype=torch.float64)
    elif pattern == "integer":
        x = torch.randint(-2, 3, (T, E), generator=gen).double()
    elif pattern == "starved" and E > 1:
        x[:, (E + 1) // 2:] = -20.0
    elif pattern == "masked" and E > 1:
        x[:, (E + 1) // 2:] = float("-inf")
    elif pattern not in PATTERNS:
        raise ValueError(pattern)
    return x


def _near_tie(values, rel: float = 4e-6) -> bool:
    """Two keys distinct in float64 but close enough that float32 rounding could swap them."""
    v = sorted(x for x in values if not math.isnan(x))
    return any(0 < b - a <= rel * max(abs(a), abs(b)) for a, b in zip(v, v[1:]))


def _row_has_near_tie(keys_row, n_groups) -> bool:
    if _near_tie(keys_row):
        return True
    if n_groups:
        size = len(keys_row) // n_groups
        sums = [sum(sorted(keys_row[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_groups)]
        return _near_tie(sums)
    return False


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    E: int
    k: int
    style: str
    pattern: str = "randn"
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        parts = [f"T{self.T}", f"E{self.E}", f"k{self.k}", self.style]
        if self.pattern != "randn":
            parts.append(self.pattern)
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.layout != "contiguous":
            parts.append(self.layout)
        return "-".join(parts)

    def build(self, device):
        """(logits, route kwargs, incoming weight gradient), deterministic for the case. Where the
        selection key is computed (bias / groups), rows whose float64 keys hold a near tie that
        float32 rounding could resolve either way are redrawn: the selection is then exact."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        kwargs = style_kwargs(self.style, self.T, self.E, self.k, gen)
        x = draw_pattern(self.pattern, self.T, self.E, gen).to(self.dtype)
        if "expert_ids" not in kwargs and ("selection_bias" in kwargs or "n_groups" in kwargs):
            scoring = kwargs.get("scoring", "softmax")
            for t in range(self.T):
                for _ in range(200):
                    keys = routing_keys_ref(x[t:t + 1], scoring, kwargs.get("selection_bias"), kwargs.get("n_groups"))
                    if not _row_has_near_tie(keys[0].tolist(), kwargs.get("n_groups")):
                        break
                    x[t] = draw_pattern(self.pattern, 1, self.E, gen)[0].to(self.dtype)
                else:
                    raise AssertionError(f"{self.id}: could not draw a row without near ties")
        dw = torch.randn(self.T, self.k, generator=gen, dtype=torch.float64).float()
        logits = laid_out(x, self.layout).to(device)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return logits, kwargs, dw.to(device)


# ------------------------------------------------------------------------------------------------
# the test matrix
# ------------------------------------------------------------------------------------------------

SHAPES = [(T, E, k) for T in TOKENS for E in EXPERTS for k in valid_ks(E)]

CPU_CASES = [Case(T, E, k, style) for (T, E, k) in SHAPES for style in STYLES]
CPU_CASES += [Case(T, E, k, style, pattern) for pattern in PATTERNS[1:] for style in STYLES
              for (T, E, k) in ((5, 8, 2), (257, 61, 6), (5, 7, 7))]

#: the Triton interpreter's list: every T, E, k (1, 2, 6, E), style and pattern at least once
TRITON_CASES = [
    Case(5, 8, 2, "mixtral"),
    Case(257, 61, 6, "mixtral"),
    Case(1, 1, 1, "qwen3-nonorm"),
    Case(5, 128, 6, "qwen3-nonorm"),
    Case(257, 8, 2, "deepseek"),
    Case(5, 128, 128, "deepseek"),
    Case(1, 128, 1, "deepseek"),
    Case(5, 24, 6, "deepseek"),                       # groups of 3: the kernel's loop over groups
    Case(5, 7, 7, "sigmoid"),
    Case(0, 8, 2, "gptoss"),
    Case(5, 2, 2, "gptoss"),
    Case(5, 61, 61, "softmax-groups"),
    Case(5, 8, 6, "softmax-groups"),
    Case(257, 8, 8, "given-ids"),
    Case(5, 7, 6, "given-ids-sigmoid"),
    Case(257, 8, 2, "capacity"),
    Case(5, 8, 6, "capacity-tight"),
    Case(0, 1, 1, "capacity"),
]
TRITON_CASES += [Case(5, 8, 2, style, pattern) for pattern in PATTERNS[1:] for style in ("mixtral", "deepseek")]
TRITON_CASES += [Case(257, 61, 6, "capacity-tight", "one-expert"), Case(5, 7, 7, "sigmoid", "masked")]

#: storage dtypes and layouts, both backends
DTYPE_LAYOUT_CASES = [
    Case(5, 8, 2, "mixtral", dtype=torch.float16),
    Case(5, 8, 2, "deepseek", dtype=torch.bfloat16),
    Case(5, 8, 6, "qwen3-nonorm", dtype=torch.float64),
    Case(5, 61, 6, "deepseek", dtype=torch.float64),
    Case(5, 7, 2, "gptoss", dtype=torch.bfloat16),
    Case(5, 8, 2, "mixtral", layout="transposed"),
    Case(5, 8, 2, "deepseek", layout="sliced"),
    Case(257, 8, 2, "capacity-tight", layout="transposed"),
    Case(5, 8, 2, "mixtral", layout="expanded"),
    Case(5, 8, 6, "deepseek", layout="expanded"),
]
#: many token blocks, multi-step scans over the block histograms, many tiles, the most experts
LARGE_CASES = [
    Case(600, 128, 2, "capacity"),
    Case(3000, 8, 2, "capacity-tight"),
    Case(20, 1024, 8, "deepseek"),
    Case(3, 1024, 4, "qwen3-nonorm"),                  # 1024: mmkernels.ops.routing.MAX_EXPERTS
]
CPU_CASES += DTYPE_LAYOUT_CASES + LARGE_CASES
TRITON_CASES += DTYPE_LAYOUT_CASES + LARGE_CASES


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------

INT_FIELDS = ("expert_ids", "counts", "offsets", "sorted_slots", "slot_rows", "tile_experts", "tile_row_starts",
              "num_tiles")


def check_invariants(r, T: int, E: int, k: int, block_m: int, capacity: Optional[int], selected: bool = True):
    """What every Routing must satisfy, whatever the logits (NaN included): shapes and dtypes, ids
    in range, counts / offsets / drops consistent, the permutation is the stable sort of the slots
    by (dropped, expert) and its inverse inverts it, the tiles cover every kept row exactly once."""
    n = T * k
    max_tiles = n // block_m + min(E, n)
    shapes = {"weights": (T, k), "expert_ids": (T, k), "counts": (E,), "offsets": (E + 1,), "sorted_slots": (n,),
              "slot_rows": (n,), "dropped": (T, k), "tile_experts": (max_tiles,), "tile_row_starts": (max_tiles,),
              "num_tiles": (1,)}
    for name, shape in shapes.items():
        t = getattr(r, name)
        assert tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)}, expected {shape}"
        if name in INT_FIELDS:
            assert t.dtype == torch.int32, f"{name}: dtype {t.dtype}"
    assert r.dropped.dtype == torch.bool
    assert r.block_m == block_m and r.capacity == capacity
    assert (r.num_tokens, r.top_k, r.num_experts, r.max_tiles) == (T, k, E, max_tiles)

    ids = r.expert_ids.cpu().long()
    dropped = r.dropped.cpu()
    assert bool(((ids >= 0) & (ids < E)).all()), f"expert ids out of [0, {E}): {ids}"
    if selected and k > 1 and T:
        assert bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()), "a token chose one expert twice"
    counts, offsets = r.counts.cpu().long(), r.offsets.cpu().long()
    assert torch.equal(counts, torch.bincount(ids[~dropped], minlength=E)), "counts != kept slots per expert"
    assert int(counts.sum()) == n - int(dropped.sum())
    assert int(offsets[0]) == 0 and torch.equal(offsets.diff(), counts), "offsets are not the prefix sums"
    if capacity is None:
        assert not bool(dropped.any()), "a slot was dropped without a capacity"
    else:
        assert bool((counts <= capacity).all()), "an expert keeps more than its capacity"
        assert bool((counts[ids[dropped]] == capacity).all()), "a slot was dropped from an expert below capacity"

    perm, inv = r.sorted_slots.cpu().long(), r.slot_rows.cpu().long()
    assert torch.equal(perm.sort().values, torch.arange(n)), "sorted_slots is not a permutation of the slots"
    assert torch.equal(inv[perm], torch.arange(n)), "slot_rows does not invert sorted_slots"
    row_expert, row_dropped = ids.reshape(-1)[perm], dropped.reshape(-1)[perm]
    order = row_dropped.long() * (E + 1) * n + row_expert * n + perm    # (dropped, expert, slot)
    assert bool((order.diff() > 0).all()), "rows are not the stable sort of the slots by (dropped, expert)"
    assert not bool(row_dropped[: int(offsets[E])].any()) and bool(row_dropped[int(offsets[E]):].all())

    num = int(r.num_tiles.cpu()[0])
    assert num == sum(-(-int(c) // block_m) for c in counts), "num_tiles != Σ ceil(counts / block_m)"
    tile_e, tile_s = r.tile_experts.cpu().long(), r.tile_row_starts.cpu().long()
    assert bool((tile_e[num:] == -1).all()) and bool((tile_s[num:] == -1).all()), "tile entries past num_tiles"
    covered = []
    for e, s in zip(tile_e[:num].tolist(), tile_s[:num].tolist()):
        assert 0 <= e < E and offsets[e] <= s < offsets[e + 1], f"tile ({e}, {s}) outside its expert's rows"
        covered += range(s, min(s + block_m, int(offsets[e + 1])))
    assert covered == list(range(int(offsets[E]))), "the tiles do not cover every kept row exactly once"
    assert tile_e[:num].tolist() == sorted(tile_e[:num].tolist()), "tiles are not in expert order"


def check_against_reference(r, ref, backend: str, logits: torch.Tensor, rows=None):
    """Integer metadata exactly; weights within the (backend, weights dtype) tolerance. ``rows``:
    compare the weights of these tokens only."""
    for name in INT_FIELDS + ("dropped",):
        got, want = getattr(r, name).cpu(), ref[name]
        assert torch.equal(got, want), f"{name}:\n got {got.tolist()}\nwant {want.tolist()}"
    assert r.capacity == ref["capacity"] and r.max_tiles == ref["max_tiles"]
    want_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert r.weights.dtype == want_dtype and r.weights.device == logits.device
    got, want = r.weights, ref["weights"]
    if rows is not None:
        got, want = got[rows], want[rows]
    mt.assert_close(got, want, backend=backend, what="weights")


def _ref_kwargs(kwargs):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _weight_kwargs(kwargs):
    return {k: kwargs[k] for k in ("scoring", "renormalize", "routed_scaling", "softmax_after_topk") if k in kwargs}


# ------------------------------------------------------------------------------------------------
# forward and backward against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,case", backend_matrix({"cpu": CPU_CASES, "triton": TRITON_CASES}))
def test_route_against_reference(backend, device, case, poison_outputs):
    """Every output against the float64 reference (integers exactly), the invariants, and the
    gradient w.r.t. the logits, in one test; the logits are not mutated."""
    logits, kwargs, dw = case.build(device)
    before = logits.detach().clone()
    logits.requires_grad_()
    with mmkernels.use_backend(backend):
        r = moe.route(logits, case.k, **kwargs)
        r.weights.backward(dw)
    assert isinstance(r, moe.Routing)
    assert torch.equal(logits.detach(), before), "route mutated the logits"

    ref = route_ref(logits.detach(), case.k, **_ref_kwargs(kwargs))
    check_against_reference(r, ref, backend, logits)
    check_invariants(r, case.T, case.E, case.k, kwargs.get("block_m", 64), ref["capacity"],
                     selected="expert_ids" not in kwargs)

    leaf = logits.detach().cpu().clone().requires_grad_()
    routing_weights_ref(leaf, ref["expert_ids"], **_weight_kwargs(kwargs)).backward(dw.cpu().double())
    assert logits.grad is not None and logits.grad.dtype == case.dtype and logits.grad.shape == logits.shape
    mag = routing_grad_magnitude_ref(logits, ref["expert_ids"], dw, **_weight_kwargs(kwargs))
    mt.assert_close(logits.grad, leaf.grad, backend=backend, magnitude=mag, what="d(router_logits)")


def test_triton_matrix_covers_every_axis():
    """The interpreter's curated list still takes every T, E, k, style, pattern, dtype and layout."""
    seen = {axis: {getattr(c, axis) for c in TRITON_CASES} for axis in ("T", "E", "style", "pattern", "dtype", "layout")}
    assert seen["T"] >= set(TOKENS) and seen["E"] >= set(EXPERTS) and seen["style"] >= set(STYLES)
    assert seen["pattern"] >= set(PATTERNS)
    assert seen["dtype"] >= {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    assert seen["layout"] >= {"contiguous", "transposed", "sliced"}
    kinds = {("E" if c.k == c.E else c.k) for c in TRITON_CASES}
    assert kinds >= {1, 2, 6, "E"}


# ------------------------------------------------------------------------------------------------
# specific behaviours
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_all_tokens_prefer_one_expert_with_capacity(backend, device, poison_outputs):
    """Expert 3 is everyone's first choice: it keeps the first `capacity` tokens, the rest drop; the
    experts nobody chose get no rows and no tiles."""
    T, E, k = 10, 8, 1
    logits = torch.full((T, E), -5.0, device=device)
    logits[:, 3] = 5.0
    with mmkernels.use_backend(backend):
        r = moe.route(logits, k, capacity_factor=2.0, block_m=2)
    cap = math.ceil(2.0 * T * k / E)                      # 3
    assert r.capacity == cap == 3
    assert r.expert_ids.cpu().flatten().tolist() == [3] * T
    assert r.dropped.cpu().flatten().tolist() == [False] * cap + [True] * (T - cap)
    assert r.counts.cpu().tolist() == [0, 0, 0, cap, 0, 0, 0, 0]
    assert r.offsets.cpu().tolist() == [0, 0, 0, 0, cap, cap, cap, cap, cap]
    assert r.sorted_slots.cpu().tolist() == list(range(T))
    assert int(r.num_tiles.cpu()[0]) == 2
    assert r.tile_experts.cpu().tolist()[:3] == [3, 3, -1] and r.tile_row_starts.cpu().tolist()[:3] == [0, 2, -1]
    mt.assert_close(r.weights, torch.ones(T, k, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_ties_go_to_the_lower_expert(backend, device):
    """All-equal rows choose experts 0..k-1 in order, whatever the scoring; tied groups too."""
    logits = torch.zeros(3, 8, device=device)
    with mmkernels.use_backend(backend):
        for kwargs in ({}, {"scoring": "sigmoid"}, {"scoring": "sigmoid", "n_groups": 4, "topk_groups": 2},
                       {"selection_bias": torch.zeros(8, device=device)}, {"softmax_after_topk": True}):
            r = moe.route(logits, 3, **kwargs)
            assert r.expert_ids.cpu().tolist() == [[0, 1, 2]] * 3, kwargs
        # groups {0,1} {2,3} {4,5} {6,7}: groups 1 and 3 tie on the top-2 sum and beat the others
        # (bias lifts experts 3 and 7 by 0.5); topk_groups=1 keeps group 1, the lower of the tie
        bias = torch.tensor([0, 0, 0, 0.5, 0, 0, 0, 0.5], device=device)
        r = moe.route(logits, 2, scoring="sigmoid", selection_bias=bias, n_groups=4, topk_groups=1)
        assert r.expert_ids.cpu().tolist() == [[3, 2]] * 3


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_selection_bias_changes_only_the_selection(backend, device):
    """The biased selection's weights are those of the same experts given explicitly without bias,
    and the bias gets no gradient."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 16, generator=gen).to(device).requires_grad_()
    bias = (torch.randn(16, generator=gen) * 0.5).to(device).requires_grad_()
    kw = {"scoring": "sigmoid", "routed_scaling": 1.5, "n_groups": 4, "topk_groups": 2}
    with mmkernels.use_backend(backend):
        r = moe.route(logits, 3, selection_bias=bias, **kw)
        unbiased = moe.route(logits, 3, **kw)
        given = moe.route(logits, 3, expert_ids=r.expert_ids, scoring="sigmoid", routed_scaling=1.5)
        r.weights.sum().backward()
    assert not torch.equal(r.expert_ids, unbiased.expert_ids), "the bias should change this selection"
    torch.testing.assert_close(r.weights, given.weights, rtol=0, atol=0)
    assert bias.grad is None or not bool(bias.grad.any()), "the selection bias got a gradient"


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_softmax_after_topk_is_renormalised_softmax(backend, device):
    """gpt-oss's softmax over the top-k logits == Mixtral's renormalised top-k probabilities."""
    logits = torch.randn(9, 12, generator=torch.Generator().manual_seed(3)).to(device)
    with mmkernels.use_backend(backend):
        a = moe.route(logits, 4, softmax_after_topk=True, renormalize=False)
        b = moe.route(logits, 4, renormalize=True)
    assert torch.equal(a.expert_ids, b.expert_ids)
    mt.assert_close(a.weights, b.weights.double(), backend=backend)


def _strided_arguments():
    """(name, route kwargs with a non-contiguous tensor argument): each is read through its strides."""
    gen = torch.Generator().manual_seed(12)
    bias = torch.randn(16, generator=gen) * 0.5
    ids = torch.randint(0, 8, (3, 6), generator=gen)
    return [
        ("bias-sliced", {"scoring": "sigmoid", "selection_bias": bias[::2]}),
        ("bias-sliced-groups", {"selection_bias": bias[1::2], "n_groups": 4, "topk_groups": 2}),
        ("bias-expanded", {"scoring": "sigmoid", "selection_bias": bias[:1].expand(8)}),
        ("ids-transposed", {"expert_ids": ids.t()}),
        ("ids-sliced", {"expert_ids": torch.randint(0, 8, (6, 6), generator=gen)[::1, ::2]}),
    ]


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("name,kwargs", _strided_arguments(), ids=[n for n, _ in _strided_arguments()])
def test_strided_tensor_arguments(name, kwargs, backend, device, poison_outputs):
    """selection_bias and expert_ids of any strides give what their contiguous copies give."""
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(13)).to(device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with mmkernels.use_backend(backend):
        r = moe.route(logits, 3, **kwargs)
    ref = route_ref(logits, 3, **_ref_kwargs(kwargs))
    check_against_reference(r, ref, backend, logits)
    check_invariants(r, 6, 8, 3, 64, None, selected="expert_ids" not in kwargs)


# ------------------------------------------------------------------------------------------------
# NaN / inf logits
# ------------------------------------------------------------------------------------------------

def special_logits(E: int) -> torch.Tensor:
    x = torch.randn(8, E, generator=torch.Generator().manual_seed(E)) * 2
    x[0, E // 2] = float("nan")                   # one NaN
    x[1, :] = float("nan")                        # all NaN
    x[2, :] = float("-inf")                       # all -inf
    x[3, 0] = float("inf")                        # one +inf
    x[4, ::2] = float("-inf")                     # half masked: clean
    x[5, 1 % E] = float("nan")
    x[5, 2 % E] = float("-inf")
    x[5, 3 % E] = float("inf")
    return x                                      # rows 6, 7: clean


CLEAN_ROWS = [4, 6, 7]
NAN_SHAPES = [(8, 2), (8, 8), (61, 6)]


def _nan_params():
    out = []
    for b in backends(cpu_torch=True):
        name, device = b.values
        styles = STYLES if name == "cpu" else ("mixtral", "deepseek", "capacity-tight", "given-ids")
        shapes = NAN_SHAPES if name == "cpu" else NAN_SHAPES[:2]
        for style in styles:
            for E, k in shapes:
                out.append(pytest.param(name, device, style, E, k, id=f"{b.id}-E{E}-k{k}-{style}", marks=b.marks))
    return out


def _route_special(backend, device, style, E, k):
    x = special_logits(E)
    T = x.shape[0]
    kwargs = style_kwargs(style, T, E, k, torch.Generator().manual_seed(1))
    kwargs = {kk: v.to(device) if isinstance(v, torch.Tensor) else v for kk, v in kwargs.items()}
    logits = x.clone().to(device).requires_grad_()
    dw = torch.randn(T, k, generator=torch.Generator().manual_seed(2)).to(device)
    with mmkernels.use_backend(backend):
        r = moe.route(logits, k, **kwargs)
        r.weights.backward(dw)
    return x, logits, kwargs, dw, r, route_ref(x, k, **_ref_kwargs(kwargs))


@pytest.mark.parametrize("backend,device,style,E,k", _nan_params())
def test_nan_and_inf_logits(backend, device, style, E, k, poison_outputs):
    """NaN / ±inf logits never break the dispatch: ids in range, metadata consistent; the clean
    tokens' choices, weights and gradients are exactly the reference's."""
    x, logits, kwargs, dw, r, ref = _route_special(backend, device, style, E, k)
    check_invariants(r, x.shape[0], E, k, kwargs.get("block_m", 64), ref["capacity"],
                     selected="expert_ids" not in kwargs)
    assert torch.equal(r.expert_ids.cpu()[CLEAN_ROWS], ref["expert_ids"][CLEAN_ROWS])
    mt.assert_close(r.weights[CLEAN_ROWS], ref["weights"][CLEAN_ROWS], backend=backend, what="weights")

    leaf = x.clone().requires_grad_()
    routing_weights_ref(leaf, ref["expert_ids"], **_weight_kwargs(kwargs)).backward(dw.cpu().double())
    mag = routing_grad_magnitude_ref(x, ref["expert_ids"], dw, **_weight_kwargs(kwargs))
    mt.assert_close(logits.grad[CLEAN_ROWS], leaf.grad[CLEAN_ROWS], backend=backend, magnitude=mag[CLEAN_ROWS],
                    what="d(router_logits) of the clean tokens")


@pytest.mark.parametrize("backend,device,style,E,k", _nan_params())
def test_nan_keys_rank_below_everything(backend, device, style, E, k):
    """The spec's order on the special rows too: NaN keys below -inf, ties to the lower expert, so
    every choice and all the metadata equal the reference's."""
    x, logits, kwargs, dw, r, ref = _route_special(backend, device, style, E, k)
    check_against_reference(r, ref, backend, logits, rows=CLEAN_ROWS)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_nan_ranks_below_minus_inf_minimal(backend, device):
    """The smallest case: logits [0.5, NaN, -inf, 1.0], k = E = 4 -> [3, 0, 2, 1] (NaN last)."""
    x = torch.tensor([[0.5, float("nan"), float("-inf"), 1.0]], device=device)
    with mmkernels.use_backend(backend):
        for kwargs in ({}, {"scoring": "sigmoid"}, {"scoring": "sigmoid", "selection_bias": torch.zeros(4, device=device)}):
            assert moe.route(x, 4, **kwargs).expert_ids.cpu().tolist() == [[3, 0, 2, 1]], kwargs


# ------------------------------------------------------------------------------------------------
# gradcheck, torch.compile
# ------------------------------------------------------------------------------------------------

GRADCHECK_STYLES = {
    "mixtral": {},
    "qwen3-nonorm": {"renormalize": False},
    "deepseek": {"scoring": "sigmoid", "n_groups": 3, "topk_groups": 2, "routed_scaling": 2.5},
    "sigmoid": {"scoring": "sigmoid", "renormalize": False},
    "gptoss": {"softmax_after_topk": True},
}


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("style", list(GRADCHECK_STYLES))
def test_gradcheck_float64(style, backend, device):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64).to(device)
    xt = x.t().contiguous().t().requires_grad_()          # column-major storage
    kwargs = dict(GRADCHECK_STYLES[style])
    if style == "deepseek":
        kwargs["selection_bias"] = (torch.randn(6, generator=gen) * 0.1).to(device)
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: moe.route(t, 2, **kwargs).weights, (xt,))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """moe.route traces without graph breaks (cpu backend): weights.sum() and its gradient."""

    def f(x, bias):
        r = moe.route(x, 2, scoring="sigmoid", selection_bias=bias, n_groups=2, topk_groups=1, routed_scaling=2.0)
        return r.weights.sum()

    def g(x):
        return moe.route(x, 2).weights.sum()

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 8, generator=gen).requires_grad_()
    bias = torch.randn(8, generator=gen) * 0.1
    for fn, args in ((f, (bias,)), (g, ())):
        x.grad = None
        x2 = x.detach().clone().requires_grad_()
        with mmkernels.use_backend("cpu"):
            out = torch.compile(fn, fullgraph=True)(x, *args)
            out.backward()
            ref = fn(x2, *args)
            ref.backward()
        mt.assert_close(out, ref.detach().double(), backend="cpu")
        mt.assert_close(x.grad, x2.grad.double(), backend="cpu")


@pytest.mark.slow
def test_torch_compile_fullgraph_metadata():
    """The integer outputs come out of a fullgraph-compiled function equal to eager."""

    def f(x):
        r = moe.route(x, 2, capacity_factor=1.0, block_m=4)
        return r.weights, r.expert_ids, r.sorted_slots, r.slot_rows, r.tile_experts, r.num_tiles

    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(6))
    with mmkernels.use_backend("cpu"):
        got = torch.compile(f, fullgraph=True)(x)
        want = f(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _route(shape=(4, 8), k=2, **kw):
    return lambda: moe.route(torch.randn(*shape), k, **kw)


BAD_INPUT = [
    ("top_k>E", _route((4, 3), 4), ValueError, "top_k"),
    ("top_k=0", _route((4, 3), 0), ValueError, "top_k"),
    ("int-logits", lambda: moe.route(torch.ones(4, 8, dtype=torch.int64), 2), TypeError, "router_logits"),
    ("1d-logits", _route((8,), 2), ValueError, "router_logits"),
    ("3d-logits", _route((2, 4, 8), 2), ValueError, "router_logits"),
    ("bias-length", _route(selection_bias=torch.zeros(7)), ValueError, "selection_bias"),
    ("groups-not-dividing", _route(n_groups=3, topk_groups=1), ValueError, "n_groups"),
    ("groups-of-one", _route(k=1, n_groups=8, topk_groups=4), ValueError, "n_groups"),
    ("topk_groups-missing", _route(n_groups=2), ValueError, "topk_groups"),
    ("topk_groups=0", _route(n_groups=2, topk_groups=0), ValueError, "topk_groups"),
    ("topk_groups>n_groups", _route(n_groups=2, topk_groups=3), ValueError, "topk_groups"),
    ("top_k>kept-experts", _route(k=3, n_groups=4, topk_groups=1), ValueError, "top_k|topk_groups"),
    ("scoring", _route(scoring="relu"), ValueError, "scoring"),
    ("softmax_after_topk-sigmoid", _route(scoring="sigmoid", softmax_after_topk=True), ValueError,
     "softmax_after_topk"),
    ("ids-shape", _route(expert_ids=torch.zeros(4, 3, dtype=torch.int64)), ValueError, "expert_ids"),
    ("ids-float", _route(expert_ids=torch.zeros(4, 2)), (TypeError, ValueError), "expert_ids"),
    ("ids-too-big", _route(expert_ids=torch.full((4, 2), 8)), ValueError, "expert_ids"),
    ("ids-negative", _route(expert_ids=torch.full((4, 2), -1)), ValueError, "expert_ids"),
    ("capacity_factor=0", _route(capacity_factor=0.0), ValueError, "capacity_factor"),
    ("capacity_factor<0", _route(capacity_factor=-1.0), ValueError, "capacity_factor"),
    ("block_m=0", _route(block_m=0), ValueError, "block_m"),
    ("block_m=3", _route(block_m=3), ValueError, "block_m"),
    ("block_m=-4", _route(block_m=-4), ValueError, "block_m"),
    # beyond the list of the spec: other malformed arguments, same rule (a clear error naming them)
    ("no-experts", _route((4, 0), 1), ValueError, "router_logits|top_k"),
    ("bias-2d", _route(selection_bias=torch.zeros(1, 8)), ValueError, "selection_bias"),
    ("bias-int", _route(selection_bias=torch.zeros(8, dtype=torch.int64)), (TypeError, ValueError), "selection_bias"),
    ("ids-1d", _route(expert_ids=torch.zeros(8, dtype=torch.int64)), ValueError, "expert_ids"),
    ("ids-wrong-T", _route(expert_ids=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "expert_ids"),
    ("ids-bool", _route(expert_ids=torch.zeros(4, 2, dtype=torch.bool)), (TypeError, ValueError), "expert_ids"),
    ("n_groups=0", _route(n_groups=0, topk_groups=1), ValueError, "n_groups"),
    ("topk_groups-without-n_groups", _route(topk_groups=1), ValueError, "n_groups"),
    ("capacity_factor=nan", _route(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    ("capacity_factor=inf", _route(capacity_factor=float("inf")), ValueError, "capacity_factor"),
]


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("call,exc,match", [pytest.param(*p[1:], id=p[0]) for p in BAD_INPUT])
def test_bad_input(call, exc, match, backend, device):
    with mmkernels.use_backend(backend), pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# balancing losses and the aux-loss-free bias update
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("layers,masked", [(1, False), (3, False), (3, True)], ids=["1-layer", "3-layers", "3-masked"])
def test_load_balancing_loss(layers, masked, backend, device):
    """Value and gradient against the reference, for a tuple of layers (and a bare tensor as one layer)."""
    gen = torch.Generator().manual_seed(layers + 10 * masked)
    B, S, E, k = 2, 5, 8, 2
    gate = tuple(torch.randn(B * S, E, generator=gen).to(device).requires_grad_() for _ in range(layers))
    mask = (torch.rand(B, S, generator=gen) > 0.3).long().to(device) if masked else None
    if mask is not None:
        mask[0, 0] = 1
    arg = gate[0] if layers == 1 else gate
    with mmkernels.use_backend(backend):
        loss = moe.load_balancing_loss(arg, E, top_k=k, attention_mask=mask)
        loss.backward()
    leaves = tuple(g.detach().clone().requires_grad_() for g in gate)
    ref = load_balancing_loss_ref(leaves, E, top_k=k, attention_mask=mask)
    ref.backward()
    mt.assert_close(loss.reshape(()), ref.detach(), backend=backend, dtype=torch.float32, what="loss")
    for g, leaf in zip(gate, leaves):
        mt.assert_close(g.grad, leaf.grad, backend=backend, what="d(gate_logits)")


def test_load_balancing_loss_none_is_zero():
    assert float(moe.load_balancing_loss(None, 8)) == 0.0


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_router_z_loss(dtype, backend, device):
    logits = (torch.randn(13, 7, generator=torch.Generator().manual_seed(4)) * 3).to(device, dtype).requires_grad_()
    with mmkernels.use_backend(backend):
        z = moe.router_z_loss(logits)
        z.backward()
    leaf = logits.detach().clone().requires_grad_()
    ref = router_z_loss_ref(leaf)
    ref.backward()
    mt.assert_close(z.reshape(()), ref.detach(), backend=backend, dtype=torch.float32, what="z loss")
    mt.assert_close(logits.grad, leaf.grad, backend=backend, what="d(logits)")


def test_update_selection_bias():
    """In place: underloaded experts up by rate, overloaded down, exactly-average ones unchanged."""
    bias = torch.tensor([0.5, 0.5, 0.5, 0.5, -1.0])
    counts = torch.tensor([1, 5, 3, 3, 3], dtype=torch.int32)        # mean 3
    out = moe.update_selection_bias(bias, counts, rate=0.25)
    assert out is bias
    assert bias.tolist() == [0.75, 0.25, 0.5, 0.5, -1.0]
    moe.update_selection_bias(bias, counts)                            # default rate 1e-3
    torch.testing.assert_close(bias, torch.tensor([0.751, 0.249, 0.5, 0.5, -1.0]), rtol=0, atol=1e-7)


def test_update_selection_bias_from_routing():
    """The DeepSeek-V3 loop: the counts of a routing move the bias towards balance."""
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(9))
    logits[:, 0] += 3                                                  # expert 0 overloaded
    bias = torch.zeros(8)
    r = moe.route(logits, 2, scoring="sigmoid", selection_bias=bias)
    moe.update_selection_bias(bias, r.counts, rate=0.01)
    assert bias[0] == -0.01
    mean = r.counts.float().mean()
    assert torch.equal(torch.sign(bias), torch.sign(mean - r.counts.float()))
