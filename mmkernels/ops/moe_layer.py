"""One autograd node for a MoE layer's router, routing and experts: what :class:`mmkernels.nn.MoE`
runs in eager mode.

``gate``, ``route`` and ``experts`` composed are three autograd nodes and three Python calls each
way, with their argument checks, the ``Routing`` built and taken apart again and a dozen
allocations; on a GPU a MoE layer's forward and backward are short next to that host work when the
step is not graph-captured. Here one ``autograd.Function`` makes the router logits (optionally:
``x @ gate_weight.T``), routes and runs the experts back to back, and its backward runs the
experts' backward, the routing's (d weights -> d logits) and the router's in the same call.
Everything that follows from shapes and options — the argument checks, every launch's grid and
constants, the split of the workspaces — is made once per shape in a :class:`LayerPlan`
(:class:`LayerPlans` caches them by the tensors' metadata), so a call allocates and launches. On
the Triton path the forward's buffers (the routing's integers and weights in one allocation, the
experts' saved rows in one more) and the backward's scratch are workspaces split into their views
once and reused by later calls of the same shape (:mod:`mmkernels.ops._workspace`): the forward's
when the node that saved them is gone (its ``ctx`` holds a lease), the backward's as soon as its
launches are enqueued. Only the outputs and the gradients are new tensors per call.

The results are those of the composed ops (:func:`mmkernels.moe.route` then
:func:`mmkernels.moe.experts`, and ``torch.nn.functional.linear`` for the router), bit for bit.
Tracers (torch.compile, export, FakeTensor) see the composed custom ops instead: the node is taken
only when :func:`mmkernels._backend.direct_call_ok`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import torch

from mmkernels import _backend
from mmkernels.ops import _workspace
from mmkernels.ops import experts as _experts
from mmkernels.ops import routing as _routing
from mmkernels.ops._util import cdiv, math_dtype

#: Plans one :class:`LayerPlans` keeps before it starts over (shapes seen by one layer).
MAX_PLANS = 64


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one MoE layer call needs beyond its tensors, made once per shape and options.

    ``gated``: the node's second input is the router's weight (E, H) and the node makes the logits
    ``x @ weight.T``; else it is the logits (T, E). ``backend``: :func:`mmkernels.ops.experts.backend_of`.
    On the Triton path, ``route`` / ``forward`` are the launches' plans and ``ints`` / ``rows``
    the splits of the routing workspace (int32: the routing weights as float32 when they are 4
    bytes, every :class:`~mmkernels.ops.routing.Routing` field but the counts, the scratch) and of
    the experts' forward buffer (storage dtype: ``h``, ``act`` and the down GEMM's rows when not
    split); :func:`_forward_workspace` makes them."""

    T: int
    H: int
    I: int
    E: int
    rspec: _routing.RouterSpec
    xspec: _experts.ExpertSpec
    cap: int
    block_m: int
    backend: str
    gated: bool
    save: bool
    route: Optional[_routing.RoutePlan] = None
    forward: Optional[_experts.ForwardPlan] = None
    ints: Tuple[int, ...] = ()
    rows: Tuple[int, ...] = ()
    #: The dtype of ``rows`` (the storage dtype).
    forward_rows_dtype: Optional[torch.dtype] = None
    #: The backward's launches by ``need`` (filled at the first backward of each).
    backward_plans: Dict[tuple, dict] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def weights_in_ints(self) -> bool:
        return self.route is not None and self.route.weights_dtype.itemsize == 4

    @functools.cached_property
    def n_ints(self) -> int:
        return sum(self.ints)

    @functools.cached_property
    def n_rows(self) -> int:
        return sum(self.rows)

    @functools.cached_property
    def workspace_layout(self) -> int:
        """What the forward's workspace (:func:`_forward_workspace`) follows from, as a small int
        (a key of :mod:`~mmkernels.ops._workspace`, cheap to hash)."""
        fp = self.forward
        layout = ("forward", self.T, self.rspec.top_k, self.block_m, self.E, self.H, self.ints,
                  self.route.weights_dtype, self.rows, self.forward_rows_dtype, fp.splits, fp.y_dtype)
        return _workspace.layout_id(_LAYOUTS, layout)

    @functools.cached_property
    def workspace_bytes(self) -> int:
        fp, n = self.forward, self.T * self.rspec.top_k
        weights = 0 if self.weights_in_ints else n * self.route.weights_dtype.itemsize
        y = fp.splits * n * self.H * fp.y_dtype.itemsize if fp.splits > 1 else 0
        return 4 * self.n_ints + weights + self.n_rows * self.forward_rows_dtype.itemsize + y


