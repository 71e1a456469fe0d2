"""MoE routing: router scores -> top-k -> renormalisation -> exact dispatch metadata.

Order in this file: the :class:`Routing` result and its options -> argument checks -> Triton
launchers -> CPU path -> torch.library ops -> autograd.Function -> public functionals (``route``
and the balancing losses). Kernels live in ``triton_kernels/routing.py``
(``mmkernels._triton.routing``).

One routing is three launches on the Triton path, none of which waits on the host:

1. ``route_topk_kernel`` — per block of tokens: scores, top-k, weights, per-block expert
   histogram and each slot's rank among the block's slots of its expert;
2. ``route_scan_kernel`` (a program per 16 experts) — prefix sums down the block histograms; the
   last program to finish makes the per-expert counts, offsets, capacity drops and tile counts;
3. ``route_scatter_kernel`` — the stable scatter (``sorted_slots`` and its inverse) and the tile
   table of the grouped GEMM.

When the tokens fit one router block (decode: up to 64 tokens at 8 experts, 16 at 128), it is one
launch, ``route_block_kernel``: the same three steps in one program, with a barrier where the
launches would end, and no scan (one block's ranks are the slots' ranks).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._launch import Launch
from mmkernels.ops._util import acc_dtype, cdiv, math_dtype, next_pow2

#: Row block of the grouped GEMM that the default tile table is made for.
DEFAULT_BLOCK_M = 64
#: Largest number of experts one router kernel holds on chip (a row of logits per token).
MAX_EXPERTS = 1024
_SCORINGS = ("softmax", "sigmoid")
#: Added to the renormalisation denominator of sigmoid scores, as DeepSeek-V3 does.
SIGMOID_RENORM_EPS = 1e-20
#: The capacity the kernels take for dropless routing (no expert reaches it).
NO_CAPACITY = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Routing:
    """The result of :func:`route` for ``T`` tokens, ``E`` experts and ``k`` experts per token.

    A *slot* is one (token, choice) pair; slot ``s = t·k + j`` is token ``t``'s ``j``-th choice
    (``0 <= j < k``, choices in descending selection score, ties to the lower expert index).
    Rows ``0 .. offsets[E]`` of the expert-ordered view are the kept slots grouped by expert in
    token order; rows ``offsets[E] .. T·k`` hold the slots dropped by the capacity, grouped by
    expert in token order too. Every tensor lives on the logits' device and is produced there
    without a host synchronisation.
    """

    #: (T, k) float32 (float64 for float64 logits): the weight of each choice, after
    #: renormalisation and ``routed_scaling``. Differentiable w.r.t. ``router_logits``.
    weights: torch.Tensor
    #: (T, k) int32: the expert of each choice, in ``[0, E)``; the experts of one token are distinct
    #: when selected here (caller-supplied ``expert_ids`` are kept as given).
    expert_ids: torch.Tensor
    #: (E,) int32: slots each expert keeps (after capacity drops); sums to ``offsets[E]``.
    counts: torch.Tensor
    #: (E + 1,) int32: exclusive prefix sums of ``counts``; expert ``e`` owns rows
    #: ``offsets[e] .. offsets[e+1]`` of the expert-ordered view; ``offsets[E]`` = slots kept.
    offsets: torch.Tensor
    #: (T·k,) int32: the flat slot at each row of the expert-ordered view — the stable sort of the
    #: slots by (dropped, expert). Token of row ``r``: ``sorted_slots[r] // k``.
    sorted_slots: torch.Tensor
    #: (T·k,) int32: the inverse permutation: ``slot_rows[sorted_slots[r]] == r``; the row of slot
    #: ``s`` in the expert-ordered view.
    slot_rows: torch.Tensor
    #: (T, k) bool: the choices dropped by the capacity (all False when dropless).
    dropped: torch.Tensor
    #: (max_tiles,) int32: the expert of each ``block_m``-row tile of the kept rows, -1 past
    #: ``num_tiles`` (a grouped GEMM launched over ``max_tiles`` programs exits on -1).
    tile_experts: torch.Tensor
    #: (max_tiles,) int32: first row of each tile in the expert-ordered view (-1 past
    #: ``num_tiles``); a tile covers rows ``start .. min(start + block_m, offsets[e + 1])``.
    tile_row_starts: torch.Tensor
    #: (1,) int32: tiles in use, ``Σ_e ceil(counts[e] / block_m)``.
    num_tiles: torch.Tensor
    #: rows per tile of the tile table.
    block_m: int
    #: per-expert slot limit, ``None`` when dropless.
    capacity: Optional[int]

    @property
    def num_tokens(self) -> int:
        return self.weights.shape[0]

    @property
    def top_k(self) -> int:
        return self.weights.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def max_tiles(self) -> int:
        return self.tile_experts.shape[0]


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound of ``Σ_e ceil(c_e / block_m)`` over counts summing to ``num_slots``: the length of
    the tile table, known from shapes alone (no host synchronisation)."""
    return num_slots // block_m + min(num_experts, num_slots)


def suggest_block_m(num_tokens: int, num_experts: int, top_k: int) -> int:
    """The routing tile height for the expert GEMMs of :func:`mmkernels.moe.experts` on a GPU, from
    the average rows per expert ``T·k/E``: 128 from 512 rows on (the tiles that measured fastest
    at T = 16384 on an H200, bench/NOTES.md), 64 from 48, else 16 (decode: tiles mostly rows of
    padding waste tensor-core work; the weight loads are the cost)."""
    avg = num_tokens * top_k / max(1, num_experts)
    return 128 if avg >= 512 else 64 if avg >= 48 else 16


