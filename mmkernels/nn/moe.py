"""A mixture-of-experts layer: router, :func:`mmkernels.moe.route`, :func:`mmkernels.moe.experts`
and an optional sigmoid-gated shared expert (Qwen2-MoE).

Parameter names and layouts are transformers' (``MixtralSparseMoeBlock`` /
``Qwen2MoeSparseMoeBlock``): ``gate.weight`` (E, H), ``experts.gate_up_proj`` (E, 2I, H),
``experts.down_proj`` (E, H, I), ``shared_expert.{gate,up,down}_proj.weight``,
``shared_expert_gate.weight`` (1, H), so their ``state_dict`` loads into :class:`MoE` directly.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mmkernels import _backend
from mmkernels.ops import experts as _experts
from mmkernels.ops import moe_layer as _moe_layer
from mmkernels.ops import routing as _routing


def _module_hooks_set() -> bool:
    """Whether any global ``nn.Module`` hook is registered (``torch.nn.modules.module.register_module_*_hook``)."""
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _expert_tensors(experts: torch.nn.Module):
    """(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias) of an :class:`Experts`, read
    from its parameter dict as ``Module.__getattr__`` would (any other module: by attribute)."""
    p = experts._parameters
    if "gate_up_proj" in p and "down_proj" in p:
        return p["gate_up_proj"], p["down_proj"], p.get("gate_up_proj_bias"), p.get("down_proj_bias")
    return (experts.gate_up_proj, experts.down_proj, getattr(experts, "gate_up_proj_bias", None),
            getattr(experts, "down_proj_bias", None))


def _foldable_router(gate: torch.nn.Module, x: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor) -> Optional[torch.Tensor]:
    """``gate``'s weight when the router's linear may run inside the layer's autograd node
    (:class:`mmkernels.ops.moe_layer.MoELayerFunction`), else None: ``gate`` is a plain bias-free
    ``nn.Linear`` that calling would only run (no hooks on it, no global module hooks), autocast
    is off (on every device type: one check) and nothing traces the call. (A weight of another
    dtype or device than ``x`` is an error either way: the node's plan says so, as ``F.linear``
    would.)"""
    if type(gate) is not torch.nn.Linear or gate._parameters["bias"] is not None:
        return None
    w = gate._parameters["weight"]
    if (gate._forward_hooks or gate._forward_pre_hooks or gate._backward_hooks or gate._backward_pre_hooks
            or _module_hooks_set()
            or torch._C._is_any_autocast_enabled() or not _backend.direct_call_ok(x, w, gate_up, down)):
        return None
    return w


#: Standard deviation of the normal init of every weight (transformers' ``initializer_range``).
INIT_STD = 0.02


class MoEOutput(NamedTuple):
    """What :meth:`MoE.forward` returns."""

    #: ``(..., H)``: the layer's output, in the input's shape and dtype.
    output: torch.Tensor
    #: ``(T, E)``: the router logits of the ``T`` flattened tokens, in the input's dtype (for
    #: ``moe.load_balancing_loss`` / ``moe.router_z_loss``).
    router_logits: torch.Tensor
    #: ``(E,)`` int32: slots each expert received (after capacity drops).
    counts: torch.Tensor


class Experts(torch.nn.Module):
    """The routed experts' parameters in transformers' layout: ``gate_up_proj`` (E, 2I, H) — the
    gate rows then the up rows — ``down_proj`` (E, H, I), and with ``bias`` ``gate_up_proj_bias``
    (E, 2I) and ``down_proj_bias`` (E, H)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = torch.nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        if bias:
            self.gate_up_proj_bias = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, **kw))
            self.down_proj_bias = torch.nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.gate_up_proj, std=INIT_STD)
        torch.nn.init.normal_(self.down_proj, std=INIT_STD)
        if self.gate_up_proj_bias is not None:
            torch.nn.init.zeros_(self.gate_up_proj_bias)
            torch.nn.init.zeros_(self.down_proj_bias)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, bias={self.gate_up_proj_bias is not None}")


