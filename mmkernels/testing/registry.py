"""The case registry shared by tests and benches.

A :class:`Case` names an op of a family, a logical shape, the op's arguments and how its inputs
are laid out in memory; :func:`make_inputs` builds fresh random tensors for it. Tags select who
uses a case: ``interp`` (small enough for Triton's interpreter), ``edge`` (boundary shapes and
layouts), ``bench`` (the main job on CPU), ``gpu`` (the GPU suite).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch

#: Layouts an input can take. ``transposed``: stored with its dims reversed; ``sliced``: every other
#: element of a twice-larger last dim; ``expanded``: size-1 storage broadcast (zero stride) along the
#: first dim that is not ``keep_dim`` (for a softmax gradient: not the reduced dim, where a constant
#: gradient would make dx vanish).
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    op: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    tags: FrozenSet[str]
    params: Mapping[str, object] = dataclasses.field(default_factory=dict, compare=False)
    layouts: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        shape = "x".join(map(str, self.shape)) or "scalar"
        extra = "-".join(f"{k}{v}" for k, v in self.params.items())
        lay = "-".join(f"{k}_{v}" for k, v in self.layouts.items() if v != "contiguous")
        return "-".join(p for p in (self.op, shape, extra, dt, lay) if p)


_REGISTRY: List[Case] = []
_BUILDERS: Dict[str, Callable[[Case, torch.device, torch.Generator], Dict[str, torch.Tensor]]] = {}


def register(case: Case) -> Case:
    _REGISTRY.append(case)
    return case


def register_builder(family: str):
    """Decorator: ``fn(case, device, generator) -> {name: tensor}`` builds a family's inputs."""

    def deco(fn):
        _BUILDERS[family] = fn
        return fn

    return deco


def cases(family: Optional[str] = None, tag: Optional[str] = None, op: Optional[str] = None) -> List[Case]:
    """Registered cases, filtered by family, tag and op."""
    return [c for c in _REGISTRY
            if (family is None or c.family == family)
            and (tag is None or tag in c.tags)
            and (op is None or c.op == op)]


def make_inputs(case: Case, device="cpu", seed: int = 0, generator_device="cpu") -> Dict[str, torch.Tensor]:
    """Fresh random inputs for ``case`` on ``device``.

    The default CPU generator (float64 draws) gives the same values on every device; pass
    ``generator_device="cuda"`` to draw large inputs on the GPU instead (float32 draws, other values).
    """
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    return _BUILDERS[case.family](case, torch.device(device), gen)


