"""MoE expert dispatch: the experts of a mixture-of-experts layer as grouped GEMMs over a :class:`Routing`.

``out[t] = Σ_j w[t, j] · expert_{e[t, j]}(x[t])`` with gated experts
``expert_e(x) = down_e(act(gate_e(x)) · up_e(x))`` — transformers' fused 3-D parameter layout:
``gate_up_proj`` (E, 2I, H) whose rows are the gate rows then the up rows (``interleaved``: gate
and up alternate, as gpt-oss stores them), ``down_proj`` (E, H, I).

Order in this file: activations -> argument checks -> CPU path -> autograd.Function -> public
functional. The Triton path follows in ``triton_kernels/experts.py``.

Rows. Every GEMM runs over the *expert-ordered rows* of the routing: row ``r < offsets[E]`` is slot
``sorted_slots[r]`` (token ``sorted_slots[r] // k``); dropped slots (capacity) contribute nothing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._launch import Launch
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._util import acc_dtype, cdiv, dot_f32, gpu_arch, math_dtype, next_pow2, sm_count
from mmkernels.ops.routing import Routing

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
#: gpt-oss's clamped SwiGLU constants (``GptOssExperts.alpha`` / ``.limit``).
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """Everything of :func:`experts` but the tensors."""

    activation: str = "silu"
    interleaved: bool = False
    alpha: float = OAI_ALPHA  # swiglu_oai only
    limit: float = OAI_LIMIT  # swiglu_oai only


# ----------------------------------------------------------------------------------------------
# Activations (the gated product and its derivative, in the compute dtype)
# ----------------------------------------------------------------------------------------------

def split_gate_up(h: torch.Tensor, interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of the first GEMM's output ``h`` (rows, 2I)."""
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    n = h.shape[1] // 2
    return h[:, :n], h[:, n:]


