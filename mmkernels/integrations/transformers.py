"""Hugging Face transformers: ``experts_implementation="mmkernels"``.

transformers (5.x) runs the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
gpt-oss, DeepSeek-V3, ...) through ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``: an
experts module decorated with ``@use_experts_implementation`` calls
``fn(self, hidden_states, top_k_index, top_k_weights)`` for the name in
``config._experts_implementation``. :func:`register` adds :func:`experts_forward` there::

    import mmkernels.integrations.transformers as mmk_hf
    mmk_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="mmkernels")
    # or, on a built model:  model.set_experts_implementation("mmkernels")

The router stays transformers' own: :func:`experts_forward` takes its expert ids and weights,
builds the dispatch metadata with ``moe.route(zero.expand(T, E), k, expert_ids=top_k_index)`` (no
logits tensor: one broadcast zero) and runs
``moe.experts(..., routing_weights=top_k_weights)``, so gradients reach the router through
``top_k_weights``. Transposed parameters (gpt-oss: ``gate_up_proj`` (E, H, 2I), ``down_proj``
(E, I, H)) are passed as ``.transpose(1, 2)`` views, never copied.

What the experts module may be (read from its attributes on every call):

* ``has_gate`` True (``gate_up_proj``; ``has_gate=False`` experts, e.g. Nemotron-H, are not
  supported), any ``is_transposed``, any ``has_bias`` (``gate_up_proj_bias`` (E, 2I),
  ``down_proj_bias`` (E, H));
* the gate: transformers' default ``act_fn(gate) * up`` on the concatenated halves, with
  ``act_fn`` one of SiLU (``"silu"``, ``"swish"``), exact GELU (``"gelu"``,
  ``"gelu_python"``, ``nn.GELU()``), tanh-GELU (``"gelu_pytorch_tanh"``, ``"gelu_new"``,
  ``"gelu_fast"``, ``"gelu_accurate"``, ``nn.GELU("tanh")``) or ReLU; or gpt-oss's clamped SwiGLU
  (``GptOssExperts._apply_gate``, interleaved gate/up, ``self.alpha`` / ``self.limit``), or its
  concatenated variants (OpenAI privacy filter, MiniMax-M3-VL).

Anything else (another ``_apply_gate``, another activation, no gate) raises
``NotImplementedError`` naming what is unsupported and pointing at ``"grouped_mm"``; a name
registered with ``register(name, fallback=True)`` runs transformers' ``grouped_mm`` for such
modules instead (warning once per experts class). Raising is the default because a model that
asked for mmkernels should not silently run something else.

Expert parallelism: transformers marks the choices of experts that live on another rank with a
sentinel id ``>= E`` (``E`` = experts held here, ``gate_up_proj.shape[0]``). Those slots are
dispatched nowhere: the routing is built over ``E + 1`` columns (the sentinels in column ``E``)
and column ``E`` is then cut off, so the sentinel slots become rows past ``offsets[E]`` — the
rows the experts skip, as capacity-dropped slots are (``Routing.dropped`` marks them). They
contribute nothing to the output and get zero gradients (``top_k_weights`` included), with no
host synchronisation. (With ``E = 1024`` = ``MAX_EXPERTS`` there is no spare column; sentinels
then fail ``route``'s range check.)

``hidden_states`` is cast to the parameters' dtype (as transformers' ``grouped_mm`` does) and the
output back to ``hidden_states``' dtype.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from mmkernels import moe
from mmkernels.ops.routing import MAX_EXPERTS

__all__ = ["NAME", "register", "experts_forward", "experts_forward_with_fallback", "resolve_experts_spec",
           "routing_from_ids", "ExpertsModuleSpec"]

#: The default name of the implementation in ``ALL_EXPERTS_FUNCTIONS``.
NAME = "mmkernels"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExpertsModuleSpec:
    """How :func:`moe.experts` must be called for one transformers experts module."""

    activation: str
    interleaved: bool
    alpha: Optional[float] = None  # swiglu_oai only
    limit: Optional[float] = None  # swiglu_oai only


# (function module, function qualname) of known ``_apply_gate`` methods -> (interleaved, alpha
# attribute, limit attribute) of an ``activation="swiglu_oai"`` gate: ``(clamp(up, ±limit) + 1) ·
# g·σ(alpha·g)``, ``g = min(gate, limit)``. Matched by name so no model module is imported here.
_OAI_GATES = {
    ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts._apply_gate"): (True, "alpha", "limit"),
    ("transformers.models.openai_privacy_filter.modeling_openai_privacy_filter",
     "OpenAIPrivacyFilterExperts._apply_gate"): (False, "alpha", "limit"),
    ("transformers.models.minimax_m3_vl.modeling_minimax_m3_vl",
     "MiniMaxM3VLExperts._apply_gate"): (False, "swiglu_alpha", "swiglu_limit"),
}
_DEFAULT_GATE = ("transformers.integrations.moe", "_default_apply_gate")


def _activation_name(act) -> Optional[str]:
    """mmkernels' activation name of a transformers ``act_fn`` (ACT2FN instance, torch module or
    functional), or None. Exact types only: a subclass may compute something else."""
    import torch.nn.functional as F
    from transformers import activations as A

    nn = torch.nn
    t = type(act)
    if t in (A.SiLUActivation, nn.SiLU) or act is F.silu:
        return "silu"
    if t is A.GELUActivation or act is F.gelu:  # use_gelu_python: the same erf formula
        return "gelu"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    tanh_gelus = tuple(getattr(A, n) for n in ("GELUTanh", "NewGELUActivation", "FastGELUActivation",
                                                "AccurateGELUActivation") if hasattr(A, n))
    if t in tanh_gelus:
        return "gelu_tanh"
    if t is nn.ReLU or act is F.relu or act is torch.relu:
        return "relu"
    return None


def _unsupported(module, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"experts_implementation='mmkernels' does not support {type(module).__name__}: {what}. "
        f"Use experts_implementation='grouped_mm' (or 'eager') for this model, or register the mmkernels "
        f"implementation with mmkernels.integrations.transformers.register(name, fallback=True) to fall back "
        f"to 'grouped_mm' for such modules.")


@torch.compiler.assume_constant_result
def resolve_experts_spec(module) -> ExpertsModuleSpec:
    """The :class:`ExpertsModuleSpec` of a transformers experts module, or ``NotImplementedError``
    saying why it has none. A constant to torch.compile (read from the module's class and
    attributes when the graph is traced)."""
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj"):
        raise _unsupported(module, "experts without a gate (has_gate=False: up_proj -> act -> down_proj); "
                                   "mmkernels' experts are gated (act(gate) * up)")
    gate_fn = getattr(type(module), "_apply_gate", None)
    key = (getattr(gate_fn, "__module__", None), getattr(gate_fn, "__qualname__", None))
    if key == _DEFAULT_GATE:
        act = getattr(module, "act_fn", None)
        name = _activation_name(act)
        if name is None:
            raise _unsupported(module, f"activation {type(act).__name__} (act_fn); supported: SiLU, GELU "
                                       f"(exact and tanh), ReLU")
        return ExpertsModuleSpec(name, interleaved=False)
    if key in _OAI_GATES:
        interleaved, alpha_attr, limit_attr = _OAI_GATES[key]
        return ExpertsModuleSpec("swiglu_oai", interleaved, float(getattr(module, alpha_attr)),
                                 float(getattr(module, limit_attr)))
    raise _unsupported(module, f"its gate {key[1] or gate_fn!r} (only transformers' default act(gate) * up and "
                               f"gpt-oss's clamped SwiGLU are known)")


def routing_from_ids(top_k_index: torch.Tensor, num_experts: int, block_m: Optional[int] = None) -> moe.Routing:
    """The dispatch metadata of given choices ``top_k_index`` (T, k) with tiles of ``block_m`` rows
    (None: :func:`mmkernels.moe.suggest_block_m`); ids ``>= num_experts``
    (expert-parallel sentinels) become dropped slots (see the module docstring): past
    ``offsets[E]``, ``dropped`` True, ``expert_ids`` E, no tiles. Its ``weights`` are placeholders
    (uniform): pass the real ones to ``moe.experts(routing_weights=...)``."""
    T, k = top_k_index.shape
    E = num_experts
    dev = top_k_index.device
    if block_m is None:
        block_m = moe.suggest_block_m(T, E, k)
    # the router's weights are the caller's: the logits are one zero broadcast over (T, E) (no
    # T x E tensor; the routing reads its placeholder weights from it)
    zero = torch.zeros((), device=dev, dtype=torch.float32)
    if E >= MAX_EXPERTS:  # no spare column: plain routing (sentinels fail its range check)
        return moe.route(zero.expand(T, E), k, expert_ids=top_k_index, block_m=block_m)
    ids = top_k_index.clamp(max=E)  # every sentinel -> column E
    r = moe.route(zero.expand(T, E + 1), k, expert_ids=ids, block_m=block_m)
    # Column E's slots are last among the kept rows (sorted by expert) and its tiles last in the
    # tile table: cut them off, and the rows from offsets[E] on are the experts' skipped rows.
    keep = r.tile_experts < E
    tile_experts = torch.where(keep, r.tile_experts, torch.full_like(r.tile_experts, -1))
    tile_row_starts = torch.where(keep, r.tile_row_starts, torch.full_like(r.tile_row_starts, -1))
    num_tiles = (tile_experts >= 0).sum().to(torch.int32).reshape(1)
    return dataclasses.replace(r, counts=r.counts[:E], offsets=r.offsets[:E + 1], dropped=r.dropped | (ids == E),
                               tile_experts=tile_experts, tile_row_starts=tile_row_starts, num_tiles=num_tiles)


def _run(module, spec: ExpertsModuleSpec, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    gate_up, down = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):  # (E, H, 2I) / (E, I, H): views, no copies
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    b1 = b2 = None
    if getattr(module, "has_bias", False):
        b1, b2 = module.gate_up_proj_bias, module.down_proj_bias
    routing = routing_from_ids(top_k_index, gate_up.shape[0])
    oai = spec.activation == "swiglu_oai"
    out = moe.experts(hidden_states.to(gate_up.dtype), routing, gate_up, down, activation=spec.activation,
                      gate_up_bias=b1, down_bias=b2, interleaved=spec.interleaved,
                      swiglu_alpha=spec.alpha if oai else None, swiglu_limit=spec.limit if oai else None,
                      routing_weights=top_k_weights)
    return out.to(hidden_states.dtype)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface, computed by :func:`mmkernels.moe.experts`.

    Args:
        self: the experts module (``gate_up_proj``, ``down_proj``, optional biases and the
            ``use_experts_implementation`` flags).
        hidden_states: ``(T, H)``.
        top_k_index: ``(T, k)`` integer expert ids from the model's router (``>= E``: EP sentinel).
        top_k_weights: ``(T, k)`` the router's weights (differentiable).

    Returns:
        ``(T, H)`` in ``hidden_states``' dtype.
    """
    return _run(self, resolve_experts_spec(self), hidden_states, top_k_index, top_k_weights)