def capacity_for(capacity_factor: Optional[float], num_tokens: int, top_k: int, num_experts: int) -> Optional[int]:
    """``ceil(capacity_factor · T · k / E)``, or ``None`` (dropless) when ``capacity_factor`` is None."""
    if capacity_factor is None:
        return None
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """How scores, selection and weights are computed (everything of :func:`route` but the data)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    #: select on ``scores + selection_bias`` (or grouped scores), else on the logits themselves
    key_on_scores: bool = False

    @property
    def sigmoid(self) -> bool:
        return self.scoring == "sigmoid"

    @property
    def grouped(self) -> bool:
        return self.n_groups > 1


# ----------------------------------------------------------------------------------------------
# Config resolver
# ----------------------------------------------------------------------------------------------

#: Elements of the ``[BLOCK_T, E_PAD]`` logit tile one router program aims for (half for fp64):
#: rows of up to :data:`NARROW_ROWS` padded experts take 2048 (16 tokens at E = 128: 20-25% faster
#: than 8 on an H100, bench/NOTES.md; spill-free on sm_80 / sm_90), wider rows 1024 (2048 spilled
#: 8 bytes on sm_90 at E_PAD = 256 and 1024 with top-8).
TARGET_TILE = 2048
WIDE_TARGET_TILE = 1024
NARROW_ROWS = 128
#: Elements of one step of the scan over the block histograms, its most rows a step (the compile
#: tier showed a 4096x2 step spilling: the scan runs along the rows) and experts per scan program.
SCAN_TILE = 4096
SCAN_MAX_ROWS = 256
SCAN_EXPERTS = 16
#: Tiles of the tile table filled per scatter program.
TILE_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Launch configuration of one routing: the router / scatter / backward token block, warps,
    and the scan's step (``chunk_b`` blocks by ``scan_cols`` experts)."""

    block_t: int
    e_pad: int
    k_pad: int
    num_warps: int
    chunk_b: int
    scan_cols: int
    scan_warps: int = 4

    @property
    def tile(self) -> int:
        return self.block_t * self.e_pad