class SharedExpert(torch.nn.Module):
    """A dense gated MLP ``down_proj(act(gate_proj(x)) · up_proj(x))`` (Qwen2-MoE's ``Qwen2MoeMLP``;
    no biases), with the :class:`MoE`'s activation."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 alpha: float = _experts.OAI_ALPHA, limit: float = _experts.OAI_LIMIT, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False, **kw)
        self._spec = _experts.ExpertSpec(activation, False, alpha, limit)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            torch.nn.init.normal_(lin.weight, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_experts.gated(self.gate_proj(x), self.up_proj(x), self._spec))


class MoE(torch.nn.Module):
    r"""A mixture-of-experts layer: ``y = Σ_j w_j · expert_{e_j}(x) [+ σ(g·x) · shared(x)]``.

    Router: ``logits = gate(x)`` (a bias-free ``Linear(H, E)``), then :func:`mmkernels.moe.route`
    with ``scoring``, ``renormalize``, ``n_groups`` / ``topk_groups``, ``routed_scaling``,
    ``softmax_after_topk`` and ``capacity_factor`` (see there: Mixtral is the default,
    ``renormalize=False`` Qwen2/3-MoE and OLMoE without ``norm_topk_prob``,
    ``softmax_after_topk=True`` gpt-oss). Experts: :func:`mmkernels.moe.experts` with
    ``activation`` (``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"swiglu_oai"``) on
    ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) (optional biases with ``bias=True``);
    the gate rows come first, then the up rows, for every activation (gpt-oss's own parameters
    are transposed and interleave gate and up, and its router has a bias: convert them first).
    The routing weights stay differentiable, so the router learns through the experts' output.

    ``shared_expert_size``: adds Qwen2-MoE's shared expert, a dense gated MLP of that intermediate
    size (same activation, no biases) scaled per token by ``sigmoid(shared_expert_gate(x))``
    (``Linear(H, 1)``, no bias).

    Weights are drawn from ``N(0, 0.02²)`` (transformers' default ``initializer_range``), biases
    are zero.

    ``process_group``: expert parallelism over ``torch.distributed`` — each of the group's P ranks
    holds ``num_experts / P`` experts (``experts.*`` are that slice: rank r's experts
    ``[r·E/P, (r+1)·E/P)``; :func:`mmkernels.ops.expert_parallel.shard_state_dict` /
    ``gather_state_dict`` convert full state dicts), routes its own tokens over all E experts and
    exchanges them with ``all_to_all_single`` (:mod:`mmkernels.ops.expert_parallel`). The router
    and shared expert are replicated (their gradients are per rank, as in data parallelism). The
    only host synchronisation is the read of the exchanged per-expert counts, the collectives'
    split sizes. ``num_experts`` not divisible by P is a ValueError.

    Input ``(..., H)``; :meth:`forward` returns a :class:`MoEOutput` ``(output (..., H),
    router_logits (T, E), counts (E,))`` with ``T`` the number of tokens (the product of the
    leading dims); feed ``router_logits`` to :func:`mmkernels.moe.load_balancing_loss` or
    :func:`mmkernels.moe.router_z_loss`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: bool = True, n_groups: Optional[int] = None,
                 topk_groups: Optional[int] = None, routed_scaling: float = 1.0, softmax_after_topk: bool = False,
                 activation: str = "silu", shared_expert_size: Optional[int] = None,
                 capacity_factor: Optional[float] = None, bias: bool = False, process_group=None,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={num_experts}, got {top_k}")
        if num_experts > _routing.MAX_EXPERTS:
            raise ValueError(f"num_experts={num_experts}: at most {_routing.MAX_EXPERTS} are supported")
        if activation not in _experts.ACTIVATIONS:
            raise ValueError(f"activation must be one of {_experts.ACTIVATIONS}, got {activation!r}")
        if shared_expert_size is not None and (not isinstance(shared_expert_size, int) or shared_expert_size < 1):
            raise ValueError(f"shared_expert_size must be a positive int or None, got {shared_expert_size!r}")
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.route_kwargs = dict(scoring=scoring, renormalize=renormalize, n_groups=n_groups, topk_groups=topk_groups,
                                 routed_scaling=routed_scaling, softmax_after_topk=softmax_after_topk,
                                 capacity_factor=capacity_factor)
        self.activation = activation
        self._plans = _moe_layer.LayerPlans()
        # Routing options are checked now, on a dummy row, rather than on the first forward.
        _routing.check_route_args(torch.zeros(1, num_experts), top_k, scoring, renormalize, None, n_groups,
                                   topk_groups, routed_scaling, softmax_after_topk, capacity_factor, None,
                                   _routing.DEFAULT_BLOCK_M)
        self.gate = torch.nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.process_group = process_group
        local = num_experts
        if process_group is not None:
            from mmkernels.ops import expert_parallel as _ep

            start, stop = _ep.local_expert_range(num_experts, process_group)
            local = stop - start
        self.experts = Experts(hidden_size, intermediate_size, local, bias=bias, **kw)
        if shared_expert_size is not None:
            self.shared_expert = SharedExpert(hidden_size, shared_expert_size, activation, **kw)
            self.shared_expert_gate = torch.nn.Linear(hidden_size, 1, bias=False, **kw)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.gate.weight, std=INIT_STD)
        self.experts.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()
            torch.nn.init.normal_(self.shared_expert_gate.weight, std=INIT_STD)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"input must have shape (..., hidden_size={self.hidden_size}), got {tuple(x.shape)}")
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, self.hidden_size)
        block_m = _routing.suggest_block_m(x2.shape[0], self.num_experts, self.top_k)
        gate = self._modules["gate"]  # what self.gate finds, without Module.__getattr__ (about 2 µs a name)
        gu, dn, b1, b2 = _expert_tensors(self._modules["experts"])
        if self.process_group is not None:
            from mmkernels.ops import expert_parallel as _ep

            logits = gate(x2)
            routing = _routing.route(logits, self.top_k, **self.route_kwargs, block_m=block_m)
            out = _ep.expert_parallel_experts(x2, routing, gu, dn, self.process_group, activation=self.activation,
                                              gate_up_bias=b1, down_bias=b2)
            counts = routing.counts
        elif (w := _foldable_router(gate, x2, gu, dn)) is not None:
            save = torch.is_grad_enabled() and (x2.requires_grad or w.requires_grad or gu.requires_grad
                                                or dn.requires_grad or (b1 is not None and b1.requires_grad)
                                                or (b2 is not None and b2.requires_grad))
            plan = self._plans.get(x2, w, gu, dn, b1, b2, self.top_k, block_m, self.activation, self.route_kwargs,
                                   True, save)
            out, counts, logits = _moe_layer.MoELayerFunction.apply(x2, w, gu, dn, b1, b2, plan)
        else:
            logits = gate(x2)
            out, counts = _moe_layer.moe_layer(logits, x2, gu, dn, self.top_k, block_m=block_m,
                                               activation=self.activation, gate_up_bias=b1, down_bias=b2,
                                               **self.route_kwargs)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return MoEOutput(out if x.dim() == 2 else out.reshape(shape), logits, counts)

    def extra_repr(self) -> str:
        defaults = dict(scoring="softmax", renormalize=True, n_groups=None, topk_groups=None, routed_scaling=1.0,
                        softmax_after_topk=False, capacity_factor=None)
        opts = {k: v for k, v in self.route_kwargs.items() if v != defaults[k]}
        extra = "".join(f", {k}={v}" for k, v in opts.items())
        shared = f", shared_expert_size={self.shared_expert.gate_proj.out_features}" if self.shared_expert is not None else ""
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}{shared}{extra}")


class DenseMoE(MoE):
    r"""Dense mixture of experts (docs/modules.md): ``y = Σ_e softmax(gate(x))_e · expert_e(x)`` over all
    ``num_experts`` — a :class:`MoE` with ``top_k = num_experts`` and the softmax over every expert
    (``renormalize=False``), so the same kernels (no per-expert loop), parameters and
    :class:`MoEOutput`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, *, activation: str = "silu",
                 bias: bool = False, device=None, dtype=None):
        super().__init__(hidden_size, intermediate_size, num_experts, num_experts, renormalize=False,
                         activation=activation, bias=bias, device=device, dtype=dtype)
