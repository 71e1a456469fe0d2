"""Expert parallelism over ``torch.distributed``: each of P ranks holds E/P experts; tokens travel
to their experts' ranks and back with ``all_to_all_single`` (NCCL on GPUs, gloo on CPU).

Per forward, on every rank (its own T tokens, routed locally over all E experts):

1. the per-expert counts of its kept slots go to the experts' ranks (``all_to_all_single`` of E
   integers) — the one host read: the split sizes every collective below needs;
2. the slots' token rows, in expert order (the routing's ``sorted_slots``), go to the owning
   ranks (differentiable ``all_to_all_single`` with those split sizes);
3. each rank reorders what it received expert-major (source ranks in order within an expert) and
   runs its local experts with the grouped kernels of :func:`mmkernels.moe.experts` (k = 1,
   weight 1 per received row);
4. the results go back the same way and are combined on the token's home rank with the routing
   weights (in torch, differentiable w.r.t. the weights and so the router).

The backward runs the same exchanges in reverse (autograd of the collectives). Slots dropped by
``capacity_factor`` are never sent.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single as _all_to_all  # differentiable

from mmkernels.ops.routing import Routing


def group_size_and_rank(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def local_expert_range(num_experts: int, group) -> Tuple[int, int]:
    """``[start, stop)`` of the experts this rank holds; a ValueError if P does not divide E."""
    P, r = group_size_and_rank(group)
    if num_experts % P:
        raise ValueError(f"num_experts={num_experts} must be divisible by the process group's size {P} "
                         f"(each rank holds num_experts / P experts)")
    n = num_experts // P
    return r * n, (r + 1) * n


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel MoE failed: another rank failed, left or timed out."""


def _collective(what: str, fn, *args, **kwargs):
    """Run one collective; a failure (a peer that died, or the group's timeout) becomes an
    ExpertParallelError that says which exchange and why."""
    try:
        with warnings.catch_warnings():
            # torch.distributed.nn.functional.all_to_all_single (the public differentiable one)
            # warns that it is deprecated in favour of a private module; it works in torch 2.11-2.13
            warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)
            return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise ExpertParallelError(
            f"expert-parallel MoE: {what} with the other ranks failed — a rank failed, exited or did not "
            f"reach this step within the process group's timeout ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _expert_major(recv: torch.Tensor, n_recv: int) -> torch.Tensor:
    """Row order that turns the received rows (blocks by source rank, each in local-expert order;
    ``recv`` (P, El) counts on the device) expert-major (within an expert, source ranks in order):
    tensor ops of the counts' size plus one of the rows' (no per-row Python, no host read)."""
    flat = recv.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).reshape(recv.shape)  # where block (p, e) starts
    em_counts, em_starts = recv.t().reshape(-1), starts.t().reshape(-1)  # blocks expert-major
    em_first = torch.cumsum(em_counts, 0) - em_counts                     # their places in the output
    shift = torch.repeat_interleave(em_starts - em_first, em_counts, output_size=n_recv)
    return torch.arange(n_recv, device=recv.device) + shift