def gated(gate: torch.Tensor, up: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """``act(gate) · up`` (gpt-oss: ``(clamp(up) + 1) · g·σ(α g)`` with ``g = min(gate, limit)``)."""
    a = spec.activation
    if a == "silu":
        return torch.nn.functional.silu(gate) * up
    if a == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if a == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    if a == "relu":
        return torch.relu(gate) * up
    g = gate.clamp(max=spec.limit)
    u = up.clamp(min=-spec.limit, max=spec.limit)
    return (u + 1) * (g * torch.sigmoid(g * spec.alpha))


def gated_backward(gate: torch.Tensor, up: torch.Tensor, da: torch.Tensor,
                   spec: ExpertSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``a = gated(gate, up)`` for the incoming ``da``."""
    a = spec.activation
    if a == "silu":
        s = torch.sigmoid(gate)
        act, dact = gate * s, s * (1 + gate * (1 - s))
    elif a == "gelu":
        cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
        pdf = torch.exp(-0.5 * gate * gate) * 0.3989422804014327
        act, dact = gate * cdf, cdf + gate * pdf
    elif a == "gelu_tanh":
        c = 0.7978845608028654
        inner = c * (gate + 0.044715 * gate ** 3)
        th = torch.tanh(inner)
        act = 0.5 * gate * (1 + th)
        dact = 0.5 * (1 + th) + 0.5 * gate * (1 - th * th) * c * (1 + 3 * 0.044715 * gate * gate)
    elif a == "relu":
        act, dact = torch.relu(gate), (gate > 0).to(gate.dtype)
    else:
        g = gate.clamp(max=spec.limit)
        u = up.clamp(min=-spec.limit, max=spec.limit)
        s = torch.sigmoid(g * spec.alpha)
        glu = g * s
        dglu = (s + g * spec.alpha * s * (1 - s)) * (gate <= spec.limit).to(gate.dtype)
        dgate = da * (u + 1) * dglu
        dup = da * glu * ((up >= -spec.limit) & (up <= spec.limit)).to(up.dtype)
        return dgate, dup
    return da * up * dact, da * act


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def check_experts_args(x, num_tokens: int, num_experts: int, top_k: int, gate_up, down, b1, b2, weights,
                       activation, interleaved, swiglu_alpha, swiglu_limit, block_m: int) -> ExpertSpec:
    """Checks :func:`experts`' arguments against a routing of ``num_tokens`` tokens to ``top_k`` of
    ``num_experts`` experts with ``block_m``-row tiles; ``weights`` None: not given (the routing's,
    made on the logits' device). Returns the experts' :class:`ExpertSpec`."""
    _check_tensor("hidden_states", x)
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D (T, H), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"hidden_states must be float16, bfloat16, float32 or float64, got {x.dtype}")
    T, H = x.shape
    E, k = num_experts, top_k
    if num_tokens != T:
        raise ValueError(f"routing is for {num_tokens} tokens, hidden_states has T={T}")
    _check_tensor("gate_up_proj", gate_up)
    _check_tensor("down_proj", down)
    if gate_up.dim() != 3 or gate_up.shape[0] != E or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up_proj must have shape (E, 2I, H) = ({E}, 2I, {H}), got {tuple(gate_up.shape)}")
    I = gate_up.shape[1] // 2
    if down.shape != (E, H, I):
        raise ValueError(f"down_proj must have shape (E, H, I) = ({E}, {H}, {I}), got {tuple(down.shape)}")
    named = [("hidden_states", x), ("gate_up_proj", gate_up), ("down_proj", down)]
    if b1 is not None:
        _check_tensor("gate_up_bias", b1)
        if b1.shape != (E, 2 * I):
            raise ValueError(f"gate_up_bias must have shape (E, 2I) = ({E}, {2 * I}), got {tuple(b1.shape)}")
        named.append(("gate_up_bias", b1))
    if b2 is not None:
        _check_tensor("down_bias", b2)
        if b2.shape != (E, H):
            raise ValueError(f"down_bias must have shape (E, H) = ({E}, {H}), got {tuple(b2.shape)}")
        named.append(("down_bias", b2))
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have hidden_states' dtype {x.dtype}, got {t.dtype}")
    if weights is not None:
        _check_tensor("routing_weights", weights)
        if weights.shape != (T, k):
            raise ValueError(f"routing_weights must have shape (T, k) = ({T}, {k}), got {tuple(weights.shape)}")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"routing_weights must be floating-point, got {weights.dtype}")
        named.append(("routing_weights", weights))
    for name, t in named[1:]:
        if t.device != x.device:
            raise ValueError(f"{name} must be on hidden_states' device {x.device}, got {t.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (swiglu_alpha is not None or swiglu_limit is not None) and activation != "swiglu_oai":
        raise ValueError("swiglu_alpha / swiglu_limit apply to activation='swiglu_oai' (gpt-oss) only")
    if block_m < MIN_BLOCK and backend_of(x) == "triton":
        raise ValueError(f"the Triton path needs a routing with block_m >= {MIN_BLOCK}, got {block_m}")
    return ExpertSpec(activation, bool(interleaved),
                      OAI_ALPHA if swiglu_alpha is None else float(swiglu_alpha),
                      OAI_LIMIT if swiglu_limit is None else float(swiglu_limit))


# ----------------------------------------------------------------------------------------------
# Config resolver and Triton launchers
# ----------------------------------------------------------------------------------------------

#: Smallest tile dim ``tl.dot`` takes: the routing's ``block_m`` must be at least this.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """Tiles of one expert GEMM. Grouped GEMMs (``up``, ``down``, ``dact``, ``dx``): ``block_m`` is
    the routing's tile height, ``block_n`` the output columns, ``block_k`` the reduction step.
    Weight gradients (``dgate_up``, ``ddown``): ``block_m`` x ``block_n`` is the output tile and
    ``block_k`` the rows of the routing reduced per step. ``group``: tiles walked together (see
    ``triton_kernels.experts._grouped_pid``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group: int = 8


#: The six GEMM kernels, by role: the forward's two grouped GEMMs, the backward's two grouped GEMMs
#: and the two per-expert weight gradients.
KERNELS = ("up", "down", "dact", "dx", "dgate_up", "ddown")
#: Output tiles each role's kernel holds (gate and up: 2).
_ACCUMULATORS = {"up": 2, "down": 1, "dact": 1, "dx": 1, "dgate_up": 1, "ddown": 1}

#: 16-bit (tensor-core) tiles by role: (block_n, block_k, warps, stages) of the grouped GEMMs
#: and (block_m, block_n, block_k, warps, stages) of the weight gradients, for routing tiles of 64
#: rows or more — the fastest without spills of ``bench/experts_configs.py`` at the Qwen3 / Mixtral
#: / OLMoE shapes (T = 16384, 128-row routing tiles, H200; bench/NOTES.md). ``_TC_TILES_SM90``
#: overrides where sm_90 takes a larger tile that spills on sm_80 (the compile tier checks each
#: target with its own tiles).
_TC_TILES = {"up": (64, 64, 8, 4), "down": (128, 64, 8, 3), "dact": (64, 64, 8, 3), "dx": (128, 64, 8, 4),
             "dgate_up": (128, 128, 64, 8, 3), "ddown": (128, 128, 64, 8, 3)}
_TC_TILES_SM90 = {"up": (128, 64, 16, 4), "down": (256, 64, 8, 3), "dact": (64, 64, 8, 4), "dx": (256, 64, 8, 3),
                  "dgate_up": (128, 256, 64, 8, 3), "ddown": (128, 256, 64, 8, 3)}


@functools.lru_cache(maxsize=None)
def resolve_config(kernel: str, block_m: int, n: int, k: int, dtype: torch.dtype,
                   arch: Optional[int] = None) -> ExpertsConfig:
    """Tiles for ``kernel`` (one of :data:`KERNELS`) on compute capability ``arch`` (None: tiles
    clean on every target).

    Grouped GEMMs: ``block_m`` is the routing's tile height, ``n`` the output's columns, ``k`` the
    reduction. Weight gradients (``block_m`` unused): the output is ``k`` x ``n`` (rows x columns)
    and the reduction runs over the routing's rows, ``block_k`` at a time.

    16-bit storage runs on tensor cores with the measured tiles of :data:`_TC_TILES` (routing tiles
    under 64 rows — decode — take 64 columns and 4 warps: more programs over the weights). fp32
    (IEEE dots on FMA units) 32 x 32 and fp64 16 x 16 — the compile tier showed larger fp32 / fp64
    tiles spilling. Sizes below the tile shrink it, never below :data:`MIN_BLOCK`; small tiles
    run 4 warps."""
    wgrad = kernel in ("dgate_up", "ddown")
    stages = 3
    if dtype in (torch.float16, torch.bfloat16):
        tiles = _TC_TILES_SM90.get(kernel, _TC_TILES[kernel]) if arch == 9 else _TC_TILES[kernel]
        if wgrad:
            bm, bn, bk, warps, stages = tiles
        elif block_m >= 64:
            bm, (bn, bk, warps, stages) = block_m, tiles
        else:
            bm, bn, bk, warps = block_m, 64, 64, 4
    elif dtype == torch.float32:
        bm, bn, bk, warps = 32, 32, 32, 4
    else:
        bm, bn, bk, warps = 16, 16, 16, 4
    bn = max(MIN_BLOCK, min(bn, next_pow2(n)))
    if wgrad:  # shrink to the output's rows, not under 64 in 16-bit (HGMMA's smallest M)
        bm = min(bm, max(64 if dtype in (torch.float16, torch.bfloat16) else MIN_BLOCK, next_pow2(k)))
    else:
        bm, bk = block_m, max(MIN_BLOCK, min(bk, next_pow2(k)))
    if bm * bn * _ACCUMULATORS[kernel] < (64 * 128 if dtype in (torch.float16, torch.bfloat16) else 4096):
        warps = 4
    elif dtype not in (torch.float16, torch.bfloat16):
        warps = 8
    return ExpertsConfig(bm, bn, bk, warps, stages, group=8)


def grouped_launch(routing, n: int, c: ExpertsConfig) -> Tuple[Tuple[int], dict]:
    """(grid, launch arguments) of a grouped GEMM's tiling at config ``c`` over ``n`` output
    columns: a 1-D grid of every possible tile (``routing.max_tiles``) x the column blocks of
    ``n``; the arguments name the tile and its warps and stages (what ``bench/experts_configs.py``
    relaunches a recorded launch with)."""
    return _grouped_launch(routing.max_tiles, n, c)


def _grouped_launch(max_tiles: int, n: int, c: ExpertsConfig) -> Tuple[Tuple[int], dict]:
    grid = (max_tiles * cdiv(n, c.block_n),)
    return grid, dict(NUM_TILES=max_tiles, NUM_COLS=cdiv(n, c.block_n), GROUP=c.group,
                      BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                      num_warps=c.num_warps, num_stages=c.num_stages)


def weight_grad_launch(E: int, m: int, n: int, c: ExpertsConfig) -> Tuple[Tuple[int, int], dict]:
    """(grid, launch arguments) of a weight gradient at config ``c``: the (m, n) output tiles of
    one expert x the experts."""
    grid = (cdiv(m, c.block_m) * cdiv(n, c.block_n), E)
    return grid, dict(NUM_M=cdiv(m, c.block_m), NUM_N=cdiv(n, c.block_n), GROUP=c.group,
                      BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=c.block_k,
                      num_warps=c.num_warps, num_stages=c.num_stages)


#: The least BLOCK_K steps one split of a split-K down GEMM reduces.
MIN_SPLIT_STEPS = 4


def down_splits(routing, n: int, kd: int, c: ExpertsConfig, sms: int) -> int:
    """Reduction splits of the forward's down GEMM: 1, unless the programs with rows (about one
    tile per expert hit at decode: ``min(E, T·k)`` tiles x the column blocks of ``n``) are under
    one wave of ``sms`` — then enough splits to fill it, at most 8, each at least
    :data:`MIN_SPLIT_STEPS` BLOCK_K steps of the ``kd`` reduction (deterministic: the combine
    sums the planes in order)."""
    return _down_splits(routing.sorted_slots.shape[0], routing.max_tiles, routing.num_experts, n, kd, c, sms)


def _down_splits(slots: int, max_tiles: int, num_experts: int, n: int, kd: int, c: ExpertsConfig, sms: int) -> int:
    busy = min(max_tiles, num_experts, slots) * cdiv(n, c.block_n)
    if busy >= sms or slots == 0:
        return 1
    return max(1, min(8, cdiv(sms, busy), kd // (c.block_k * MIN_SPLIT_STEPS)))


def _config(role: str, configs: Optional[Mapping[str, ExpertsConfig]], block_m: int, n: int, k: int,
            dtype: torch.dtype, arch: Optional[int]) -> ExpertsConfig:
    """``configs[role]`` when given (a grouped GEMM's ``block_m`` is the routing's), else the resolver's."""
    if configs and role in configs:
        c = configs[role]
        return c if role in ("dgate_up", "ddown") else dataclasses.replace(c, block_m=block_m)
    return resolve_config(role, block_m, n, k, dtype, arch)


#: What a grouped GEMM's call passes besides its operands and strides: the routing's tile table.
_TILES = ("tile_experts_ptr", "tile_starts_ptr", "offsets_ptr", "sorted_ptr")
#: The runtime arguments of each kernel's launches (:class:`~mmkernels.ops._launch.Launch`).
_UP_ARGS = ("x_ptr", "gu_ptr", "b1_ptr", "h_ptr", "a_ptr", *_TILES, "s_xt", "s_xh", "s_ge", "s_gn", "s_gh")
_ROWS_ARGS = ("a_ptr", "wm_ptr", "b_ptr", "w_ptr", "out_ptr", *_TILES, "s_me", "s_mn", "s_mk", "s_wt", "s_wj")
_DACT_ARGS = ("dout_ptr", "d_ptr", "b2_ptr", "h_ptr", "a_ptr", "w_ptr", "dh_ptr", "dwp_ptr", *_TILES,
              "s_ot", "s_oh", "s_de", "s_dh", "s_di", "s_wt", "s_wj")
_DW_ARGS = ("dwp_ptr", "slot_rows_ptr", "offsets_ptr", "dw_ptr")
_DWEIGHT_ARGS = ("lhs_ptr", "rhs_ptr", "grad_ptr", "dbias_ptr", "offsets_ptr")
_GATHER_ARGS = ("src_ptr", "sorted_ptr", "offsets_ptr", "w_ptr", "dst_ptr", "s_st", "s_sh", "s_wt", "s_wj")
_COMBINE_ARGS = ("y_ptr", "slot_rows_ptr", "offsets_ptr", "out_ptr")


def _launch(kernel: str, grid, runtime, args) -> Launch:
    from mmkernels._triton import experts as KX

    return Launch(KX, kernel, grid, runtime, args)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """The forward's launches (up GEMM, down GEMM, combine), the down GEMM's reduction splits and
    the dtype of its row outputs ``y`` (the storage dtype; the math dtype for split-K partials)."""

    up: Launch
    down: Launch
    splits: int
    combine: Launch
    y_dtype: torch.dtype


def _forward_plan(T: int, H: int, I: int, k: int, E: int, max_tiles: int, block_m: int, dtype: torch.dtype,
                  f32_dots: bool, arch: Optional[int], sms: int, spec: ExpertSpec, has_b1: bool, has_b2: bool,
                  save_h: bool, split_k: Optional[int], configs: Optional[Mapping[str, ExpertsConfig]] = None):
    """The :class:`ForwardPlan` of :func:`triton_forward` (cached by :func:`_cached_forward_plan`
    when no ``configs`` are given)."""
    rows = T * k
    common = dict(PRECISION="ieee", ACC=acc_dtype(dtype), DOT_F32=f32_dots)
    c1 = _config("up", configs, block_m, I, H, dtype, arch)
    grid, tiling = _grouped_launch(max_tiles, I, c1)
    up = _launch("experts_up_kernel", grid, _UP_ARGS, dict(tiling, H=H, I=I, K=k, alpha=spec.alpha, limit=spec.limit, INTERLEAVED=spec.interleaved,
                            HAS_BIAS=has_b1, SAVE_H=save_h, ACT=ACTIVATIONS.index(spec.activation), **common))
    c2 = _config("down", configs, block_m, H, I, dtype, arch)
    grid, tiling = _grouped_launch(max_tiles, H, c2)
    splits = _down_splits(rows, max_tiles, E, H, I, c2, sms) if split_k is None else split_k
    kd_split = cdiv(cdiv(I, splits), c2.block_k) * c2.block_k
    down = _launch("experts_rows_kernel", grid + (splits,), _ROWS_ARGS,
                   dict(tiling, N=H, KD=I, K=k, KD_SPLIT=kd_split, s_split=rows * H if splits > 1 else 0,
                        HAS_BIAS=has_b2, WEIGHTED=True, **common))
    return ForwardPlan(up, down, splits, _combine_launch(T, H, k, E, splits, dtype),
                       dtype if splits == 1 else math_dtype(dtype))


_cached_forward_plan = functools.lru_cache(maxsize=256)(_forward_plan)


def forward_plan(x, routing, gate_up, b1, b2, spec: ExpertSpec, save_h: bool, *,
                 configs: Optional[Mapping[str, ExpertsConfig]] = None, arch: Optional[int] = None,
                 split_k: Optional[int] = None) -> ForwardPlan:
    """The :class:`ForwardPlan` of :func:`triton_forward`'s arguments (cached by shape and options
    unless ``configs`` are given)."""
    arch = gpu_arch(x) if arch is None else arch
    key = (x.shape[0], x.shape[1], gate_up.shape[1] // 2, routing.top_k, routing.num_experts, routing.max_tiles,
           routing.block_m, x.dtype, dot_f32(x), arch, sm_count(x, arch), spec, b1 is not None, b2 is not None,
           save_h, split_k)
    return _forward_plan(*key, configs) if configs else _cached_forward_plan(*key)


def triton_forward(x, weights, gate_up, down, b1, b2, routing, spec: ExpertSpec, save_h: bool, *,
                   configs: Optional[Mapping[str, ExpertsConfig]] = None, arch: Optional[int] = None,
                   split_k: Optional[int] = None):
    """The forward's launches: ``(out (T, H), h, y, a)`` — the first GEMM's output ``h`` (T·k × 2I,
    gate | up; None unless ``save_h``), the weighted expert outputs ``y`` (T·k × H) and the
    activation ``a`` (T·k × I), in row order.

    ``routing``: a :class:`~mmkernels.ops.routing.Routing` or a :class:`Dispatch` (the fields the
    kernels read). ``configs``: tiles by role (:data:`KERNELS`) instead of the resolver's (config
    exploration); ``arch``: the compute capability major to resolve tiles for (default: the
    tensors' GPU — the compile tier records sm_80 and sm_90 launches on meta tensors);
    ``split_k``: the down GEMM's reduction splits (default :func:`down_splits`; ``y`` is then
    (splits, T·k, H) partial sums in the math dtype)."""
    T, H = x.shape
    I = gate_up.shape[1] // 2
    k = routing.top_k
    plan = forward_plan(x, routing, gate_up, b1, b2, spec, save_h, configs=configs, arch=arch, split_k=split_k)
    h = x.new_empty((T * k, 2 * I)) if save_h else None
    a = x.new_empty((T * k, I))
    # y: the weighted expert outputs in row order; split-K: one plane of partial sums per split (ACC)
    y = x.new_empty((plan.splits, T * k, H), dtype=plan.y_dtype)
    out = x.new_empty((T, H))
    launch_forward(plan, x, weights, gate_up, down, b1, b2, routing, h, a, y, out)
    return out, h, y, a


def launch_forward(plan: ForwardPlan, x, weights, gate_up, down, b1, b2, routing, h, a, y, out) -> None:
    """The forward's three launches of ``plan`` into given buffers (contiguous, any shape: ``h``
    T·k·2I elements or None unless the plan saves it, ``a`` T·k·I, ``y`` splits·T·k·H in
    ``plan.y_dtype``, ``out`` (T, H))."""
    tiles = (routing.tile_experts, routing.tile_row_starts, routing.offsets, routing.sorted_slots)
    sx, sg, sd, sw = x.stride(), gate_up.stride(), down.stride(), weights.stride()
    plan.up(x, gate_up, b1 if b1 is not None else gate_up, h if h is not None else a, a, *tiles, *sx, *sg)
    plan.down(a, down, b2 if b2 is not None else down, weights, y, *tiles, *sd, *sw)
    plan.combine(y, routing.slot_rows, routing.offsets, out)


def _backward_plan(T: int, H: int, I: int, k: int, E: int, max_tiles: int, block_m: int, dtype: torch.dtype,
                   f32_dots: bool, arch: Optional[int], spec: ExpertSpec, has_b1: bool, has_b2: bool, need: tuple,
                   configs: Optional[Mapping[str, ExpertsConfig]] = None) -> Dict[str, Launch]:
    """The launches of :func:`triton_backward` by name (those ``need`` asks for; cached by
    :func:`_cached_backward_plan` when no ``configs`` are given)."""
    common = dict(PRECISION="ieee", ACC=acc_dtype(dtype), DOT_F32=f32_dots)
    c1 = _config("dact", configs, block_m, I, H, dtype, arch)
    nb_i = cdiv(I, c1.block_n)
    grid, tiling = _grouped_launch(max_tiles, I, c1)
    plan = {"dact": _launch("experts_dact_kernel", grid, _DACT_ARGS,
                            dict(tiling, H=H, I=I, K=k, NB_I=nb_i, alpha=spec.alpha, limit=spec.limit,
                                 HAS_BIAS=has_b2, ACT=ACTIVATIONS.index(spec.activation),
                                 INTERLEAVED=spec.interleaved, **common))}
    if need[5]:
        k_pad = next_pow2(k)
        bt = max(1, 1024 // (k_pad * next_pow2(nb_i)))
        plan["dw"] = _launch("experts_dw_kernel", (cdiv(T, bt),), _DW_ARGS,
                             dict(T=T, K=k, E=E, NB_I=nb_i, BLOCK_T=bt, K_PAD=k_pad,
                                  ACC=common["ACC"]))
    if need[0]:
        c2 = _config("dx", configs, block_m, H, 2 * I, dtype, arch)
        grid, tiling = _grouped_launch(max_tiles, H, c2)
        plan["dx"] = _launch("experts_rows_kernel", grid + (1,), _ROWS_ARGS,
                             dict(tiling, N=H, KD=2 * I, K=k, KD_SPLIT=2 * I, s_split=0, HAS_BIAS=False,
                                  WEIGHTED=False, **common))
        plan["combine"] = _combine_launch(T, H, k, E, 1, dtype)
    if need[0] or need[1] or need[3] or need[2] or need[4]:
        plan["gather"] = _gather_launch(T * k, H, k, E, dtype, False)
        plan["gather_scaled"] = _gather_launch(T * k, H, k, E, dtype, True)
    if need[1] or need[3]:
        grid, tiling = weight_grad_launch(E, 2 * I, H, _config("dgate_up", configs, 0, H, 2 * I, dtype, arch))
        plan["dgate_up"] = _launch("experts_dweight_kernel", grid, _DWEIGHT_ARGS,
                                   dict(tiling, M=2 * I, N=H, s_ge=2 * I * H, s_gm=H, s_gn=1, HAS_BIAS=has_b1,
                                        **common))
    if need[2] or need[4]:
        grid, tiling = weight_grad_launch(E, H, I, _config("ddown", configs, 0, I, H, dtype, arch))
        plan["ddown"] = _launch("experts_dweight_kernel", grid, _DWEIGHT_ARGS,
                                dict(tiling, M=H, N=I, s_ge=H * I, s_gm=I, s_gn=1, HAS_BIAS=has_b2, **common))
    return plan


_cached_backward_plan = functools.lru_cache(maxsize=256)(_backward_plan)


def backward_plan(x, routing, gate_up, b1, b2, spec: ExpertSpec, need, *,
                  configs: Optional[Mapping[str, ExpertsConfig]] = None,
                  arch: Optional[int] = None) -> Dict[str, Launch]:
    """The launches of :func:`triton_backward` by name (cached by shape and options unless
    ``configs`` are given)."""
    arch = gpu_arch(x) if arch is None else arch
    key = (x.shape[0], x.shape[1], gate_up.shape[1] // 2, routing.top_k, gate_up.shape[0], routing.max_tiles,
           routing.block_m, x.dtype, dot_f32(x), arch, spec, b1 is not None, b2 is not None, tuple(need))
    return _backward_plan(*key, configs) if configs else _cached_backward_plan(*key)


def backward_scratch(plan: Dict[str, Launch], rows: int, I: int, H: int) -> Tuple[Tuple[int, int], int]:
    """Elements of :func:`launch_backward`'s scratch: ((``dh``, ``buf``) in the storage dtype,
    ``dwp`` in the math dtype)."""
    return (rows * 2 * I, rows * H if "gather" in plan else 0), rows * plan["dact"].bound["NB_I"]


def triton_backward(dout, x, weights, gate_up, down, b1, b2, routing, h, a, spec: ExpertSpec, need, *,
                    configs: Optional[Mapping[str, ExpertsConfig]] = None, arch: Optional[int] = None):
    """(dx, d gate_up, d down, d b1, d b2, d weights) from the saved ``h`` and ``a``; ``need``
    flags which to compute (in that order)."""
    T, H = x.shape
    E, I2, _ = gate_up.shape
    k = routing.top_k
    plan = backward_plan(x, routing, gate_up, b1, b2, spec, need, configs=configs, arch=arch)
    (n_dh, n_buf), n_dwp = backward_scratch(plan, T * k, I2 // 2, H)
    dh, buf = x.new_empty(n_dh + n_buf).split_with_sizes((n_dh, n_buf))
    grads = (x.new_empty((T, H)) if need[0] else None,
             gate_up.new_empty((E, I2, H)) if need[1] or need[3] else None,
             down.new_empty(down.shape) if need[2] or need[4] else None,
             gate_up.new_empty((E, I2)) if (need[1] or need[3]) and b1 is not None else None,
             down.new_empty((E, H)) if (need[2] or need[4]) and b2 is not None else None,
             weights.new_empty((T, k)) if need[5] else None)
    launch_backward(plan, dout, x, weights, gate_up, down, b1, b2, routing, h, a,
                    dh, x.new_empty(n_dwp, dtype=math_dtype(x.dtype)), buf, *grads)
    return grads


def launch_backward(plan: Dict[str, Launch], dout, x, weights, gate_up, down, b1, b2, routing, h, a,
                    dh, dwp, buf, dx, dgu, dd, db1, db2, dw) -> None:
    """The backward's launches of ``plan`` into given tensors: the scratch of
    :func:`backward_scratch` (``dh``, ``dwp``, ``buf``; any contiguous shape) and the gradients
    (contiguous, shaped as their tensors; None where the plan does not make them)."""
    tiles = (routing.tile_experts, routing.tile_row_starts, routing.offsets, routing.sorted_slots)
    sw = weights.stride()
    # dh: gate_up's row order
    plan["dact"](dout, down, b2 if b2 is not None else down, h, a, weights, dh, dwp, *tiles, *dout.stride(),
                 *down.stride(), *sw)
    if "dw" in plan:
        plan["dw"](dwp, routing.slot_rows, routing.offsets, dw)
    # one (rows, H) buffer, used in stream order: dx's rows, then x's rows, then w·dout's rows
    if "dx" in plan:  # dx rows = dh · gate_up_e: M_e[n, c] = gate_up[e, c, n]
        sg = gate_up.stride()
        plan["dx"](dh, gate_up, gate_up, weights, buf, *tiles, sg[0], sg[2], sg[1], *sw)
        plan["combine"](buf, routing.slot_rows, routing.offsets, dx)
    if "dgate_up" in plan:  # d gate_up_e = dhᵀ · x_rows (2I x H)
        plan["gather"](x, routing.sorted_slots, routing.offsets, weights, buf, *x.stride(), *sw)
        plan["dgate_up"](dh, buf, dgu, db1 if db1 is not None else dgu, routing.offsets)
    if "ddown" in plan:  # d down_e = (w·dout)_rowsᵀ · a_rows (H x I)
        plan["gather_scaled"](dout, routing.sorted_slots, routing.offsets, weights, buf, *dout.stride(), *sw)
        plan["ddown"](buf, a, dd, db2 if db2 is not None else dd, routing.offsets)


def _gather_launch(rows: int, H: int, k: int, E: int, dtype: torch.dtype, scale: bool) -> Launch:
    """The gather of a (T, H) source's rows into routing order (``scale``: times each row's routing
    weight); rows past ``offsets[E]`` are left unwritten (no kernel reads them)."""
    bh = max(16, min(256, next_pow2(H)))
    br = max(1, min(64, 8192 // bh))
    return _launch("experts_gather_kernel", (cdiv(rows, br), cdiv(H, bh)), _GATHER_ARGS,
                   dict(H=H, K=k, E=E, BLOCK_R=br, BLOCK_H=bh, SCALE=scale, ACC=acc_dtype(dtype)))


def _combine_launch(T: int, H: int, k: int, E: int, splits: int, dtype: torch.dtype) -> Launch:
    """The combine into a contiguous (T, H) output from contiguous planes (splits, T·k, H) of rows:
    ``out[t] = Σ_j Σ_s rows[s, row(t, j)]`` over the kept slots, j then the split planes ``s`` in
    order (deterministic)."""
    bh = max(16, min(256, next_pow2(H)))
    bt = max(1, min(16, 4096 // bh))
    return _launch("experts_combine_kernel", (cdiv(T, bt), cdiv(H, bh)), _COMBINE_ARGS,
                   dict(T=T, H=H, K=k, E=E, SPLITS=splits, s_split=T * k * H if splits > 1 else 0, s_ot=H, s_oh=1,
                        BLOCK_T=bt, BLOCK_H=bh, ACC=acc_dtype(dtype)))


# ----------------------------------------------------------------------------------------------
# CPU path: a loop over experts of matrix products on the expert-ordered rows
# ----------------------------------------------------------------------------------------------


def _rows(sorted_slots: torch.Tensor, offsets: torch.Tensor, k: int):
    """(kept rows n, token of each kept row, slot of each kept row, per-expert bounds as ints)."""
    bounds = offsets.tolist()  # CPU tensors: no device sync
    n = bounds[-1]
    slots = sorted_slots[:n].long()
    return n, slots // k, slots, bounds


class _Scratch:
    """Per-call scratch rows of the CPU path: one allocation carved into named ``(rows, cols)``
    views; each expert works in the first rows of each. Per-expert temporaries would be hundreds
    of 0.1–1 MB allocations a call, and whether glibc serves those from its heap or maps fresh,
    zeroed pages depends on the process's allocation history: measured ``MALLOC_MMAP_THRESHOLD_=
    65536`` (every one mapped) took the Qwen3 block's fwd+bwd from 341 to 463 ms."""

    def __init__(self, rows: int, cols: Dict[str, int], dtype: torch.dtype, device):
        flat = torch.empty(max(1, rows * sum(cols.values())), dtype=dtype, device=device)
        self.views, o = {}, 0
        for name, c in cols.items():
            self.views[name] = flat[o:o + rows * c].view(rows, c)
            o += rows * c

    def __call__(self, name: str, n: int) -> torch.Tensor:
        return self.views[name][:n]


def _gather_into(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``src[idx]`` in the compute dtype, into ``out`` when the dtypes agree."""
    if src.dtype == out.dtype:
        return torch.index_select(src, 0, idx, out=out)
    return src.index_select(0, idx).to(out.dtype)


def _widest(bounds) -> int:
    return max((bounds[e + 1] - bounds[e] for e in range(len(bounds) - 1)), default=0)


def _cpu_forward(x, weights, gate_up, down, b1, b2, sorted_slots, offsets, k: int, spec: ExpertSpec):
    """out (T, H) and what the backward needs, over the kept rows in expert order: the first GEMM's
    output ``h`` and the activation ``act`` (T·k rows allocated, the kept ``n`` written: shapes
    known without reading the routing). Row gathers, expert outputs and their scatter into ``out``
    go one expert at a time through :class:`_Scratch` rows."""
    cd = math_dtype(x.dtype)
    T, H = x.shape
    n, tok, slots, bounds = _rows(sorted_slots, offsets, k)
    I2 = gate_up.shape[1]
    h = torch.empty((T * k, I2), dtype=cd, device=x.device)
    act = torch.empty((T * k, I2 // 2), dtype=cd, device=x.device)
    out = torch.zeros((T, H), dtype=cd, device=x.device)
    w = weights.reshape(-1).to(cd).index_select(0, slots)[:, None]
    S = _Scratch(_widest(bounds), {"x": H, "y": H, "aw": I2 // 2}, cd, x.device)
    for e in range(len(bounds) - 1):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        torch.mm(_gather_into(x, tok[a:b], S("x", b - a)), gate_up[e].to(cd).t(), out=h[a:b])
        if b1 is not None:
            h[a:b] += b1[e].to(cd)
        _gated_into(*split_gate_up(h[a:b], spec.interleaved), spec, act[a:b])
        # w·(act·downᵀ + b2) = (w·act)·downᵀ + w·b2: the weight scales the narrower operand
        y = torch.mm(torch.mul(act[a:b], w[a:b], out=S("aw", b - a)), down[e].to(cd).t(), out=S("y", b - a))
        if b2 is not None:
            y.addcmul_(w[a:b], b2[e].to(cd)[None, :])
        out.index_add_(0, tok[a:b], y)
    return out.to(x.dtype), h, act


def _gated_into(gate, up, spec: ExpertSpec, out: torch.Tensor) -> None:
    """``out[:] = gated(gate, up)`` without a temporary for the common activations."""
    if spec.activation == "silu":
        torch.ops.aten.silu.out(gate, out=out)
        out.mul_(up)
    else:
        out.copy_(gated(gate, up, spec))


def _gated_backward_into(gate, up, da, spec: ExpertSpec, dh: torch.Tensor, tmp: torch.Tensor) -> None:
    """(d gate, d up) of :func:`gated` written into the rows ``dh`` (gate | up, or interleaved),
    through ATen's fused activation backward where there is one (``tmp``: scratch of ``da``'s
    shape)."""
    dgate, dup = split_gate_up(dh, spec.interleaved)
    if spec.activation == "silu":
        torch.ops.aten.silu_backward.grad_input(torch.mul(da, up, out=tmp), gate, grad_input=dgate)
        torch.mul(da, torch.ops.aten.silu.out(gate, out=tmp), out=dup)
    elif spec.activation in ("gelu", "gelu_tanh"):
        approx = "tanh" if spec.activation == "gelu_tanh" else "none"
        torch.ops.aten.gelu_backward.grad_input(torch.mul(da, up, out=tmp), gate, approximate=approx,
                                                grad_input=dgate)
        torch.mul(da, torch.ops.aten.gelu.out(gate, approximate=approx, out=tmp), out=dup)
    else:
        g, u = gated_backward(gate, up, da, spec)
        dgate.copy_(g)
        dup.copy_(u)


def _cpu_backward(dout, x, weights, gate_up, down, b1, b2, sorted_slots, offsets, h, act, k: int,
                  spec: ExpertSpec, need):
    """Gradients (dx, d gate_up, d down, d b1, d b2, d weights); ``need`` flags which to return.

    Per expert, with ``g = dout_rows · down_e`` (unweighted): ``d w = Σ_i g·act (+ dout·b2_e)``,
    ``d act = w·g``, ``d down_e = doutᵀ · (w·act)``; rows gathered and scattered one expert at a
    time through :class:`_Scratch` rows (see :func:`_cpu_forward`)."""
    cd = h.dtype
    T, H = dout.shape
    dev = dout.device
    n, tok, slots, bounds = _rows(sorted_slots, offsets, k)
    w = weights.reshape(-1).to(cd).index_select(0, slots)
    E = gate_up.shape[0]
    I2 = gate_up.shape[1]
    dw_rows = torch.empty(n, dtype=cd, device=dev) if need[5] else None
    dx = torch.zeros((T, H), dtype=cd, device=dev) if need[0] else None
    dgu = torch.empty(gate_up.shape, dtype=cd, device=dev) if need[1] else None
    dd = torch.empty(down.shape, dtype=cd, device=dev) if need[2] else None
    db1 = torch.empty((E, I2), dtype=cd, device=dev) if need[3] and b1 is not None else None
    db2 = torch.empty((E, H), dtype=cd, device=dev) if need[4] and b2 is not None else None
    S = _Scratch(_widest(bounds), {"dy": H, "x": H, "dx": H, "dh": I2, "g": I2 // 2, "t": I2 // 2}, cd, dev)
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        m = b - a
        if a == b:  # no rows: zero weight gradients (the rest has no rows to write)
            for t in (dgu, dd, db1, db2):
                if t is not None:
                    t[e].zero_()
            continue
        dye = _gather_into(dout, tok[a:b], S("dy", m))
        if dd is not None:
            torch.mm(dye.t(), torch.mul(act[a:b], w[a:b, None], out=S("t", m)), out=dd[e])
        if db2 is not None:
            torch.mv(dye.t(), w[a:b], out=db2[e])
        if dx is None and dgu is None and db1 is None and dw_rows is None:
            continue
        g = torch.mm(dye, down[e].to(cd), out=S("g", m))
        if dw_rows is not None:
            torch.sum(torch.mul(g, act[a:b], out=S("t", m)), 1, out=dw_rows[a:b])
            if b2 is not None:
                dw_rows[a:b] += dye @ b2[e].to(cd)
        if dx is None and dgu is None and db1 is None:
            continue
        gate, up = split_gate_up(h[a:b], spec.interleaved)
        dh = S("dh", m)
        _gated_backward_into(gate, up, g.mul_(w[a:b, None]), spec, dh, S("t", m))
        if dgu is not None:
            torch.mm(dh.t(), _gather_into(x, tok[a:b], S("x", m)), out=dgu[e])
        if db1 is not None:
            torch.sum(dh, 0, out=db1[e])
        if dx is not None:
            dx.index_add_(0, tok[a:b], torch.mm(dh, gate_up[e].to(cd), out=S("dx", m)))
    dweights = None
    if dw_rows is not None:
        dweights = torch.zeros(T * k, dtype=cd, device=dev).index_copy_(0, slots, dw_rows).view(T, k)
        dweights = dweights.to(weights.dtype)

    def cast(t, like):
        return None if t is None else t.to(like.dtype)

    return (cast(dx, dout), cast(dgu, gate_up), cast(dd, down), cast(db1, gate_up), cast(db2, down), dweights)


# ----------------------------------------------------------------------------------------------
# CPU path in C++ (csrc/experts.cpp) when the kernels are built: experts shared among the threads
# ----------------------------------------------------------------------------------------------

def _cpp_experts():
    """``torch.ops.mmkernels_cpu`` when the C++ experts are selected and built, else None."""
    cpp = _cpp.ops()
    return cpp if cpp is not None and hasattr(cpp, "experts_forward") else None


def _cpp_args(x, weights, gate_up, down, b1, b2):
    """The tensors as the C++ op takes them: bfloat16 as stored (its GEMMs run in bfloat16; no
    per-call cast of the expert weights) with the routing weights in float32; float16 cast to
    float32; float32 / float64 as they are."""
    cd = math_dtype(x.dtype)
    if x.dtype == torch.bfloat16:
        return [x, weights.to(cd), gate_up, down, b1, b2]
    return [None if t is None else t.to(cd) for t in (x, weights, gate_up, down, b1, b2)]


def _cpp_h_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the C++ forward's ``h``: bfloat16 for bfloat16 ``x`` (its GEMMs run in
    bfloat16, as the Triton path's, and the weights are read as stored), else the math dtype."""
    return x.dtype if x.dtype == torch.bfloat16 else math_dtype(x.dtype)


def _cpp_forward(x, weights, gate_up, down, b1, b2, routing, spec: ExpertSpec):
    """:func:`_cpu_forward` in one C++ call: (out, h, act) with ``act`` empty — the C++ backward
    recomputes the activation from ``h`` (bfloat16 as stored: :func:`_cpp_args`)."""
    out, h = _cpp_experts().experts_forward(
        *_cpp_args(x, weights, gate_up, down, b1, b2), routing.sorted_slots, routing.slot_rows, routing.offsets,
        routing.top_k, ACTIVATIONS.index(spec.activation), spec.interleaved, spec.alpha, spec.limit)
    return out.to(x.dtype), h, h.new_empty((0, gate_up.shape[1] // 2))


def _cpp_backward(dout, x, weights, gate_up, down, b1, b2, routing, h, act, spec: ExpertSpec, need):
    """:func:`_cpu_backward` in one C++ call (``act`` unused: recomputed from ``h``; bfloat16 as
    stored: :func:`_cpp_args`)."""
    xc, wc, guc, dc, b1c, b2c = _cpp_args(x, weights, gate_up, down, b1, b2)
    h = h.to(xc.dtype)
    grads = _cpp_experts().experts_backward(
        dout.to(xc.dtype), xc, wc, guc, dc, b1c, b2c, routing.sorted_slots, routing.slot_rows, routing.offsets, h,
        routing.top_k, ACTIVATIONS.index(spec.activation), spec.interleaved, spec.alpha, spec.limit,
        sum(1 << i for i, f in enumerate(need) if f))
    likes = (dout, gate_up, down, gate_up, down, weights)
    return tuple(None if g is None else g.to(like.dtype) for g, like in zip(grads, likes))


# ----------------------------------------------------------------------------------------------
# Dispatch: one calling convention for the three backends, and the torch.library ops
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The part of a :class:`~mmkernels.ops.routing.Routing` the expert kernels read: what the
    custom ops take (tensors and ints; a ``Routing`` also carries the weights and the ids)."""

    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor
    offsets: torch.Tensor
    tile_experts: torch.Tensor
    tile_row_starts: torch.Tensor
    top_k: int
    block_m: int

    @classmethod
    def of(cls, routing: Routing) -> "Dispatch":
        return cls(routing.sorted_slots, routing.slot_rows, routing.offsets, routing.tile_experts,
                   routing.tile_row_starts, routing.top_k, routing.block_m)

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def max_tiles(self) -> int:
        return self.tile_experts.shape[0]


@torch.compiler.assume_constant_result
def backend_of(x: torch.Tensor) -> str:
    """``"triton"``, ``"cpp"`` or ``"torch"``: which implementation runs for ``x`` (read once per
    call, at the forward; the backward runs where the forward ran). No tokens: the torch CPU path,
    whatever the device (nothing to launch; its torch ops give the empty result and zero
    gradients). A constant to torch.compile: decided when the graph is traced."""
    if x.shape[0] and _backend.resolve(x) is _backend.Impl.TRITON:
        return "triton"
    return "cpp" if x.is_cpu and _cpp_experts() is not None else "torch"


def _saved_like(x: torch.Tensor, I: int, k: int, backend: str, save: bool):
    """Empty tensors shaped as what ``backend``'s forward saves for the backward: ``h`` (T·k, 2I)
    and ``act`` (T·k, I) — rows in the routing's expert order — in the storage dtype on the Triton
    path, the math dtype on the CPU paths (C++ with bfloat16: bfloat16, :func:`_cpp_h_dtype`);
    ``act`` has no rows where the backward recomputes it
    (C++), neither has when nothing is saved (no gradient needed). The custom op's fake kernel
    and the real forward both allocate through here, so their shapes agree by construction."""
    rows = x.shape[0] * k if save else 0
    dtype = x.dtype if backend == "triton" else _cpp_h_dtype(x) if backend == "cpp" else math_dtype(x.dtype)
    return (x.new_empty((rows, 2 * I), dtype=dtype),
            x.new_empty((0 if backend == "cpp" else rows, I), dtype=dtype))


def forward_impl(backend: str, x, weights, gate_up, down, b1, b2, d: Dispatch, spec: ExpertSpec, save: bool):
    """``(out, h, act)`` on ``backend`` (see :func:`backend_of`, :func:`_saved_like`)."""
    if backend == "triton":
        out, h, _, act = triton_forward(x, weights, gate_up, down, b1, b2, d, spec, save_h=save)
        return (out, h, act) if save else (out, *_saved_like(x, down.shape[2], d.top_k, backend, False))
    if backend == "cpp":
        out, h, act = _cpp_forward(x, weights, gate_up, down, b1, b2, d, spec)
    else:
        out, h, act = _cpu_forward(x, weights, gate_up, down, b1, b2, d.sorted_slots, d.offsets, d.top_k, spec)
    return (out, h, act) if save else (out, *_saved_like(x, down.shape[2], d.top_k, backend, False))


def backward_impl(backend: str, dout, x, weights, gate_up, down, b1, b2, d: Dispatch, h, act, spec: ExpertSpec,
              need):
    """``(dx, d gate_up, d down, d b1, d b2, d weights)`` (None where ``need`` says no) on the
    ``backend`` that ran the forward."""
    if backend == "triton":
        return triton_backward(dout, x, weights, gate_up, down, b1, b2, d, h, act, spec, need)
    if backend == "cpp":
        return _cpp_backward(dout, x, weights, gate_up, down, b1, b2, d, h, act, spec, need)
    return _cpu_backward(dout, x, weights, gate_up, down, b1, b2, d.sorted_slots, d.offsets, h, act, d.top_k,
                         spec, need)


def _spec_args(spec: ExpertSpec):
    return ACTIVATIONS.index(spec.activation), spec.interleaved, spec.alpha, spec.limit


def _spec_of(act: int, interleaved: bool, alpha: float, limit: float) -> ExpertSpec:
    return ExpertSpec(ACTIVATIONS[act], interleaved, alpha, limit)


@torch.library.custom_op("mmkernels::experts_fwd", mutates_args=())
def experts_fwd_op(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], sorted_slots: torch.Tensor,
                   slot_rows: torch.Tensor, offsets: torch.Tensor, tile_experts: torch.Tensor,
                   tile_row_starts: torch.Tensor, top_k: int, block_m: int, act: int, interleaved: bool,
                   alpha: float, limit: float, save: bool, backend: str
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, act) of the experts on ``backend``; ``act`` is the activation's index in
    :data:`ACTIVATIONS`."""
    d = Dispatch(sorted_slots, slot_rows, offsets, tile_experts, tile_row_starts, top_k, block_m)
    return forward_impl(backend, x, weights, gate_up, down, b1, b2, d, _spec_of(act, interleaved, alpha, limit), save)


@experts_fwd_op.register_fake
def _(x, weights, gate_up, down, b1, b2, sorted_slots, slot_rows, offsets, tile_experts, tile_row_starts, top_k,
      block_m, act, interleaved, alpha, limit, save, backend):
    return (torch.empty_like(x), *_saved_like(x, down.shape[2], top_k, backend, save))


@torch.library.custom_op("mmkernels::experts_bwd", mutates_args=())
def experts_bwd_op(dout: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                   sorted_slots: torch.Tensor, slot_rows: torch.Tensor, offsets: torch.Tensor,
                   tile_experts: torch.Tensor, tile_row_starts: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
                   top_k: int, block_m: int, act: int, interleaved: bool, alpha: float, limit: float,
                   need: List[bool], backend: str) -> List[torch.Tensor]:
    """(dx, d gate_up, d down, d b1, d b2, d weights) on the forward's ``backend``; an empty tensor
    where ``need`` says no."""
    d = Dispatch(sorted_slots, slot_rows, offsets, tile_experts, tile_row_starts, top_k, block_m)
    grads = backward_impl(backend, dout, x, weights, gate_up, down, b1, b2, d, h, a,
                      _spec_of(act, interleaved, alpha, limit), tuple(need))
    return [g if g is not None else x.new_empty(0) for g in grads]


@experts_bwd_op.register_fake
def _(dout, x, weights, gate_up, down, b1, b2, sorted_slots, slot_rows, offsets, tile_experts, tile_row_starts,
      h, a, top_k, block_m, act, interleaved, alpha, limit, need, backend):
    likes = (dout, gate_up, down, b1, b2, weights)
    return [torch.empty_like(like) if n and like is not None else x.new_empty(0) for n, like in zip(need, likes)]


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class ExpertsFunction(torch.autograd.Function):
    """Autograd wrapper. Saved: the first GEMM's output ``h`` (rows × 2I) and the activation
    ``act(gate)·up`` (rows × I; not on the C++ path, which recomputes it from ``h``); the input
    rows are gathered again in the backward. Tracers (torch.compile, export) see the two custom
    ops; eager calls skip the torch.library dispatch."""

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, b1, b2, d: Dispatch, spec: ExpertSpec, save: bool):
        backend = backend_of(x)
        if _backend.direct_call_ok(x, weights, gate_up, down, d.sorted_slots):
            out, h, a = forward_impl(backend, x, weights, gate_up, down, b1, b2, d, spec, save)
        else:
            out, h, a = experts_fwd_op(x, weights, gate_up, down, b1, b2, d.sorted_slots, d.slot_rows, d.offsets,
                                       d.tile_experts, d.tile_row_starts, d.top_k, d.block_m, *_spec_args(spec), save,
                                       backend)
        ctx.save_for_backward(x, weights, gate_up, down, b1, b2, h, a)
        ctx.dispatch, ctx.spec, ctx.backend = d, spec, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weights, gate_up, down, b1, b2, h, a = ctx.saved_tensors
        nx, nw, ngu, nd, nb1, nb2 = ctx.needs_input_grad[:6]
        need = (nx, ngu, nd, nb1 and b1 is not None, nb2 and b2 is not None, nw)
        d = ctx.dispatch
        if _backend.direct_call_ok(dout, x, h, a):
            grads = backward_impl(ctx.backend, dout, x, weights, gate_up, down, b1, b2, d, h, a, ctx.spec, need)
        else:
            got = experts_bwd_op(dout, x, weights, gate_up, down, b1, b2, d.sorted_slots, d.slot_rows, d.offsets,
                                 d.tile_experts, d.tile_row_starts, h, a, d.top_k, d.block_m, *_spec_args(ctx.spec),
                                 list(need), ctx.backend)
            grads = [g if n else None for g, n in zip(got, need)]
        dx, dgu, dd, db1, db2, dw = grads
        return dx, dw, dgu, dd, db1, db2, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------

def experts(hidden_states: torch.Tensor, routing: Routing, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
            activation: str = "silu", gate_up_bias: Optional[torch.Tensor] = None,
            down_bias: Optional[torch.Tensor] = None, interleaved: bool = False,
            swiglu_alpha: Optional[float] = None, swiglu_limit: Optional[float] = None,
            routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The experts of an MoE layer on the tokens of a :class:`Routing`: ``(T, H) -> (T, H)``,
    ``out[t] = Σ_j w[t, j] · (down_e(act(gate_e(x_t)) · up_e(x_t)) + down_bias_e)`` with
    ``e = expert_ids[t, j]``; slots dropped by the routing's capacity contribute nothing.

    Args:
        hidden_states: ``(T, H)`` float16 / bfloat16 / float32 / float64.
        routing: from :func:`mmkernels.moe.route` on the same ``T`` tokens (``E`` experts, ``k``);
            its ``block_m`` is the grouped GEMMs' tile height on the GPU — pass
            ``block_m=moe.suggest_block_m(T, E, k)`` to ``route`` (128 rows at large T, 16 at
            decode; what ``nn.MoE`` and the transformers integration do).
        gate_up_proj: ``(E, 2I, H)``, same dtype: the gate rows ``0 .. I`` then the up rows
            (transformers' layout); ``interleaved=True``: gate and up rows alternate (gpt-oss; pass
            its ``(E, H, 2I)`` parameter as ``.transpose(1, 2)``, a view).
        down_proj: ``(E, H, I)`` (gpt-oss: its ``(E, I, H)`` parameter ``.transpose(1, 2)``).
        activation: ``"silu"`` (SwiGLU), ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` on the gate, times
            the up projection; ``"swiglu_oai"``: gpt-oss's clamped SwiGLU
            ``(clamp(up, ±limit) + 1) · g·σ(alpha·g)``, ``g = min(gate, limit)``.
        gate_up_bias: ``(E, 2I)`` or None; down_bias: ``(E, H)`` or None.
        swiglu_alpha, swiglu_limit: gpt-oss's constants (default 1.702 and 7.0).
        routing_weights: ``(T, k)`` weights to use instead of ``routing.weights`` (e.g. a router
            of one's own); gradients flow to whichever is used (``routing.weights`` carries them on
            to the router logits).

    Returns:
        ``(T, H)`` in ``hidden_states``' dtype. Math in float32 (float64 for float64).

    Backward: gradients for ``hidden_states``, both projections, both biases and the routing
    weights. Saved from the forward: the first GEMM's output ``h`` (rows × 2I, pre-activation) and
    the activation ``act(gate)·up`` (rows × I), in the storage dtype on the Triton path (float32 on
    the CPU path); recomputed: the gathers of the input and gradient rows, the expert outputs (the
    routing weights' gradient is ``Σ_i (dout·down_e)_i · act_i (+ dout·b2_e)``). Rows are the kept
    slots in expert order (T·k at most). The weight gradients are reduced over each expert's rows
    by one program per output tile (no atomics); the combines over k run in a fixed order
    (deterministic). Transient in the backward on CUDA: ``d h`` (rows × 2I), and x's rows and
    ``w·dout``'s rows copied into expert order (rows × H each) for the weight gradients.

    On CUDA: Triton kernels — forward: two grouped GEMMs (the first gathers its rows through the
    routing, no permuted copy of x) and a combine; backward: an activation-gradient GEMM, a dx
    GEMM and its combine, the row gathers, two weight-gradient GEMMs and the weights' reduction.
    fp32 runs its dots in IEEE fp32 (no TF32), 16-bit storage on tensor cores. On CPU: the C++
    kernels of ``csrc/experts.cpp`` when built (:mod:`mmkernels._cpp`) — the experts shared among
    the threads, each GEMM on one core, the activation recomputed from ``h`` in the backward
    instead of saved; their outputs and scratch (about ``rows × H`` floats) come from a pool of
    recycled tensors (``csrc/pool.h``; :func:`mmkernels._cpp.cache_info` / ``empty_cache``) —
    else a Python loop of matrix products over the experts in one scratch allocation.

    Example:
        >>> import torch
        >>> from mmkernels import moe
        >>> r = moe.route(torch.randn(6, 4), 2)
        >>> out = moe.experts(torch.randn(6, 8), r, torch.randn(4, 2 * 16, 8), torch.randn(4, 8, 16))
        >>> out.shape
        torch.Size([6, 8])
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a mmkernels.moe.Routing (from moe.route), got {type(routing).__name__}")
    weights = routing.weights if routing_weights is None else routing_weights
    spec = check_experts_args(hidden_states, routing.num_tokens, routing.num_experts, routing.top_k, gate_up_proj,
                              down_proj, gate_up_bias, down_bias, weights, activation, interleaved, swiglu_alpha,
                              swiglu_limit, routing.block_m)
    if routing.sorted_slots.device != hidden_states.device:
        raise ValueError(f"routing.sorted_slots must be on hidden_states' device {hidden_states.device}, "
                         f"got {routing.sorted_slots.device}")
    tensors = (hidden_states, weights, gate_up_proj, down_proj, gate_up_bias, down_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return ExpertsFunction.apply(*tensors, Dispatch.of(routing), spec, save)


def dense_moe(hidden_states: torch.Tensor, gate_weight: torch.Tensor, gate_up_proj: torch.Tensor,
              down_proj: torch.Tensor, *, activation: str = "silu", gate_up_bias: Optional[torch.Tensor] = None,
              down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Dense mixture of experts (docs/modules.md): ``y = Σ_e softmax(x·W_gᵀ)_e · expert_e(x)`` over every
    expert, ``expert_e(x) = down_e(act(gate_e x) · up_e x)``.

    The MoE kernels with ``k = E``: :func:`mmkernels.moe.route` (``renormalize=False``: the softmax
    over all experts, differentiable) and :func:`experts` (each expert's grouped GEMM over all
    ``T`` tokens) — no per-expert Python loop.

    Args:
        hidden_states: ``(T, H)``; gate_weight: ``(E, H)`` the gate's linear layer (no bias);
        gate_up_proj ``(E, 2I, H)``, down_proj ``(E, H, I)``, activation and biases as in :func:`experts`.

    Returns:
        ``(T, H)`` in ``hidden_states``' dtype.
    """
    from mmkernels.ops import routing as _routing

    _check_tensor("gate_weight", gate_weight)
    if gate_weight.dim() != 2 or gate_weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(f"gate_weight must be (E, H) with H = hidden_states.shape[-1] = {hidden_states.shape[-1]}, "
                         f"got {tuple(gate_weight.shape)}")
    E = gate_weight.shape[0]
    logits = torch.nn.functional.linear(hidden_states, gate_weight)
    T = hidden_states.shape[0]
    routing = _routing.route(logits, E, renormalize=False, block_m=_routing.suggest_block_m(T, E, E))
    return experts(hidden_states, routing, gate_up_proj, down_proj, activation=activation,
                   gate_up_bias=gate_up_bias, down_bias=down_bias)