@functools.lru_cache(maxsize=None)
def resolve_config(T: int, E: int, K: int, f64: bool = False) -> RoutingConfig:
    """Token block so that one program holds about :data:`TARGET_TILE` logits (:data:`WIDE_TARGET_TILE`
    past :data:`NARROW_ROWS` experts; at most 64 tokens, at least one, no more than the tokens
    there are) and at most 8 warps. The router keeps about six tile-shaped values live: the compile
    tier showed small spills on sm_90 with 2048-element tiles of 256 or more experts at 8 per
    thread (ptxas held those kernels to 80 registers), and with 16 warps (64 registers); the scan
    takes :data:`SCAN_TILE` histogram entries a step."""
    e_pad, k_pad = next_pow2(E), next_pow2(K)
    target = (TARGET_TILE if e_pad <= NARROW_ROWS else WIDE_TARGET_TILE) // (2 if f64 else 1)
    block_t = max(1, min(64, target // e_pad, next_pow2(max(T, 1))))
    tile = block_t * e_pad
    num_warps = max(1, min(8, tile * (2 if f64 else 1) // 128))
    scan_cols = min(e_pad, SCAN_EXPERTS)
    chunk_b = max(1, min(SCAN_MAX_ROWS, SCAN_TILE // scan_cols))
    return RoutingConfig(block_t, e_pad, k_pad, num_warps, chunk_b, scan_cols)


def launch_configs():
    """Representative ``RoutingConfig`` s for the compile tier: every expert-count class the resolver
    distinguishes (powers of two up to :data:`MAX_EXPERTS`), with top-k 1, 8 and E."""
    seen = set()
    for e_pad in (1, 2, 8, 64, 128, 256, 1024, MAX_EXPERTS):
        for k in sorted({1, min(8, e_pad), e_pad}):
            for T in (1, 1 << 20):
                for f64 in (False, True):
                    cfg = resolve_config(T, e_pad, k, f64)
                    if cfg not in seen:
                        seen.add(cfg)
                        yield cfg


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_route_args(router_logits, top_k, scoring, renormalize, selection_bias, n_groups, topk_groups,
                      routed_scaling, softmax_after_topk, capacity_factor, expert_ids, block_m) -> RouterSpec:
    _check_tensor("router_logits", router_logits)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D (tokens, experts), got shape {tuple(router_logits.shape)}")
    if router_logits.dtype not in _FLOATS:
        raise TypeError(f"router_logits must be float16, bfloat16, float32 or float64, got {router_logits.dtype}")
    T, E = router_logits.shape
    if E < 1:
        raise ValueError("router_logits must have at least one expert column (E >= 1)")
    if E > MAX_EXPERTS:
        raise ValueError(f"router_logits has E={E} experts; at most {MAX_EXPERTS} are supported")
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..E={E}, got {top_k}")
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
    if softmax_after_topk and scoring != "softmax":
        raise ValueError("softmax_after_topk=True needs scoring='softmax' (it is a softmax over the chosen logits)")
    # abs(v) < inf, not math.isfinite(v): torch.compile may hand a module's float in as a SymFloat
    if not isinstance(routed_scaling, (int, float)) or isinstance(routed_scaling, bool) \
            or not abs(routed_scaling) < math.inf:
        raise TypeError(f"routed_scaling must be a finite number, got {routed_scaling!r}")
    if selection_bias is not None:
        _check_tensor("selection_bias", selection_bias)
        if selection_bias.shape != (E,):
            raise ValueError(f"selection_bias must have shape (E,) = ({E},), got {tuple(selection_bias.shape)}")
        if selection_bias.dtype not in _FLOATS:
            raise TypeError(f"selection_bias must be a floating-point tensor, got {selection_bias.dtype}")
        if selection_bias.device != router_logits.device:
            raise ValueError(f"selection_bias must be on router_logits' device {router_logits.device}, "
                             f"got {selection_bias.device}")
    groups, kept_groups = 1, 1
    if n_groups is not None or topk_groups is not None:
        if n_groups is None or topk_groups is None:
            raise ValueError("group-limited routing needs both n_groups and topk_groups")
        if not (_is_int(n_groups) and _is_int(topk_groups)):
            raise TypeError("n_groups and topk_groups must be ints")
        if n_groups < 1 or E % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide the number of experts E={E}")
        if n_groups > 1 and E // n_groups < 2:
            raise ValueError(f"each group needs at least 2 experts for its top-2 group score; "
                             f"E={E} in n_groups={n_groups} gives {E // n_groups}")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be in 1..n_groups={n_groups}, got {topk_groups}")
        if top_k > topk_groups * (E // n_groups):
            raise ValueError(f"top_k={top_k} is more than the {topk_groups * (E // n_groups)} experts of "
                             f"topk_groups={topk_groups} groups of {E // n_groups}")
        groups, kept_groups = n_groups, topk_groups
    if capacity_factor is not None:
        if not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool):
            raise TypeError(f"capacity_factor must be a number or None, got {capacity_factor!r}")
        if not 0 < capacity_factor < math.inf:
            raise ValueError(f"capacity_factor must be a positive finite number, got {capacity_factor}")
    if not _is_int(block_m) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m!r}")
    if expert_ids is not None:
        _check_tensor("expert_ids", expert_ids)
        if expert_ids.shape != (T, top_k):
            raise ValueError(f"expert_ids must have shape (T, top_k) = ({T}, {top_k}), got {tuple(expert_ids.shape)}")
        if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
            raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
        if expert_ids.device != router_logits.device:
            raise ValueError(f"expert_ids must be on router_logits' device {router_logits.device}, got {expert_ids.device}")
        if expert_ids.numel():
            if expert_ids.device.type == "cpu" and not torch.compiler.is_compiling():
                lo, hi = int(expert_ids.min()), int(expert_ids.max())
                if lo < 0 or hi >= E:
                    raise ValueError(f"expert_ids must lie in [0, E={E}), got values in [{lo}, {hi}]")
            else:  # no host read (a graph break, a device sync): an assert in the graph, as torch's indexing does
                torch._assert_async(((expert_ids >= 0) & (expert_ids < E)).all(),
                                    f"expert_ids must lie in [0, E={E})")
    return RouterSpec(top_k=top_k, scoring=scoring, renormalize=bool(renormalize or softmax_after_topk), n_groups=groups,
                      topk_groups=kept_groups, routed_scaling=float(routed_scaling),
                      key_on_scores=selection_bias is not None or n_groups is not None)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """Everything of one routing's launches that follows from shapes and options alone, made once
    per key (:func:`route_plan`) so that a call only allocates and launches: the grids, the
    launches' constant arguments, the tile table's length and the split of the scratch
    workspace (rank, block histograms and bases, totals, the done counter, drop bases, tile ends)."""

    weights_dtype: torch.dtype
    n_tiles: int
    scratch: Tuple[int, ...]
    topk: Launch
    scan: Launch
    scatter: Launch
    #: The three above in one program when the tokens fit one block (``route_block_kernel``), else None.
    block: Optional[Launch]
    bwd: Launch
    #: The backward reading the experts' partial sums of the weights' gradient (a MoE layer's node).
    bwd_partials: Launch


#: The runtime arguments of each routing kernel's launches (:class:`~mmkernels.ops._launch.Launch`).
_TOPK_ARGS = ("logits_ptr", "bias_ptr", "ids_in_ptr", "weights_ptr", "ids_ptr", "rank_ptr", "hist_ptr", "done_ptr",
              "s_lt", "s_le", "s_it", "s_ij", "s_b")
_SCAN_ARGS = ("hist_ptr", "base_ptr", "total_ptr", "done_ptr", "counts_ptr", "offsets_ptr", "drop_base_ptr",
              "tile_end_ptr", "num_tiles_ptr")
_SCATTER_ARGS = ("ids_ptr", "rank_ptr", "base_ptr", "offsets_ptr", "drop_base_ptr", "tile_end_ptr", "num_tiles_ptr",
                 "sorted_ptr", "slot_rows_ptr", "dropped_ptr", "tile_expert_ptr", "tile_start_ptr")
_BLOCK_ARGS = ("logits_ptr", "bias_ptr", "ids_in_ptr", "weights_ptr", "ids_ptr", "counts_ptr", "offsets_ptr",
               "sorted_ptr", "slot_rows_ptr", "dropped_ptr", "tile_expert_ptr", "tile_start_ptr", "num_tiles_ptr",
               "drop_base_ptr", "tile_end_ptr", "s_lt", "s_le", "s_it", "s_ij", "s_b")
_BWD_ARGS = ("logits_ptr", "ids_ptr", "dw_ptr", "dl_ptr", "slot_rows_ptr", "offsets_ptr", "NB_P", "s_lt", "s_le",
             "s_dt", "s_dj")


@functools.lru_cache(maxsize=256)
def route_plan(T: int, E: int, spec: RouterSpec, cap: int, block_m: int, dtype: torch.dtype, has_bias: bool,
               given_ids: bool, config: Optional[RoutingConfig] = None) -> RoutePlan:
    """The :class:`RoutePlan` of routing ``T`` x ``E`` logits of ``dtype`` (``config``: the
    resolver's when None)."""
    k = spec.top_k
    cfg = config or resolve_config(T, E, k, dtype == torch.float64)
    nb = cdiv(T, cfg.block_t)
    n_tiles = max_tiles(T * k, E, block_m)
    acc = acc_dtype(dtype)
    rows = dict(BLOCK_T=cfg.block_t, E_PAD=cfg.e_pad, K_PAD=cfg.k_pad, num_warps=cfg.num_warps)
    scores = dict(scaling=spec.routed_scaling, SCORING=int(spec.sigmoid), RENORM=spec.renormalize,
                  EPS=SIGMOID_RENORM_EPS, ACC=acc)
    group_size, g_pad = E // spec.n_groups, next_pow2(spec.n_groups) if spec.grouped else 1
    topk = dict(T=T, E=E, K=k, N_GROUPS=spec.n_groups, GROUP_SIZE=group_size, TOPK_GROUPS=spec.topk_groups,
                KEY_ON_SCORES=spec.key_on_scores, HAS_BIAS=has_bias,
                G_PAD=g_pad, GROUP_TILE=group_size if g_pad * group_size == cfg.e_pad and spec.grouped else 0,
                GIVEN_IDS=given_ids, **rows, **scores)
    scan = dict(NB=nb, E=E, CAP=cap, E_PAD=cfg.e_pad, EB=cfg.scan_cols, CHUNK_B=cfg.chunk_b, BLOCK_M=block_m,
                num_warps=cfg.scan_warps)
    scatter = dict(T=T, E=E, K=k, CAP=cap, MAX_TILES=n_tiles, TILE_CHUNK=TILE_CHUNK, BLOCK_M=block_m, **rows)
    from mmkernels._triton import routing as K

    return RoutePlan(
        weights_dtype=math_dtype(dtype), n_tiles=n_tiles, scratch=(T * k, nb * E, nb * E, E, 1, E, E),
        topk=Launch(K, "route_topk_kernel", (nb,), _TOPK_ARGS, topk),
        scan=Launch(K, "route_scan_kernel", (cdiv(E, cfg.scan_cols),), _SCAN_ARGS, scan),
        scatter=Launch(K, "route_scatter_kernel", (max(nb, cdiv(n_tiles, TILE_CHUNK)),), _SCATTER_ARGS, scatter),
        block=(Launch(K, "route_block_kernel", (1,), _BLOCK_ARGS,
                      dict(topk, CAP=cap, MAX_TILES=n_tiles, TILE_CHUNK=TILE_CHUNK, BLOCK_M=block_m))
               if nb == 1 else None),
        bwd=Launch(K, "route_bwd_kernel", (nb,), _BWD_ARGS, dict(T=T, E=E, K=k, PARTIALS=False, **rows, **scores)),
        bwd_partials=Launch(K, "route_bwd_kernel", (nb,), _BWD_ARGS,
                            dict(T=T, E=E, K=k, PARTIALS=True, **rows, **scores)))


def triton_route(logits, bias, ids_in, spec: RouterSpec, cap: int, block_m: int,
                  config: Optional[RoutingConfig] = None):
    """The routing's launches (:func:`launch_route`); returns the tensors of :class:`Routing` in field order."""
    T, E = logits.shape
    k = spec.top_k
    p = route_plan(T, E, spec, cap, block_m, logits.dtype, bias is not None, ids_in is not None, config)
    ids = logits.new_empty((T, k), dtype=torch.int32)
    # 1-D int32 outputs from ids (new_empty of a length, no dtype: the cheapest allocation call)
    outs = (logits.new_empty((T, k), dtype=p.weights_dtype),     # weights
            ids,                                                # ids
            ids.new_empty(E),                                   # counts
            ids.new_empty(E + 1),                               # offsets
            ids.new_empty(T * k),                               # sorted_slots
            ids.new_empty(T * k),                               # slot_rows
            logits.new_empty((T, k), dtype=torch.bool),         # dropped
            ids.new_empty(p.n_tiles),                           # tile_experts
            ids.new_empty(p.n_tiles),                           # tile_row_starts
            ids.new_empty(1))                                   # num_tiles
    # one workspace for the scratch; the done counter is zeroed by the router kernel
    launch_route(p, logits, bias, ids_in, *outs, *ids.new_empty(sum(p.scratch)).split_with_sizes(p.scratch))
    return outs


def launch_route(p: RoutePlan, logits, bias, ids_in, weights, ids, counts, offsets, sorted_slots, slot_rows, dropped,
                 tile_experts, tile_row_starts, num_tiles, rank, hist, base, total, done, drop_base, tile_end) -> None:
    """The routing launches of plan ``p`` (three, or one when the tokens fit one block:
    ``p.block``) into given tensors: the :class:`Routing` fields (``weights`` .. ``num_tiles``;
    only their data pointers count, 1-D views do) and the scratch (``p.scratch`` elements each:
    ``rank`` .. ``tile_end``; the one-block launch uses ``drop_base`` and ``tile_end`` only)."""
    given = ids_in is not None
    if p.block is not None:
        p.block(logits, bias if bias is not None else logits, ids_in if given else ids, weights, ids, counts, offsets,
                sorted_slots, slot_rows, dropped, tile_experts, tile_row_starts, num_tiles, drop_base, tile_end,
                *logits.stride(), *(ids_in.stride() if given else (p.topk.bound["K"], 1)),
                bias.stride(0) if bias is not None else 1)
        return
    p.topk(logits, bias if bias is not None else logits, ids_in if given else ids, weights, ids, rank, hist, done,
           *logits.stride(), *(ids_in.stride() if given else (p.topk.bound["K"], 1)),
           bias.stride(0) if bias is not None else 1)
    p.scan(hist, base, total, done, counts, offsets, drop_base, tile_end, num_tiles)
    p.scatter(ids, rank, base, offsets, drop_base, tile_end, num_tiles, sorted_slots, slot_rows, dropped, tile_experts,
              tile_row_starts)


def triton_route_backward(grad_weights, logits, ids, spec: RouterSpec,
                           config: Optional[RoutingConfig] = None) -> torch.Tensor:
    T, E = logits.shape
    p = route_plan(T, E, spec, NO_CAPACITY, DEFAULT_BLOCK_M, logits.dtype, False, False, config)
    return launch_route_backward(p, grad_weights, logits, ids,
                                 torch.empty((T, E), dtype=logits.dtype, device=logits.device))


def launch_route_backward(p: RoutePlan, grad_weights, logits, ids, dl: torch.Tensor) -> torch.Tensor:
    """d logits into ``dl`` (contiguous (T, E), the logits' dtype) from d weights, plan ``p``."""
    p.bwd(logits, ids, grad_weights, dl, ids, ids, 0, *logits.stride(), *grad_weights.stride())
    return dl


def launch_route_backward_from_partials(p: RoutePlan, partials, n_partials: int, slot_rows, offsets, logits, ids,
                                        dl: torch.Tensor) -> torch.Tensor:
    """As :func:`launch_route_backward`, with the weights' gradient given as the experts' partial
    sums: ``n_partials`` per routed row in routing order (``slot_rows`` / ``offsets`` of the
    routing; dropped slots get 0). One launch where the experts' reduction and this would be two;
    the same bits."""
    p.bwd_partials(logits, ids, partials, dl, slot_rows, offsets, n_partials, *logits.stride(), 0, 0)
    return dl


# ----------------------------------------------------------------------------------------------
# CPU path (vectorised torch; the same math and the same tie rules as the kernels)
# ----------------------------------------------------------------------------------------------

def _scores(l: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return torch.sigmoid(l) if sigmoid else torch.softmax(l, dim=-1)


def _best_first(key: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Column order per row: allowed columns first, then by descending key (NaN after -inf), ties
    to the lower column."""
    nan = torch.isnan(key)
    order = torch.sort(torch.where(nan, float("-inf"), key), dim=-1, descending=True, stable=True).indices
    later = [nan] if allowed is None else [nan, ~allowed]  # each stable pass keeps the order before it
    for flag in later:
        order = order.gather(-1, torch.sort(flag.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
    return order


def _top_k(key: torch.Tensor, k: int, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first ``k`` columns of :func:`_best_first`: ``torch.topk`` (whose order among equal
    keys is unspecified), and the full stable sort only for the rows where a tie could matter (a
    repeated value among the chosen, or the k-th value also outside them). On CPU tensors the
    check's host read costs nothing."""
    cpp = _cpp.ops() if key.device.type == "cpu" and key.dtype in (torch.float32, torch.float64) else None
    if cpp is not None:  # csrc/routing.cpp: one insertion pass per row, the same order
        return cpp.top_k_ids(key, k, allowed)
    clean = torch.where(torch.isnan(key), float("-inf"), key)
    if allowed is not None:
        clean = torch.where(allowed, clean, float("-inf"))
    vals, ids = torch.topk(clean, k, dim=-1)
    tied = (clean >= vals[:, -1:]).sum(-1) != k
    if k > 1:
        tied |= (vals[:, 1:] == vals[:, :-1]).any(-1)
    rows = tied.nonzero().flatten()
    if rows.numel():
        ids[rows] = _best_first(key[rows], None if allowed is None else allowed[rows])[:, :k]
    return ids


def _cpu_select(l: torch.Tensor, bias, spec: RouterSpec) -> torch.Tensor:
    if not spec.key_on_scores:
        return _top_k(l, spec.top_k)
    key = _scores(l, spec.sigmoid)
    if bias is not None:
        key = key + bias.to(key.dtype)
    allowed = None
    if spec.grouped:
        T, E = key.shape
        clean = torch.where(torch.isnan(key), float("-inf"), key)
        gscore = clean.view(T, spec.n_groups, E // spec.n_groups).topk(2, dim=-1).values.sum(-1)
        kept = _top_k(gscore, spec.topk_groups)
        gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, kept, True)
        allowed = gmask.repeat_interleave(E // spec.n_groups, dim=1)
    return _top_k(key, spec.top_k, allowed)


def _cpu_weights(l: torch.Tensor, ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    lsel = l.gather(1, ids)
    if spec.sigmoid:
        w = torch.sigmoid(lsel)
        if spec.renormalize:
            w = w / (w.sum(-1, keepdim=True) + SIGMOID_RENORM_EPS)
    elif spec.renormalize:
        w = torch.softmax(lsel, dim=-1)
    else:
        w = torch.softmax(l, dim=-1).gather(1, ids)
    return w * spec.routed_scaling


def _metadata(ids: torch.Tensor, E: int, cap: int, block_m: int):
    """Counting-sort metadata of the (T, k) choices: the fields of :class:`Routing` after ``expert_ids``."""
    T, k = ids.shape
    dev = ids.device
    flat = ids.reshape(-1).long()
    n = flat.numel()
    order = torch.sort(flat, stable=True).indices
    total = torch.bincount(flat, minlength=E)
    first = torch.cumsum(total, 0) - total
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(n, device=dev) - first[flat[order]]
    kept_n = torch.clamp(total, max=cap)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(kept_n, 0)
    drops = total - kept_n
    drop_base = torch.cumsum(drops, 0) - drops + offsets[E]
    kept = rank < cap
    rows = torch.where(kept, offsets[flat] + rank, drop_base[flat] + rank - cap)
    sorted_slots = torch.empty_like(flat)
    sorted_slots[rows] = torch.arange(n, device=dev)
    tiles = (kept_n + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = max_tiles(n, E, block_m)
    idx = torch.arange(n_tiles, device=dev)
    te = torch.clamp(torch.searchsorted(tile_end, idx, right=True), max=E - 1)
    use = idx < tile_end[-1]
    start = offsets[te] + (idx - (tile_end[te] - tiles[te])) * block_m
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return (i32(kept_n), i32(offsets), i32(sorted_slots), i32(rows), (~kept).view(T, k),
            i32(torch.where(use, te, -1)), i32(torch.where(use, start, -1)), i32(tile_end[-1:]))


def _cpu_route(logits, bias, ids_in, spec: RouterSpec, cap: int, block_m: int):
    l = logits.to(math_dtype(logits.dtype))
    cpp = _cpp.ops()  # csrc/routing.cpp when built: one-pass router, counting sort; else torch
    if cpp is not None and ids_in is None and not spec.key_on_scores and not spec.sigmoid:
        weights, ids = cpp.route_softmax_topk(l, spec.top_k, spec.renormalize, float(spec.routed_scaling))
    else:
        ids = ids_in.long() if ids_in is not None else _cpu_select(l, bias, spec)
        weights = _cpu_weights(l, ids, spec)
    meta = (tuple(cpp.route_metadata(ids, logits.shape[1], cap, block_m)) if cpp is not None
            else _metadata(ids, logits.shape[1], cap, block_m))
    return (weights, ids.to(torch.int32)) + meta


def _cpu_route_backward(grad_weights, logits, ids, spec: RouterSpec) -> torch.Tensor:
    l = logits.to(math_dtype(logits.dtype))
    ids = ids.long()
    g = grad_weights.to(l.dtype) * spec.routed_scaling
    lsel = l.gather(1, ids)
    if spec.sigmoid:
        s = torch.sigmoid(lsel)
        if spec.renormalize:
            denom = s.sum(-1, keepdim=True) + SIGMOID_RENORM_EPS
            dsel = (g - (g * s).sum(-1, keepdim=True) / denom) / denom
        else:
            dsel = g
        dsel = dsel * s * (1 - s)
    elif spec.renormalize:
        q = torch.softmax(lsel, dim=-1)
        dsel = q * (g - (q * g).sum(-1, keepdim=True))
    else:
        dsel = g
    dense = torch.zeros_like(l).scatter_add_(1, ids, dsel)
    if not spec.sigmoid and not spec.renormalize:
        p = torch.softmax(l, dim=-1)
        dense = p * (dense - (p * dense).sum(-1, keepdim=True))
    return dense.to(logits.dtype)


def route_impl(logits, bias, ids_in, spec: RouterSpec, cap: int, block_m: int):
    T, E = logits.shape
    if T == 0:
        return _cpu_route(logits, bias, ids_in, spec, cap, block_m)  # nothing to launch
    if _backend.resolve(logits) is _backend.Impl.TRITON:
        return triton_route(logits, bias, ids_in, spec, cap, block_m)
    return _cpu_route(logits, bias, ids_in, spec, cap, block_m)


def route_backward_impl(grad_weights, logits, ids, spec: RouterSpec) -> torch.Tensor:
    if logits.shape[0] == 0:
        return torch.zeros_like(logits)
    if _backend.resolve(logits) is _backend.Impl.TRITON:
        return triton_route_backward(grad_weights, logits, ids, spec)
    return _cpu_route_backward(grad_weights, logits, ids, spec)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------

def _spec_args(spec: RouterSpec):
    return (spec.top_k, spec.scoring, spec.renormalize, spec.n_groups, spec.topk_groups,
            spec.routed_scaling, spec.key_on_scores)


@torch.library.custom_op("mmkernels::route_fwd", mutates_args=())
def route_fwd_op(logits: torch.Tensor, bias: Optional[torch.Tensor], ids_in: Optional[torch.Tensor],
                 top_k: int, scoring: str, renormalize: bool, n_groups: int, topk_groups: int,
                 routed_scaling: float, key_on_scores: bool, cap: int,
                 block_m: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors of :class:`Routing`, in field order."""
    spec = RouterSpec(top_k, scoring, renormalize, n_groups, topk_groups, routed_scaling, key_on_scores)
    return route_impl(logits, bias, ids_in, spec, cap, block_m)


@route_fwd_op.register_fake
def _(logits, bias, ids_in, top_k, scoring, renormalize, n_groups, topk_groups, routed_scaling,
      key_on_scores, cap, block_m):
    T, E = logits.shape
    n = T * top_k
    i32 = dict(dtype=torch.int32, device=logits.device)
    nt = max_tiles(n, E, block_m)
    return (logits.new_empty((T, top_k), dtype=math_dtype(logits.dtype)), logits.new_empty((T, top_k), **i32),
            logits.new_empty((E,), **i32), logits.new_empty((E + 1,), **i32), logits.new_empty((n,), **i32),
            logits.new_empty((n,), **i32), logits.new_empty((T, top_k), dtype=torch.bool),
            logits.new_empty((nt,), **i32), logits.new_empty((nt,), **i32), logits.new_empty((1,), **i32))


@torch.library.custom_op("mmkernels::route_bwd", mutates_args=())
def route_bwd_op(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, top_k: int,
                 scoring: str, renormalize: bool, n_groups: int, topk_groups: int,
                 routed_scaling: float, key_on_scores: bool) -> torch.Tensor:
    """d router_logits from d weights."""
    spec = RouterSpec(top_k, scoring, renormalize, n_groups, topk_groups, routed_scaling, key_on_scores)
    return route_backward_impl(grad_weights, logits, ids, spec)


@route_bwd_op.register_fake
def _(grad_weights, logits, ids, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class RouteFunction(torch.autograd.Function):
    """Autograd wrapper: only ``weights`` is differentiable (w.r.t. the logits); backward recomputes
    the chosen scores from the saved logits and expert ids in one kernel."""

    @staticmethod
    def forward(ctx, logits, bias, ids_in, spec: RouterSpec, cap: int, block_m: int):
        if _backend.direct_call_ok(*(t for t in (logits, bias, ids_in) if t is not None)):
            out = route_impl(logits, bias, ids_in, spec, cap, block_m)
        else:
            out = route_fwd_op(logits, bias, ids_in, *_spec_args(spec), cap, block_m)
        ctx.save_for_backward(logits, out[1])
        ctx.spec = spec
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the nine integer outputs
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_weights, *unused):
        logits, ids = ctx.saved_tensors
        if grad_weights is None:
            return None, None, None, None, None, None
        if _backend.direct_call_ok(logits, ids, grad_weights):
            dl = route_backward_impl(grad_weights, logits, ids, ctx.spec)
        else:
            dl = route_bwd_op(grad_weights, logits, ids, *_spec_args(ctx.spec))
        return dl, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functionals
# ----------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
          selection_bias: Optional[torch.Tensor] = None, n_groups: Optional[int] = None,
          topk_groups: Optional[int] = None, routed_scaling: float = 1.0, softmax_after_topk: bool = False,
          capacity_factor: Optional[float] = None, expert_ids: Optional[torch.Tensor] = None,
          block_m: int = DEFAULT_BLOCK_M) -> Routing:
    r"""Route ``T`` tokens to ``top_k`` of ``E`` experts: weights and the exact dispatch metadata.

    The routers in use, on their ``router_logits``:

    * Mixtral: ``route(l, 2)`` — softmax over experts in fp32, top-k, renormalise;
    * Qwen2-MoE / Qwen3-MoE / OLMoE: ``route(l, k, renormalize=norm_topk_prob)``;
    * DeepSeek-V3: ``route(l, 8, scoring="sigmoid", selection_bias=e_score_correction_bias,
      n_groups=8, topk_groups=4, routed_scaling=2.5)`` — selection on ``sigmoid(l) + bias`` within
      the ``topk_groups`` groups of best top-2 sum, weights from the unbiased scores;
    * gpt-oss: ``route(l, 4, softmax_after_topk=True)`` — top-k of the logits, softmax over them.

    Args:
        router_logits: ``(T, E)`` float16 / bfloat16 / float32 / float64, any strides; math in
            float32 (float64 for float64). ``T = 0`` is allowed; ``1 <= E <= 1024`` (MAX_EXPERTS).
        top_k: experts per token, ``1 <= top_k <= E`` (any value, not only powers of two).
        scoring: ``"softmax"`` (over all experts) or ``"sigmoid"`` (per expert).
        renormalize: divide the chosen scores by their sum (sigmoid: plus 1e-20, as DeepSeek-V3).
        selection_bias: ``(E,)`` added to the scores for the selection only (DeepSeek-V3's
            ``e_score_correction_bias``); it never changes the weights and gets no gradient.
        n_groups, topk_groups: group-limited routing: ``E`` splits into ``n_groups`` contiguous
            groups (of at least 2); a group's score is the sum of its top-2 selection scores; the
            choice is made within the ``topk_groups`` best groups.
        routed_scaling: factor on the final weights.
        softmax_after_topk: choose on the logits, then softmax over the chosen (gpt-oss); the same
            weights as ``renormalize=True``.
        capacity_factor: ``None`` for dropless; else each expert keeps the first
            ``ceil(capacity_factor · T · top_k / E)`` of its slots in token order, and the rest are
            reported in ``dropped`` and placed after the kept rows.
        expert_ids: ``(T, top_k)`` integer, in ``[0, E)``: skip selection and weigh these choices
            (CPU tensors are checked on the host; CUDA ones by a device-side assert, which needs
            no host synchronisation).
        block_m: rows per tile of the grouped-GEMM tile table (a power of two).

    Returns:
        :class:`Routing`: ``weights`` (T, k), ``expert_ids`` (T, k) int32, ``counts`` (E,),
        ``offsets`` (E+1,), ``sorted_slots`` / ``slot_rows`` (T·k,), ``dropped`` (T, k), and the
        tile table; see its field comments. The selection is deterministic: ties go to the lower
        expert index on every backend; without ``selection_bias`` or groups it compares the logits
        themselves (softmax and sigmoid preserve their order), so rounding of the scores never
        changes the choice.

    NaN logits: a NaN selection score ranks below every number (also ``-inf``), so the expert ids
    stay in ``[0, E)`` and all metadata stays exact and in bounds; the weights of a token whose
    chosen logits (softmax without renormalisation: any logit of its row) are NaN are NaN.

    On CUDA this is three Triton launches and no host synchronisation; on CPU, the C++ kernels of
    ``csrc/routing.cpp`` when built (one pass for the softmax routers, a counting sort), else
    vectorised torch.
    Only ``weights`` is differentiable.

    Example:
        >>> logits = torch.randn(5, 8)
        >>> r = route(logits, 2)
        >>> r.weights.shape, r.counts.sum().item(), r.offsets[-1].item()
        (torch.Size([5, 2]), 10, 10)
    """
    spec = check_route_args(router_logits, top_k, scoring, renormalize, selection_bias, n_groups, topk_groups,
                             routed_scaling, softmax_after_topk, capacity_factor, expert_ids, block_m)
    T, E = router_logits.shape
    cap = capacity_for(capacity_factor, T, top_k, E)
    ids_in = expert_ids.to(torch.int32) if expert_ids is not None else None
    out = RouteFunction.apply(router_logits, selection_bias, ids_in, spec,
                              NO_CAPACITY if cap is None else cap, block_m)
    return Routing(*out, block_m=block_m, capacity=cap)


# ----------------------------------------------------------------------------------------------
# Balancing
# ----------------------------------------------------------------------------------------------

def _top_k_choices(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, top_k) expert ids of the largest probabilities, ties to the lower index."""
    if probs.device.type == "cpu":
        return _top_k(probs, top_k)
    return _best_first(probs)[:, :top_k]  # no host read on CUDA


def load_balancing_loss(gate_logits: Union[torch.Tensor, Sequence[torch.Tensor], None],
                        num_experts: Optional[int] = None, top_k: int = 2,
                        attention_mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, int]:
    r"""Switch-Transformer auxiliary loss, with the signature and value of transformers'
    ``load_balancing_loss_func``: ``E · Σ_e f_e · P_e`` where ``f_e`` is the fraction of top-k
    assignments to expert ``e`` and ``P_e`` the mean router probability, over all layers' tokens
    (a balanced router scores ``top_k``).

    Args:
        gate_logits: a tuple / list of ``(B·S, E)`` router logits, one per layer, or one such
            tensor (transformers returns 0 for a lone tensor; here it counts as one layer).
            ``None`` gives 0, as in transformers.
        num_experts: ``E``.
        top_k: experts per token.
        attention_mask: ``(B, S)``; padding tokens (0) are left out of both averages.

    Returns:
        A 0-dim float32 tensor (differentiable w.r.t. the logits through ``P_e``).
    """
    if gate_logits is None:
        return 0
    layers = [gate_logits] if isinstance(gate_logits, torch.Tensor) else list(gate_logits)
    if not layers:
        return 0
    for i, g in enumerate(layers):
        _check_tensor(f"gate_logits[{i}]", g)
        if g.dim() != 2:
            raise ValueError(f"gate_logits[{i}] must be 2-D (tokens, experts), got shape {tuple(g.shape)}")
        if not g.dtype.is_floating_point:
            raise TypeError(f"gate_logits[{i}] must be floating-point, got {g.dtype}")
    E = layers[0].shape[1] if num_experts is None else num_experts
    if not _is_int(E) or E < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if any(g.shape[1] != E for g in layers):
        raise ValueError(f"every gate_logits tensor must have num_experts={E} columns, got "
                         f"{[tuple(g.shape) for g in layers]}")
    if not _is_int(top_k) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..num_experts={E}, got {top_k!r}")
    dev = layers[0].device
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device=dev, dtype=torch.float32)
        if any(g.shape[0] != mask.numel() for g in layers):
            raise ValueError(f"attention_mask has {mask.numel()} tokens; every gate_logits tensor must have that "
                             f"many rows, got {[g.shape[0] for g in layers]}")
    assigned = torch.zeros(E, dtype=torch.float32, device=dev)
    prob_sum = torch.zeros(E, dtype=torch.float32, device=dev)
    rows = torch.zeros((), dtype=torch.float32, device=dev)
    for g in layers:
        probs = torch.softmax(g.to(dev).float(), dim=-1)
        chosen = _top_k_choices(probs.detach(), top_k).reshape(-1)
        w = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask.repeat_interleave(top_k)
        assigned = assigned + torch.zeros(E, dtype=torch.float32, device=dev).scatter_add_(0, chosen, w)
        prob_sum = prob_sum + (probs.sum(0) if mask is None else (probs * mask[:, None]).sum(0))
        rows = rows + (probs.shape[0] if mask is None else mask.sum())
    return torch.sum((assigned / rows) * (prob_sum / rows)) * E


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""ST-MoE router z-loss: ``mean_t (log Σ_e exp logits[t, e])²`` in float32.

    Args:
        logits: ``(..., E)`` router logits (any leading dims; the mean runs over all of them).

    Returns:
        A 0-dim float32 tensor, differentiable.
    """
    _check_tensor("logits", logits)
    if logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor of at least 1 dim, got {logits.dtype} "
                        f"of shape {tuple(logits.shape)}")
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def update_selection_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float = 1e-3) -> torch.Tensor:
    r"""Auxiliary-loss-free balancing (DeepSeek-V3): ``bias += rate · sign(mean(counts) - counts)``,
    in place — experts that received fewer slots than the mean get a higher selection bias, those
    that received more a lower one.

    Args:
        bias: ``(E,)`` floating-point ``selection_bias`` of :func:`route`, updated in place.
        counts: ``(E,)`` slots per expert observed since the last update (e.g. ``Routing.counts``,
            summed over steps), any numeric dtype, on ``bias``' device.
        rate: the update speed ``γ``.

    Returns:
        ``bias``.
    """
    _check_tensor("bias", bias)
    _check_tensor("counts", counts)
    if not bias.dtype.is_floating_point or bias.dim() != 1:
        raise TypeError(f"bias must be a 1-D floating-point tensor, got {bias.dtype} of shape {tuple(bias.shape)}")
    if counts.shape != bias.shape:
        raise ValueError(f"counts must have bias' shape {tuple(bias.shape)}, got {tuple(counts.shape)}")
    c = counts.to(device=bias.device, dtype=torch.float32)
    bias.add_(torch.sign(c.mean() - c).to(bias.dtype), alpha=rate)
    return bias