def laid_out(values: torch.Tensor, layout: str, keep_dim: Optional[int] = None) -> torch.Tensor:
    """A tensor equal to ``values`` whose memory layout is ``layout`` (see :data:`LAYOUTS`)."""
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":
        dims = tuple(range(values.dim() - 1, -1, -1))
        return values.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        if values.dim() == 0:
            return values.clone()
        big = torch.empty(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "expanded":
        dims = [d for d in range(values.dim()) if d != (keep_dim % values.dim() if keep_dim is not None else None)]
        if not dims:
            return values.clone()
        return values.narrow(dims[0], 0, 1).clone().expand(values.shape)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _randn(shape, dtype, device, gen, scale=1.0):
    draw = torch.float64 if gen.device.type == "cpu" else torch.float32
    t = torch.randn(shape, generator=gen, dtype=draw, device=gen.device).mul_(scale)
    return t.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# softmax family: ops softmax / log_softmax / softmin; params: dim; inputs x and dy
# ----------------------------------------------------------------------------------------------

SOFTMAX_OPS = ("softmax", "log_softmax", "softmin")


@register_builder("softmax")
def _softmax_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    scale = float(case.params.get("scale", 3.0))
    x = laid_out(_randn(case.shape, case.dtype, device, gen, scale), case.layouts.get("x", "contiguous"))
    dy = laid_out(_randn(case.shape, case.dtype, device, gen), case.layouts.get("dy", "contiguous"),
                  keep_dim=case.params["dim"] if case.shape else None)
    return {"x": x, "dy": dy}


def _softmax(op, shape, dim, dtype, tags, **layouts):
    return register(Case("softmax", op, tuple(shape), dtype, frozenset(tags), {"dim": dim}, layouts))


#: Row lengths every test covers; the long one goes through the online path (see
#: mmkernels.ops.softmax.MAX_FUSED_N; kept in sync by a test).
SOFTMAX_ROW_LENGTHS = (1, 2, 3, 31, 33, 127, 1023, 1024, 1025, 4097, 16385)

for _n in SOFTMAX_ROW_LENGTHS:
    for _dt in (torch.float32, torch.float16, torch.bfloat16):
        for _op in SOFTMAX_OPS:
            _rows = 3 if _n <= 4097 else 2
            _softmax(_op, (_rows, _n), -1, _dt, {"interp", "edge"})

for _shape in ((4, 5, 6), (3, 4, 5, 6)):
    for _dim in (0, 1, -1):
        for _dt in (torch.float32, torch.float16, torch.bfloat16):
            for _op in SOFTMAX_OPS:
                _softmax(_op, _shape, _dim, _dt, {"interp", "edge"})

# layouts: transposed / sliced inputs, expanded (zero-stride) incoming gradients
for _shape, _dim in (((7, 33), -1), ((7, 33), 0), ((3, 5, 17), 1), ((2, 3, 4, 9), 2)):
    for _op in SOFTMAX_OPS:
        for _lx, _ldy in (("transposed", "contiguous"), ("sliced", "expanded"),
                          ("contiguous", "expanded"), ("transposed", "transposed")):
            _softmax(_op, _shape, _dim, torch.float32, {"interp", "edge"}, x=_lx, dy=_ldy)

# reductions over a strided dim whose rows do not fit one tile (columns layout, online path)
for _op in SOFTMAX_OPS:
    _softmax(_op, (2, 200, 20), 1, torch.float32, {"interp", "edge"})
    _softmax(_op, (2, 1100, 20), 1, torch.float32, {"interp", "edge"})
    _softmax(_op, (2, 1100, 20), 1, torch.float16, {"interp", "edge"})

# float64 rows past the float64 fused limit (mmkernels.ops.softmax: half of MAX_FUSED_N)
for _op in SOFTMAX_OPS:
    _softmax(_op, (2, 9000), -1, torch.float64, {"interp", "edge"})
    _softmax(_op, (3, 40, 5), 1, torch.float64, {"interp", "edge"})

# size-0 and 0-dim
for _shape, _dim in (((0, 5), -1), ((4, 0), -1), ((0,), 0), ((), 0), ((), -1), ((1,), 0), ((1, 1), 0)):
    for _op in SOFTMAX_OPS:
        _softmax(_op, _shape, _dim, torch.float32, {"interp", "edge"})

# the main job on CPU (sizes a CPU handles in well under a second per call)
for _n in (128, 1024, 4096, 32768):
    for _dt in (torch.float32, torch.bfloat16):
        _softmax("softmax", (max(1, (1 << 22) // _n), _n), -1, _dt, {"bench"})
_softmax("log_softmax", (1024, 4096), -1, torch.float32, {"bench"})
_softmax("softmax", (64, 4096, 16), 1, torch.float32, {"bench"})

# the GPU suite: M = 8192 rows, N from 128 to 262144, fp32 and bf16; plus one very long row set
for _n in (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144):
    for _dt in (torch.float32, torch.bfloat16):
        _softmax("softmax", (8192, _n), -1, _dt, {"gpu"})
for _dt in (torch.float32, torch.bfloat16):
    _softmax("softmax", (64, 1 << 20), -1, _dt, {"gpu"})
    _softmax("log_softmax", (8192, 4096), -1, _dt, {"gpu"})
    _softmax("softmin", (8192, 4096), -1, _dt, {"gpu"})
    _softmax("softmax", (32, 4096, 64), 1, _dt, {"gpu"})


# ----------------------------------------------------------------------------------------------
# bilinear family (sigma-pi): op "bilinear"; shape = batch shape; params b, c, d, bias;
# inputs z (*, b), x (*, c), w (d, b, c), bias (d,) or absent, dy (*, d)
# ----------------------------------------------------------------------------------------------


@register_builder("bilinear")
def _bilinear_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    b, c, d = (int(case.params[k]) for k in ("b", "c", "d"))
    batch = tuple(case.shape)
    out = {
        "z": laid_out(_randn(batch + (b,), case.dtype, device, gen), case.layouts.get("z", "contiguous")),
        "x": laid_out(_randn(batch + (c,), case.dtype, device, gen), case.layouts.get("x", "contiguous")),
        "w": laid_out(_randn((d, b, c), case.dtype, device, gen, (b * c) ** -0.5), case.layouts.get("w", "contiguous")),
        "dy": _randn(batch + (d,), case.dtype, device, gen),
    }
    if case.params.get("bias", True):
        out["bias"] = _randn((d,), case.dtype, device, gen)
    return out


def _bilinear(batch, b, c, d, dtype, tags, bias=True, **layouts):
    return register(Case("bilinear", "bilinear", tuple(batch), dtype, frozenset(tags),
                         {"b": b, "c": c, "d": d, "bias": bias}, layouts))


for _batch in ((), (0,), (1,), (7,), (2, 3)):
    for _bcd in ((1, 1, 1), (3, 5, 7), (17, 13, 11), (16, 32, 8)):
        for _bias in (True, False):
            _bilinear(_batch, *_bcd, torch.float32, {"interp", "edge"}, bias=_bias)
for _dt in (torch.float16, torch.bfloat16):
    _bilinear((7,), 17, 13, 11, _dt, {"interp", "edge"})
    _bilinear((33,), 16, 32, 8, _dt, {"interp", "edge"})
_bilinear((5,), 64, 65, 3, torch.float32, {"interp", "edge"})          # b·c >= 4096: long fp32 sums
_bilinear((6,), 9, 10, 5, torch.float32, {"interp", "edge"}, z="sliced", x="transposed", w="transposed")
_bilinear((2, 3), 9, 10, 5, torch.float32, {"interp", "edge"}, bias=False, z="transposed", x="sliced")

# the main job on CPU (F.bilinear's CPU backward is slow: sizes that keep the job short)
_bilinear((2048,), 64, 64, 32, torch.float32, {"bench"})
_bilinear((256,), 128, 128, 64, torch.float32, {"bench"})

# the GPU suite: the acceptance sizes (bf16, b = c = d = 256, N = 8192 and N = 64) and fp32
_bilinear((8192,), 256, 256, 256, torch.bfloat16, {"gpu"})
_bilinear((64,), 256, 256, 256, torch.bfloat16, {"gpu"})
_bilinear((8192,), 256, 256, 64, torch.float32, {"gpu"})


# ----------------------------------------------------------------------------------------------
# routing family (MoE routers): ops = router styles (ROUTING_STYLES); shape = (T, E); params k
# (+ the style's route() options); inputs logits (T, E), bias (E,) for styles with a selection
# bias, dw (T, k) an incoming gradient of the weights
# ----------------------------------------------------------------------------------------------

#: ``moe.route`` options of each router style, given its case params.
ROUTING_STYLES = {
    "mixtral": lambda p: {},
    "qwen3": lambda p: {"renormalize": False},
    "deepseek": lambda p: {"scoring": "sigmoid", "n_groups": p["n_groups"], "topk_groups": p["topk_groups"],
                           "routed_scaling": p.get("routed_scaling", 2.5)},
    "gptoss": lambda p: {"softmax_after_topk": True},
}


def routing_kwargs(case: Case, inputs: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The keyword arguments of ``moe.route`` for ``case`` (besides logits and top_k)."""
    kw = dict(ROUTING_STYLES[case.op](case.params))
    if "bias" in inputs:
        kw["selection_bias"] = inputs["bias"]
    if case.params.get("capacity_factor") is not None:
        kw["capacity_factor"] = case.params["capacity_factor"]
    return kw


#: Relative gap under which two selection keys (or group scores) computed in float32 may order
#: differently than in float64.
NEAR_TIE = 1e-5


def _near_ties(logits: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Rows whose DeepSeek-V3 selection (sigmoid + bias, group top-2 sums) has a near tie among the
    ranks that decide it: fp32 rounding could then choose or order differently than float64."""
    key = torch.sigmoid(logits.double().cpu()) + bias.double().cpu()
    T, E = key.shape
    gs = key.view(T, n_groups, E // n_groups).topk(2, dim=-1).values.sum(-1)

    def close(v, n):  # adjacent gaps among the n + 1 largest
        top = v.topk(min(n + 1, v.shape[1]), dim=-1).values
        return ((top[:, :-1] - top[:, 1:]) <= NEAR_TIE * top[:, :-1].abs()).any(-1)

    return close(key, k) | close(gs, topk_groups) if n_groups > 1 else close(key, k)


@register_builder("routing")
def _routing_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Logits ``randn · scale``; DeepSeek-V3 cases also a bias ``randn · 0.1``, and their rows with a
    near tie in the selection (:func:`_near_ties`) are drawn again, so that checks against a float64
    reference can be exact (the logits-keyed routers select on the stored logits: no rounding)."""
    T, E = case.shape
    k = int(case.params["k"])
    scale = float(case.params.get("scale", 2.0))
    out = {"logits": _randn((T, E), case.dtype, device, gen, scale),
           "dw": _randn((T, k), torch.float32, device, gen)}
    if case.op == "deepseek":
        out["bias"] = bias = _randn((E,), torch.float32, device, gen, 0.1)
        logits = out["logits"]
        for _ in range(20):
            bad = _near_ties(logits, bias, k, int(case.params["n_groups"]), int(case.params["topk_groups"]))
            rows = bad.nonzero().flatten()
            if rows.numel() == 0:
                break
            logits[rows.to(logits.device)] = _randn((rows.numel(), E), case.dtype, device, gen, scale)
    return out


def _routing(style, T, E, k, dtype, tags, **params):
    return register(Case("routing", style, (T, E), dtype, frozenset(tags), {"k": k, **params}))


# the main job on CPU (qwen3 2048 x 64: the router of issue 6's CPU MoE block)
_routing("mixtral", 4096, 64, 8, torch.float32, {"bench"})
_routing("qwen3", 2048, 64, 8, torch.float32, {"bench"})
_routing("deepseek", 2048, 256, 8, torch.float32, {"bench"}, n_groups=8, topk_groups=4)

# the GPU suite: the acceptance size (T = 16384, E = 128, k = 8), the models' own shapes, decode
for _dt in (torch.float32, torch.bfloat16):
    _routing("mixtral", 16384, 128, 8, _dt, {"gpu"})
    _routing("qwen3", 16384, 128, 8, _dt, {"gpu"})
_routing("mixtral", 16384, 8, 2, torch.bfloat16, {"gpu"})
_routing("deepseek", 16384, 256, 8, torch.float32, {"gpu"}, n_groups=8, topk_groups=4)
_routing("gptoss", 16384, 128, 4, torch.bfloat16, {"gpu"})
_routing("mixtral", 64, 128, 8, torch.bfloat16, {"gpu"})
_routing("mixtral", 16384, 128, 8, torch.float32, {"gpu"}, capacity_factor=1.25)


# ----------------------------------------------------------------------------------------------
# experts family (MoE expert dispatch): op = model shape (EXPERT_SHAPES); shape = (T,); params
# H, I, E, k; inputs x (T, H), logits (T, E), gate_up (E, 2I, H), down (E, H, I), dout (T, H)
# ----------------------------------------------------------------------------------------------

#: (H, I, E, k) of the models the issue names.
EXPERT_SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "olmoe": (2048, 1024, 64, 8),
                 "qwen3_cpu": (512, 256, 64, 8)}


@register_builder("experts")
def _experts_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    (T,) = case.shape
    H, I, E = (int(case.params[k]) for k in ("H", "I", "E"))
    return {"x": _randn((T, H), case.dtype, device, gen),
            "logits": _randn((T, E), torch.float32, device, gen),
            "gate_up": _randn((E, 2 * I, H), case.dtype, device, gen, H ** -0.5),
            "down": _randn((E, H, I), case.dtype, device, gen, I ** -0.5),
            "dout": _randn((T, H), case.dtype, device, gen)}


def _experts(shape_name, T, dtype, tags):
    H, I, E, k = EXPERT_SHAPES[shape_name]
    return register(Case("experts", shape_name, (T,), dtype, frozenset(tags), {"H": H, "I": I, "E": E, "k": k}))


# the main job on CPU: the CPU comparison (a Qwen3-MoE block, fp32, forward+backward)
_experts("qwen3_cpu", 2048, torch.float32, {"bench"})
# the GPU suite: the three model shapes at T = 16384, 64 (decode) and 1024, bf16
for _T in (16384, 64, 1024):
    for _name in ("qwen3", "mixtral", "olmoe"):
        _experts(_name, _T, torch.bfloat16, {"gpu"})


# ----------------------------------------------------------------------------------------------
# modules family (issue 7: the seeds' other modules): ops cross_entropy (shape (N, C); inputs
# logits, target with every 16th row ignored), attention (shape (R, J, D); inputs z, x, ds),
# gated_fusion (shape (R, D); inputs a, b, weight (D, 2D), bias (D,), dout), gated_blend (the
# fused blend alone; inputs pre, a, b, dout), hard_switch ((R, J, D)), dense_moe ((T, H, I, E)),
# product_unit ((N, I, J, K)), sigma_pi_unit ((N, n, Q, m, K): Q random conjuncts of up to m
# factors), pi_sigma ((N, n, K, S))
# ----------------------------------------------------------------------------------------------

@register_builder("modules")
def _modules_inputs(case: Case, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    if case.op == "cross_entropy":
        N, C = case.shape
        target = torch.randint(0, C, (N,), generator=gen, device=gen.device)
        target[::16] = -100
        return {"logits": _randn((N, C), case.dtype, device, gen, 2.0), "target": target.to(device)}
    if case.op == "attention":
        R, J, D = case.shape
        return {"z": _randn((R, J), case.dtype, device, gen, 2.0), "x": _randn((R, J, D), case.dtype, device, gen),
                "ds": _randn((R, D), case.dtype, device, gen)}
    if case.op == "gated_fusion":
        R, D = case.shape
        return {"a": _randn((R, D), case.dtype, device, gen), "b": _randn((R, D), case.dtype, device, gen),
                "weight": _randn((D, 2 * D), case.dtype, device, gen, (2 * D) ** -0.5),
                "bias": _randn((D,), case.dtype, device, gen), "dout": _randn((R, D), case.dtype, device, gen)}
    if case.op == "hard_switch":
        R, J, D = case.shape
        return {"z": _randn((R, J), case.dtype, device, gen), "x": _randn((R, J, D), case.dtype, device, gen),
                "ds": _randn((R, D), case.dtype, device, gen)}
    if case.op == "dense_moe":
        T, H, I, E = case.shape
        return {"x": _randn((T, H), case.dtype, device, gen), "gate_weight": _randn((E, H), case.dtype, device, gen, H ** -0.5),
                "gate_up": _randn((E, 2 * I, H), case.dtype, device, gen, H ** -0.5),
                "down": _randn((E, H, I), case.dtype, device, gen, I ** -0.5), "dout": _randn((T, H), case.dtype, device, gen)}
    if case.op == "product_unit":
        N, I, J, K = case.shape
        mag = torch.rand((N, I), generator=gen, dtype=torch.float64, device=gen.device) * 1.5 + 0.5
        sign = torch.where(torch.rand((N, I), generator=gen, device=gen.device) < 0.3, -1.0, 1.0).to(mag.dtype)
        return {"x": (mag * sign).to(device=device, dtype=case.dtype),
                "weight": _randn((J, I), case.dtype, device, gen, 0.3 * I ** -0.5),
                "out_weight": _randn((K, J), case.dtype, device, gen, J ** -0.5), "dout": _randn((N, K), case.dtype, device, gen)}
    if case.op == "sigma_pi_unit":
        N, n, Q, m, K = case.shape
        conj = torch.randint(0, n, (Q, m), generator=gen, device=gen.device)
        conj[::3, -1] = -1  # every third conjunct one factor shorter
        return {"z": _randn((N, n), case.dtype, device, gen), "conjuncts": conj.to(device),
                "weight": _randn((K, Q), case.dtype, device, gen, Q ** -0.5), "bias": _randn((K,), case.dtype, device, gen),
                "dout": _randn((N, K), case.dtype, device, gen)}
    if case.op == "pi_sigma":
        N, n, K, S = case.shape
        return {"z": _randn((N, n), case.dtype, device, gen), "weight": _randn((K, S, n), case.dtype, device, gen, n ** -0.5),
                "bias": _randn((K, S), case.dtype, device, gen), "dout": _randn((N, K), case.dtype, device, gen)}
    if case.op == "gated_blend":
        R, D = case.shape
        return {n: _randn((R, D), case.dtype, device, gen, 2.0 if n == "pre" else 1.0) for n in ("pre", "a", "b", "dout")}
    raise KeyError(f"modules family has no op {case.op!r}")


def _module(op, shape, dtype, tags, **params):
    return register(Case("modules", op, tuple(shape), dtype, frozenset(tags), params))


# the main job on CPU (sizes of well under a second a call)
_module("cross_entropy", (1024, 32000), torch.float32, {"bench"}, label_smoothing=0.1)
_module("attention", (4096, 8, 256), torch.float32, {"bench"})
_module("gated_fusion", (8192, 512), torch.float32, {"bench"})
_module("gated_blend", (8192, 512), torch.float32, {"bench"})
_module("hard_switch", (4096, 8, 256), torch.float32, {"bench"})
_module("dense_moe", (512, 256, 128, 8), torch.float32, {"bench"})       # T, H, I, E
_module("product_unit", (4096, 64, 64, 32), torch.float32, {"bench"})    # N, I, J, K
_module("sigma_pi_unit", (4096, 64, 256, 3, 16), torch.float32, {"bench"})  # N, n, Q, m, K
_module("pi_sigma", (8192, 256, 16, 4), torch.float32, {"bench"})        # N, n, K, S
# the GPU suite: issue 7's acceptance sizes
_module("cross_entropy", (8192, 32000), torch.bfloat16, {"gpu"}, label_smoothing=0.1)
_module("cross_entropy", (8192, 32000), torch.float32, {"gpu"}, label_smoothing=0.1)
for _dt in (torch.float32, torch.bfloat16):
    _module("attention", (65536, 8, 512), _dt, {"gpu"})
    _module("gated_fusion", (65536, 1024), _dt, {"gpu"})
    _module("gated_blend", (65536, 1024), _dt, {"gpu"})
    _module("hard_switch", (65536, 8, 512), _dt, {"gpu"})
_module("dense_moe", (8192, 1024, 512, 8), torch.bfloat16, {"gpu"})
_module("product_unit", (65536, 256, 256, 256), torch.float32, {"gpu"})
_module("sigma_pi_unit", (65536, 256, 1024, 3, 64), torch.float32, {"gpu"})
_module("pi_sigma", (65536, 1024, 64, 4), torch.bfloat16, {"gpu"})