def layer_plan(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], top_k: int, block_m: int, activation: str,
               route_kwargs: dict, gated: bool, save: bool) -> LayerPlan:
    """Checks the arguments as :func:`mmkernels.moe.route` and :func:`mmkernels.moe.experts` do
    (``router``: the logits (T, E), or with ``gated`` the router weight (E, H), which must then
    have ``x``'s dtype and device) and returns their :class:`LayerPlan`."""
    if gated:
        if router.dim() != 2 or x.dim() != 2 or router.shape[1] != x.shape[1]:
            raise ValueError(f"the router weight must be (E, H) for hidden_states (T, H), got {tuple(router.shape)} "
                             f"and {tuple(x.shape)}")
        if router.dtype != x.dtype or router.device != x.device:
            raise TypeError(f"the router weight must have hidden_states' dtype and device ({x.dtype}, {x.device}), "
                            f"got {router.dtype} on {router.device}")
        # the logits' metadata, without their data (one element of storage)
        logits = torch.empty_strided((x.shape[0], router.shape[0]), (0, 0), dtype=x.dtype, device=x.device)
    else:
        logits = router
    rspec = _routing.check_route_args(logits, top_k, route_kwargs.get("scoring", "softmax"),
                                      route_kwargs.get("renormalize", True), None, route_kwargs.get("n_groups"),
                                      route_kwargs.get("topk_groups"), route_kwargs.get("routed_scaling", 1.0),
                                      route_kwargs.get("softmax_after_topk", False),
                                      route_kwargs.get("capacity_factor"), None, block_m)
    T, E = logits.shape
    xspec = _experts.check_experts_args(x, T, E, top_k, gate_up, down, b1, b2, None, activation, False, None, None,
                                        block_m)
    cap = _routing.capacity_for(route_kwargs.get("capacity_factor"), T, top_k, E)
    cap = _routing.NO_CAPACITY if cap is None else cap
    backend = _experts.backend_of(x)
    H, I = x.shape[1], down.shape[2]
    plan = LayerPlan(T, H, I, E, rspec, xspec, cap, block_m, backend, gated, save)
    if backend != "triton":
        return plan
    rp = _routing.route_plan(T, E, rspec, cap, block_m, logits.dtype, False, False)
    n, nt = T * top_k, rp.n_tiles
    # weights (as float32), ids, offsets, sorted slots, slot rows, dropped (n bools in int32 words),
    # tile experts, tile row starts, the tile count, then the scratch (the counts, which the caller
    # receives, are allocated per call: a reused workspace is no place for them)
    ints = (n if rp.weights_dtype.itemsize == 4 else 0, n, E + 1, n, n, cdiv(n, 4), nt, nt, 1, *rp.scratch)
    # the experts' plan reads the dispatch's sizes only
    dispatch = _experts.Dispatch(*(torch.empty_strided((m,), (0,), dtype=torch.int32, device=x.device)
                                   for m in (n, n, E + 1, nt, nt)), top_k, block_m)
    fp = _experts.forward_plan(x, dispatch, gate_up, b1, b2, xspec, save)
    rows = (n * 2 * I if save else 0, n * I, n * H if fp.splits == 1 else 0)  # h, act, the down GEMM's rows
    return dataclasses.replace(plan, route=rp, forward=fp, ints=ints, rows=rows, forward_rows_dtype=x.dtype)


