"""One autograd node for a MoE layer's routing and experts: what :class:`mmkernels.nn.MoE` runs
in eager mode.

``route`` and ``experts`` composed are two autograd nodes and two Python calls each way, and
the ``Routing`` they pass between them is built and taken apart again; on a GPU a MoE layer's
forward and backward are short next to that host work when the step is not graph-captured.
:func:`moe_layer` gives the same results as :func:`mmkernels.moe.route` followed by
:func:`mmkernels.moe.experts` through one ``autograd.Function`` whose forward runs the
routing's and the experts' implementations back to back and whose backward runs the experts'
backward and then the routing's (d weights -> d logits) in the same call.

Tracers (torch.compile, export, FakeTensor) see the composed custom ops instead:
:func:`moe_layer` takes the fused node only when :func:`mmkernels._backend.direct_call_ok`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mmkernels import _backend
from mmkernels.ops import experts as _experts
from mmkernels.ops import routing as _routing


class MoELayerFunction(torch.autograd.Function):
    """``(logits, x, gate_up, down, b1, b2) -> (out, counts)``; ``counts`` is not differentiable.
    Saved: the inputs, the routing's weights and ids and the experts' ``h`` / ``act``; the
    dispatch tensors ride on ``ctx`` (integers made here, no gradient, no version checks)."""

    @staticmethod
    def forward(ctx, logits, x, gate_up, down, b1, b2, rspec: _routing.RouterSpec, cap: int, block_m: int,
                xspec: _experts.ExpertSpec, save: bool):
        weights, ids, counts, offsets, sorted_slots, slot_rows, _, tile_experts, tile_row_starts, _ = \
            _routing.route_impl(logits, None, None, rspec, cap, block_m)
        d = _experts.Dispatch(sorted_slots, slot_rows, offsets, tile_experts, tile_row_starts, rspec.top_k, block_m)
        backend = _experts.backend_of(x)
        out, h, a = _experts.forward_impl(backend, x, weights, gate_up, down, b1, b2, d, xspec, save)
        ctx.save_for_backward(logits, x, gate_up, down, b1, b2, weights, ids, h, a)
        ctx.dispatch, ctx.rspec, ctx.xspec, ctx.backend = d, rspec, xspec, backend
        ctx.mark_non_differentiable(counts)
        ctx.set_materialize_grads(False)
        return out, counts

    @staticmethod
    def backward(ctx, dout, _unused):
        logits, x, gate_up, down, b1, b2, weights, ids, h, a = ctx.saved_tensors
        nl, nx, ngu, nd, nb1, nb2 = ctx.needs_input_grad[:6]
        if dout is None:
            return (None,) * 11
        need = (nx, ngu, nd, nb1 and b1 is not None, nb2 and b2 is not None, nl)
        dx, dgu, dd, db1, db2, dw = _experts.backward_impl(ctx.backend, dout, x, weights, gate_up, down, b1, b2,
                                                           ctx.dispatch, h, a, ctx.xspec, need)
        dl = _routing.route_backward_impl(dw, logits, ids, ctx.rspec) if nl else None
        return dl, dx, dgu, dd, db1, db2, None, None, None, None, None


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
    tensors = (router_logits, hidden_states, gate_up_proj, down_proj, gate_up_bias, down_bias)
    if not _backend.direct_call_ok(*(t for t in tensors if t is not None)):
        routing = _routing.route(router_logits, top_k, block_m=block_m, **route_kwargs)
        out = _experts.experts(hidden_states, routing, gate_up_proj, down_proj, activation=activation,
                               gate_up_bias=gate_up_bias, down_bias=down_bias)
        return out, routing.counts
    rspec = _routing.check_route_args(router_logits, top_k, route_kwargs.get("scoring", "softmax"),
                                      route_kwargs.get("renormalize", True), None, route_kwargs.get("n_groups"),
                                      route_kwargs.get("topk_groups"), route_kwargs.get("routed_scaling", 1.0),
                                      route_kwargs.get("softmax_after_topk", False),
                                      route_kwargs.get("capacity_factor"), None, block_m)
    T, E = router_logits.shape
    xspec = _experts.check_experts_args(hidden_states, T, E, top_k, gate_up_proj, down_proj, gate_up_bias, down_bias,
                                        None, activation, False, None, None, block_m)
    cap = _routing.capacity_for(route_kwargs.get("capacity_factor"), T, top_k, E)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return MoELayerFunction.apply(*tensors, rspec, _routing.NO_CAPACITY if cap is None else cap, block_m, xspec, save)