def expert_parallel_experts(hidden_states: torch.Tensor, routing: Routing, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, group, *, activation: str = "silu",
                            gate_up_bias: Optional[torch.Tensor] = None,
                            down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routed experts of an MoE layer whose experts are sharded over ``group``: ``(T, H)`` →
    ``(T, H)``, equal to :func:`mmkernels.moe.experts` with every expert on one process.

    Args:
        hidden_states: this rank's ``(T, H)`` tokens; routing: their :class:`Routing` over all E
            experts; gate_up_proj ``(E/P, 2I, H)`` / down_proj ``(E/P, H, I)`` (and biases): this
            rank's experts ``[r·E/P, (r+1)·E/P)``; group: the process group (P ranks).

    Host synchronisation: one read of the exchanged per-expert counts (the split sizes of the
    collectives); nothing else.
    """
    from mmkernels.ops.experts import experts
    from mmkernels.ops.routing import route, suggest_block_m

    P, rank = group_size_and_rank(group)
    T, H = hidden_states.shape
    k = routing.expert_ids.shape[1]
    E = routing.counts.numel()
    El = E // P
    if gate_up_proj.shape[0] != El:
        raise ValueError(f"this rank must hold E/P = {E}/{P} = {El} experts, got gate_up_proj of shape "
                         f"{tuple(gate_up_proj.shape)}")
    dev = hidden_states.device
    counts = routing.counts.to(torch.int64).reshape(P, El).contiguous()
    recv = torch.empty_like(counts)
    _collective("exchanging the per-expert counts", dist.all_to_all_single, recv, counts, group=group)
    send_counts, recv_counts = counts.tolist(), recv.tolist()  # the split sizes: the one host read
    send_splits = [sum(row) for row in send_counts]
    recv_splits = [sum(row) for row in recv_counts]
    n_kept, n_recv = sum(send_splits), sum(recv_splits)

    slots = routing.sorted_slots[:n_kept].to(torch.int64)  # kept slots in expert order
    tokens = torch.div(slots, k, rounding_mode="floor")
    x_send = hidden_states.index_select(0, tokens)
    x_recv = _collective("sending the tokens to their experts' ranks", _all_to_all,
                         hidden_states.new_empty((n_recv, H)), x_send, recv_splits, send_splits, group=group)

    order = _expert_major(recv, n_recv)
    x_local = x_recv.index_select(0, order)
    local_ids = torch.repeat_interleave(torch.arange(El, device=dev), recv.sum(0), output_size=n_recv).view(-1, 1)
    local = route(torch.zeros((n_recv, El), device=dev), 1, expert_ids=local_ids,
                  block_m=suggest_block_m(max(n_recv, 1), El, 1))
    y_local = experts(x_local, local, gate_up_proj, down_proj, activation=activation, gate_up_bias=gate_up_bias,
                      down_bias=down_bias, routing_weights=torch.ones((n_recv, 1), dtype=hidden_states.dtype,
                                                                      device=dev))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=dev)
    y_recv = y_local.index_select(0, inverse)
    y_back = _collective("returning the experts' outputs", _all_to_all,
                         hidden_states.new_empty((n_kept, H)), y_recv, send_splits, recv_splits, group=group)

    w = routing.weights.reshape(-1).index_select(0, slots).to(y_back.dtype)
    return torch.zeros_like(hidden_states).index_add(0, tokens, y_back * w[:, None])


_EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias")


def shard_state_dict(state_dict: Dict[str, torch.Tensor], rank: int, world_size: int,
                     prefix: str = "") -> Dict[str, torch.Tensor]:
    """The part of a full :class:`mmkernels.nn.MoE` state dict that rank ``rank`` of
    ``world_size`` holds: the experts' tensors sliced to ``[rank·E/P, (rank+1)·E/P)`` (views),
    everything else (router, shared expert) as is. ``prefix``: the MoE's key prefix in a larger
    model's state dict (e.g. ``"layers.3.mlp."``)."""
    out = {}
    for key, t in state_dict.items():
        if key.startswith(prefix) and key[len(prefix):] in _EXPERT_KEYS:
            E = t.shape[0]
            if E % world_size:
                raise ValueError(f"{key}: {E} experts do not split over {world_size} ranks")
            n = E // world_size
            out[key] = t[rank * n:(rank + 1) * n]
        else:
            out[key] = t
    return out


def gather_state_dict(state_dict: Dict[str, torch.Tensor], group=None, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The full state dict from each rank's shard (:func:`shard_state_dict`'s inverse): the
    experts' tensors all-gathered in rank order, the rest taken from this rank. A collective:
    every rank of ``group`` must call it."""
    P, _ = group_size_and_rank(group)
    out = {}
    for key, t in state_dict.items():
        if key.startswith(prefix) and key[len(prefix):] in _EXPERT_KEYS:
            parts = [torch.empty_like(t) for _ in range(P)]
            dist.all_gather(parts, t.contiguous(), group=group)
            out[key] = torch.cat(parts, dim=0)
        else:
            out[key] = t
    return out