class LayerPlans:
    """The :class:`LayerPlan` s of one layer, by the shapes, dtypes and devices of its tensors, its
    options (``top_k``, ``activation``, the routing's keyword arguments), the implementation that
    runs (:func:`mmkernels.ops.experts.backend_of`: the backend in force and the CPU path selected)
    and whether gradients are saved: the checks run on the first call of each."""

    def __init__(self):
        self._top_k = self._activation = self._route_kwargs = None
        self._plans: Dict[tuple, LayerPlan] = {}

    def __getstate__(self):  # a pickled layer keeps no plans (they hold launch constants)
        return {"_top_k": None, "_activation": None, "_route_kwargs": None, "_plans": {}}

    def get(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], top_k: int, block_m: int, activation: str,
            route_kwargs: dict, gated: bool, save: bool) -> LayerPlan:
        """:func:`layer_plan` of these arguments, made at the first call with their metadata."""
        if (top_k != self._top_k or activation != self._activation or route_kwargs != self._route_kwargs
                or len(self._plans) >= MAX_PLANS):
            self._top_k, self._activation, self._route_kwargs, self._plans = top_k, activation, dict(route_kwargs), {}
        key = (gated, save, block_m, _experts.backend_of(x), x.shape, x.dtype, x.device, router.shape, router.dtype,
               router.device, gate_up.shape, gate_up.dtype, gate_up.device, down.shape, down.dtype, down.device,
               None if b1 is None else (b1.shape, b1.dtype, b1.device),
               None if b2 is None else (b2.shape, b2.dtype, b2.device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = layer_plan(x, router, gate_up, down, b1, b2, top_k, block_m, activation,
                                                 route_kwargs, gated, save)
        return plan


#: Workspace layouts seen (:attr:`LayerPlan.workspace_layout`), each numbered once.
_LAYOUTS: Dict[tuple, int] = {}


def _forward_workspace(plan: LayerPlan, x: torch.Tensor):
    """The forward's buffers on the Triton path, split into what its launches take: ``(weights (T,
    k), ids, the routing's other outputs and scratch in :func:`mmkernels.ops.routing.launch_route`'s
    order after the counts, Dispatch, h, act, y)``. The routing's integers and weights are one int32
    allocation, ``h`` / ``act`` / the down GEMM's rows one more (the rows their own when split-K
    makes them float32 partials). Kept for reuse by :mod:`~mmkernels.ops._workspace`."""
    T, k = plan.T, plan.rspec.top_k
    parts = x.new_empty(plan.n_ints, dtype=torch.int32).split_with_sizes(plan.ints)
    w, ids, offsets, sorted_slots, slot_rows, dropped, tile_experts, tile_starts = parts[:8]
    weights = (w.view(plan.route.weights_dtype) if plan.weights_in_ints
               else x.new_empty(T * k, dtype=plan.route.weights_dtype)).view(T, k)
    route = (offsets, sorted_slots, slot_rows, dropped.view(torch.bool), tile_experts, tile_starts, *parts[8:])
    d = _experts.Dispatch(sorted_slots, slot_rows, offsets, tile_experts, tile_starts, k, plan.block_m)
    h, a, y = x.new_empty(plan.n_rows).split_with_sizes(plan.rows)
    fp = plan.forward
    if fp.splits > 1:
        y = x.new_empty(fp.splits * T * k * plan.H, dtype=fp.y_dtype)
    return weights, ids, route, d, h, a, y


def _triton_forward(plan: LayerPlan, x, logits, gate_up, down, b1, b2, ws):
    """(out (T, H), counts (E,)): the routing's and the experts' launches into workspace ``ws``
    (:func:`_forward_workspace`; the kernels read the ids by pointer: no (T, k) view is made)."""
    weights, ids, route, d, h, a, y = ws
    counts = x.new_empty(plan.E, dtype=torch.int32)
    _routing.launch_route(plan.route, logits, None, None, weights, ids, counts, *route)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _experts.launch_forward(plan.forward, x, weights, gate_up, down, b1, b2, d, h if plan.save else None, a, y, out)
    return out, counts


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """The backward's launches for one ``need`` (:func:`mmkernels.ops.experts.backward_plan`) and
    its workspace: the element counts of ``dh`` / ``buf`` (storage dtype) and ``dwp`` (math dtype),
    whether the routing's backward reads ``dwp`` itself (``fold_dw``: the experts' ``dw`` launch is
    left out; when the two sum in one dtype, i.e. the routing weights have the experts' math dtype)
    and whether ``dl`` is scratch (the router weight's node: the logits gradient feeds the router's
    GEMMs and is not returned)."""

    launches: Dict[str, object]
    store: Tuple[int, int]
    n_dwp: int
    fold_dw: bool
    dl_scratch: bool
    layout: int
    nbytes: int


def backward_plan(plan: LayerPlan, x, d, gate_up, b1, b2, need) -> BackwardPlan:
    """:class:`BackwardPlan` of ``need``, made at its first backward and kept on ``plan``."""
    bp = plan.backward_plans.get(need)
    if bp is None:
        launches = _experts.backward_plan(x, d, gate_up, b1, b2, plan.xspec, need)
        T, H, I, k = plan.T, plan.H, plan.I, plan.rspec.top_k
        store, n_dwp = _experts.backward_scratch(launches, T * k, I, H)
        acc = math_dtype(x.dtype)
        fold_dw = bool(need[5]) and plan.route.weights_dtype == acc
        if fold_dw:
            launches = {name: launch for name, launch in launches.items() if name != "dw"}
        dl_scratch = bool(need[5]) and plan.gated
        dw = (T, k, plan.route.weights_dtype) if need[5] and not fold_dw else None
        dl = (T, plan.E, x.dtype) if dl_scratch else None  # the logits' dtype: gated, they are x @ weight.T
        nbytes = (sum(store) * x.element_size() + n_dwp * acc.itemsize + (T * k * dw[2].itemsize if dw else 0)
                  + (T * plan.E * x.element_size() if dl else 0))
        layout = _workspace.layout_id(_LAYOUTS, ("backward", store, x.dtype, n_dwp, acc, dw, dl))
        bp = plan.backward_plans[need] = BackwardPlan(launches, store, n_dwp, fold_dw, dl_scratch, layout, nbytes)
    return bp


def _backward_workspace(plan: LayerPlan, bp: BackwardPlan, x, logits, need):
    """The backward's scratch, split: ``(dh, buf, dwp, dw (T, k) or None, dl (T, E) or None)``;
    ``dw`` only when the experts reduce ``dwp`` into it (not :attr:`BackwardPlan.fold_dw`), ``dl``
    only when it is scratch (:attr:`BackwardPlan.dl_scratch`). Kept for reuse by
    :mod:`~mmkernels.ops._workspace`."""
    dh, buf = x.new_empty(sum(bp.store)).split_with_sizes(bp.store)
    dwp = x.new_empty(bp.n_dwp, dtype=math_dtype(x.dtype))
    dw = (x.new_empty((plan.T, plan.rspec.top_k), dtype=plan.route.weights_dtype) if need[5] and not bp.fold_dw
          else None)
    dl = logits.new_empty((plan.T, plan.E)) if bp.dl_scratch else None
    return dh, buf, dwp, dw, dl


def _triton_backward(plan: LayerPlan, bp: BackwardPlan, ws, dout, x, logits, weights, ids, gate_up, down, b1, b2,
                     d, h, a, need):
    """(dx, d gate_up, d down, d b1, d b2, d logits) of the experts and the routing on the Triton
    path, their scratch the workspace ``ws`` (:func:`_backward_workspace`); ``d logits`` is its
    ``dl`` when that is scratch, else a new tensor."""
    contiguous = torch.contiguous_format
    dh, buf, dwp, dw, dl = ws
    dx = torch.empty_like(x, memory_format=contiguous) if need[0] else None
    dgu = torch.empty_like(gate_up, memory_format=contiguous) if need[1] or need[3] else None
    dd = torch.empty_like(down, memory_format=contiguous) if need[2] or need[4] else None
    db1 = torch.empty_like(b1, memory_format=contiguous) if dgu is not None and b1 is not None else None
    db2 = torch.empty_like(b2, memory_format=contiguous) if dd is not None and b2 is not None else None
    _experts.launch_backward(bp.launches, dout, x, weights, gate_up, down, b1, b2, d, h, a, dh, dwp, buf, dx, dgu,
                             dd, db1, db2, dw)
    if need[5]:
        if dl is None:
            dl = torch.empty_like(logits, memory_format=contiguous)
        if bp.fold_dw:
            _routing.launch_route_backward_from_partials(plan.route, dwp, bp.launches["dact"].bound["NB_I"],
                                                         d.slot_rows, d.offsets, logits, ids, dl)
        else:
            _routing.launch_route_backward(plan.route, dw, logits, ids, dl)
    return dx, dgu, dd, db1, db2, dl


class MoELayerFunction(torch.autograd.Function):
    """``(x, router, gate_up, down, b1, b2, plan) -> (out, counts[, logits])``: ``router`` is the
    logits, or with ``plan.gated`` the router's weight, and then the logits are the third output
    (differentiable: a loss on them adds to the router's and ``x``'s gradients). ``counts`` is not
    differentiable. Saved: the inputs, the logits, the routing's weights and ids and the experts'
    ``h`` / ``act``; the dispatch tensors ride on ``ctx`` (integers made here: no gradient, no
    version checks)."""

    @staticmethod
    def forward(ctx, x, router, gate_up, down, b1, b2, plan: LayerPlan):
        logits = torch.nn.functional.linear(x, router) if plan.gated else router
        leased = False
        if plan.backend == "triton":
            # under saved-tensor hooks the saved tensors may outlive the node, and with it the lease
            key = (_workspace.reuse_key(plan.workspace_layout, x, plan.workspace_bytes)
                   if not (plan.save and _workspace.saved_tensor_hooks_active()) else None)
            ws = _workspace.acquire(key) or _forward_workspace(plan, x)
            out, counts = _triton_forward(plan, x, logits, gate_up, down, b1, b2, ws)
            weights, ids, _, d, h, a, _ = ws
            if not plan.save:  # no node keeps it: the next call may take it
                _workspace.release(key, ws, plan.workspace_bytes)
            elif key is not None:  # the node's saved tensors and dispatch are views of it
                ctx.lease = _workspace.Lease(key, ws, plan.workspace_bytes)
                leased = True
        else:
            weights, ids, counts, offsets, sorted_slots, slot_rows, _, tile_experts, tile_starts, _ = \
                _routing.route_impl(logits, None, None, plan.rspec, plan.cap, plan.block_m)
            d = _experts.Dispatch(sorted_slots, slot_rows, offsets, tile_experts, tile_starts, plan.rspec.top_k,
                                  plan.block_m)
            out, h, a = _experts.forward_impl(plan.backend, x, weights, gate_up, down, b1, b2, d, plan.xspec,
                                              plan.save)
        if leased:
            # views of the leased workspace (so no saved-tensor hooks are in force): kept by the
            # lease for the node's life, written by no one else, no output among them
            ctx.save_for_backward(x, router, gate_up, down, b1, b2, logits if plan.gated else None)
            ctx.buffers = (weights, ids, h, a)
        else:
            ctx.save_for_backward(x, router, gate_up, down, b1, b2, logits if plan.gated else None, weights, ids, h,
                                  a)
            ctx.buffers = None
        ctx.dispatch, ctx.plan = d, plan
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)
        return (out, counts, logits) if plan.gated else (out, counts)

    @staticmethod
    def backward(ctx, dout, _dcounts, dlogits=None):
        if ctx.buffers is None:
            x, router, gate_up, down, b1, b2, logits, weights, ids, h, a = ctx.saved_tensors
        else:
            x, router, gate_up, down, b1, b2, logits = ctx.saved_tensors
            weights, ids, h, a = ctx.buffers
        plan = ctx.plan
        nx, nr, ngu, nd, nb1, nb2 = ctx.needs_input_grad[:6]
        nl = nr or (plan.gated and nx)  # d logits: for the logits input, or for the router weight and x
        if not plan.gated:
            logits = router
        key = ws = None
        nbytes = 0
        if dout is None:
            dx = dgu = dd = db1 = db2 = None
            dl = dlogits if nl else None
        else:
            need = (nx, ngu, nd, nb1 and b1 is not None, nb2 and b2 is not None, nl)
            if plan.backend == "triton":
                bp = backward_plan(plan, x, ctx.dispatch, gate_up, b1, b2, need)
                # a double backward's graph (create_graph) keeps dl past this call: no reuse then
                key = _workspace.reuse_key(bp.layout, x, bp.nbytes) if not torch.is_grad_enabled() else None
                nbytes = bp.nbytes
                ws = _workspace.acquire(key) or _backward_workspace(plan, bp, x, logits, need)
                dx, dgu, dd, db1, db2, dl = _triton_backward(plan, bp, ws, dout, x, logits, weights, ids, gate_up,
                                                             down, b1, b2, ctx.dispatch, h, a, need)
            else:
                dx, dgu, dd, db1, db2, dw = _experts.backward_impl(plan.backend, dout, x, weights, gate_up, down, b1,
                                                                   b2, ctx.dispatch, h, a, plan.xspec, need)
                dl = _routing.route_backward_impl(dw, logits, ids, plan.rspec) if nl else None
            if dl is not None and dlogits is not None:
                dl.add_(dlogits)
        if not plan.gated:  # dl is the logits' gradient, not scratch
            _workspace.release(key, ws, nbytes)
            return dx, dl, dgu, dd, db1, db2, None
        dw_router = None
        if dl is not None:
            if nx:  # as linear's backward: dx += dl · W, dW = dlᵀ · x
                dxl = dl.mm(router)
                dx = dxl if dx is None else dx.add_(dxl)
            if nr:
                dw_router = dl.t().mm(x)
        _workspace.release(key, ws, nbytes)  # its last reader (the router's GEMMs, on dl) is enqueued
        return dx, dw_router, dgu, dd, db1, db2, None


def moe_layer(router_logits: torch.Tensor, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, top_k: int, *, block_m: int, activation: str = "silu",
              gate_up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
              **route_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out (T, H), counts (E,))``: ``moe.experts(hidden_states, moe.route(router_logits, top_k,
    block_m=block_m, **route_kwargs), gate_up_proj, down_proj, ...)`` and the routing's counts,
    in one autograd node when nothing traces the call (else the two custom ops, as composed).

    Args as :func:`mmkernels.moe.route` (``router_logits`` (T, E), ``top_k``, ``block_m``,
    ``route_kwargs``: scoring, renormalize, n_groups, topk_groups, routed_scaling,
    softmax_after_topk, capacity_factor; no ``selection_bias`` or ``expert_ids``) and
    :func:`mmkernels.moe.experts` (``hidden_states`` (T, H), ``gate_up_proj`` (E, 2I, H),
    ``down_proj`` (E, H, I), ``activation``, the biases). Every argument is checked as those two
    check it."""
    tensors = (hidden_states, router_logits, gate_up_proj, down_proj, gate_up_bias, down_bias)
    if not _backend.direct_call_ok(*(t for t in tensors if t is not None)):
        routing = _routing.route(router_logits, top_k, block_m=block_m, **route_kwargs)
        out = _experts.experts(hidden_states, routing, gate_up_proj, down_proj, activation=activation,
                               gate_up_bias=gate_up_bias, down_bias=down_bias)
        return out, routing.counts
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    plan = layer_plan(hidden_states, router_logits, gate_up_proj, down_proj, gate_up_bias, down_bias, top_k, block_m,
                      activation, route_kwargs, False, save)
    return MoELayerFunction.apply(*tensors, plan)