_WARNED = set()


def experts_forward_with_fallback(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """:func:`experts_forward`, or transformers' ``grouped_mm_experts_forward`` for modules it does
    not support (warning once per experts class)."""
    try:
        spec = resolve_experts_spec(self)
    except NotImplementedError as err:
        from transformers.integrations.moe import grouped_mm_experts_forward

        if type(self) not in _WARNED:
            _WARNED.add(type(self))
            _log.warning("%s; running transformers' grouped_mm instead", err.args[0].split(". Use")[0])
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _run(self, spec, hidden_states, top_k_index, top_k_weights)


def register(name: str = NAME, *, fallback: bool = False) -> str:
    """Register the mmkernels experts implementation in transformers'
    ``ALL_EXPERTS_FUNCTIONS`` under ``name`` (idempotent); afterwards
    ``from_pretrained(..., experts_implementation=name)`` and
    ``model.set_experts_implementation(name)`` accept it.

    Args:
        name: the implementation's name (default ``"mmkernels"``).
        fallback: unsupported experts modules run transformers' ``grouped_mm`` (with a warning)
            instead of raising ``NotImplementedError``.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed (or has no experts interface, i.e. < 5).
    """
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as err:
        raise ImportError("mmkernels.integrations.transformers.register() needs transformers >= 5 "
                          "(transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS)") from err
    ALL_EXPERTS_FUNCTIONS.register(name, experts_forward_with_fallback if fallback else experts_forward)
    return name
