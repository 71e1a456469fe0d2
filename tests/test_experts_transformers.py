"""The experts implementation "mmkernels" in Hugging Face transformers
(``mmkernels.integrations.transformers``), and the ``mmkernels.nn.MoE`` layer.

transformers: tiny random models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE,
gpt-oss with biases, transposed weights, interleaved gate/up and its clamped SwiGLU) are built with
``experts_implementation="eager"``, copied, the copy switched to "mmkernels"; logits and the
gradient of every parameter (transformers' routers included, reached through ``top_k_weights``)
must agree. Also: expert-parallel sentinel ids, activations, unsupported modules (raise or fall
back), and that transformers' ``grouped_mm`` agrees.

nn.MoE: against a naive float64 per-token loop (``mmkernels.reference``), gradients to every
parameter, the shared expert, shapes ``(..., H)``, and ``state_dict`` compatibility with
transformers' ``Qwen2MoeSparseMoeBlock``.

All on the CPU path (moe.experts has no Triton path yet).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import mmkernels
from mmkernels import moe
from mmkernels.reference import route_ref
from tests.conftest import CPU_IMPLS

VOCAB, HIDDEN, INTER, EXPERTS, TOP_K, LAYERS = 64, 32, 48, 4, 2, 2


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    """max|a - r| / max|r| (0 when both are 0)."""
    a, r = a.detach().double(), r.detach().double()
    scale = r.abs().max().item()
    err = (a - r).abs().max().item()
    return err / scale if scale else err


def _close(a, r, tol, what=""):
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(r.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    rel = _rel(a, r)
    assert rel <= tol, f"{what}: max rel error {rel:.3g} > {tol:g}"


TOL = {torch.float64: 1e-11, torch.float32: 1e-5}


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.integrations.moe")
    from mmkernels.integrations import transformers as integration

    integration.register()
    return transformers


def _common():
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, num_experts_per_tok=TOP_K, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _mixtral(t, **kw):
    return t.MixtralConfig(**_common(), intermediate_size=INTER, num_local_experts=EXPERTS, head_dim=8, **kw), \
        t.MixtralForCausalLM


def _qwen2(t, **kw):
    return t.Qwen2MoeConfig(**_common(), intermediate_size=INTER, moe_intermediate_size=INTER, num_experts=EXPERTS,
                            shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[],
                            norm_topk_prob=False, **kw), t.Qwen2MoeForCausalLM


def _qwen3(t, **kw):
    return t.Qwen3MoeConfig(**_common(), intermediate_size=INTER, moe_intermediate_size=INTER, num_experts=EXPERTS,
                            head_dim=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **kw), \
        t.Qwen3MoeForCausalLM


def _olmoe(t, **kw):
    return t.OlmoeConfig(**_common(), intermediate_size=INTER, num_experts=EXPERTS, norm_topk_prob=False, **kw), \
        t.OlmoeForCausalLM


def _gpt_oss(t, **kw):
    return t.GptOssConfig(**_common(), intermediate_size=INTER, num_local_experts=EXPERTS, head_dim=8,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=4, **kw), \
        t.GptOssForCausalLM


MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2, "qwen3_moe": _qwen3, "olmoe": _olmoe, "gpt_oss": _gpt_oss}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights of a useful size: matrices N(0, 0.2²) (routers N(0, 1): spread choices), 1-D
    biases / sinks N(0, 0.1²); norms keep their ones. gpt-oss's SwiGLU limit is lowered to 0.5 so
    that its clamps are active on these small activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 1.0 if (".gate." in name or ".router." in name) else 0.2
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    for m in model.modules():
        if hasattr(m, "limit") and hasattr(m, "gate_up_proj"):
            m.limit = 0.5


def _build(t, name: str, dtype: torch.dtype, seed: int = 0, **cfg_kw):
    cfg, cls = MODELS[name](t, **cfg_kw)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, experts_implementation="eager", attn_implementation="eager")
    model = model.to(dtype)
    _randomise(model, seed)
    return model


def _count_experts_calls(monkeypatch):
    calls = []
    real = moe.experts

    def counting(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "experts", counting)
    return calls


def _loss_and_grads(model, ids, proj):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits * proj).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,dtype", [(n, torch.float64) for n in MODELS] + [("mixtral", torch.float32),
                                                                                ("gpt_oss", torch.float32)],
                         ids=[f"{n}-f64" for n in MODELS] + ["mixtral-f32", "gpt_oss-f32"])
@pytest.mark.parametrize("cpu_impl", CPU_IMPLS)
def test_model_matches_eager(hf, monkeypatch, name, dtype, cpu_impl):
    eager = _build(hf, name, dtype)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mmkernels")
    assert eager.config._experts_implementation == "eager"
    assert ours.config._experts_implementation == "mmkernels"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    proj = torch.randn(2, 9, VOCAB, generator=gen, dtype=torch.float64).to(dtype)

    ref_logits, ref_grads = _loss_and_grads(eager, ids, proj)
    calls = _count_experts_calls(monkeypatch)
    logits, grads = _loss_and_grads(ours, ids, proj)
    assert len(calls) == LAYERS, "the mmkernels experts did not run in every layer"
    assert set(calls) == {"swiglu_oai" if name == "gpt_oss" else "silu"}

    tol = TOL[dtype]
    _close(logits, ref_logits, tol, "logits")
    for n, g in ref_grads.items():
        assert (g is None) == (grads[n] is None), n
        if g is not None:
            _close(grads[n], g, tol, f"grad of {n}")
    # the routers were trained through top_k_weights
    routers = [n for n in grads if n.endswith("mlp.gate.weight") or n.endswith("mlp.router.weight")]
    assert routers and all(grads[n].abs().max() > 0 for n in routers)


def test_grouped_mm_agrees(hf):
    """transformers' default (grouped_mm) and mmkernels, float32, Mixtral: logits and gradients."""
    a = _build(hf, "mixtral", torch.float32)
    b = copy.deepcopy(a)
    a.set_experts_implementation("grouped_mm")
    b.set_experts_implementation("mmkernels")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 5), generator=gen)
    proj = torch.randn(3, 5, VOCAB, generator=gen)
    la, ga = _loss_and_grads(a, ids, proj)
    lb, gb = _loss_and_grads(b, ids, proj)
    _close(lb, la, 1e-5, "logits")
    for n in ga:
        _close(gb[n], ga[n], 1e-5, f"grad of {n}")


@pytest.mark.parametrize("act,expected", [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                          ("gelu_new", "gelu_tanh"), ("relu", "relu"), ("swish", "silu")])
def test_activations(hf, monkeypatch, act, expected):
    eager = _build(hf, "qwen3_moe", torch.float64, hidden_act=act)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mmkernels")
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    proj = torch.randn(1, 11, VOCAB, dtype=torch.float64)
    ref_logits, ref_grads = _loss_and_grads(eager, ids, proj)
    calls = _count_experts_calls(monkeypatch)
    logits, grads = _loss_and_grads(ours, ids, proj)
    assert set(calls) == {expected}
    _close(logits, ref_logits, 1e-10, "logits")
    for n in ref_grads:
        _close(grads[n], ref_grads[n], 1e-10, f"grad of {n}")


def _experts_module(t, name="mixtral", dtype=torch.float64, **cfg_kw):
    model = _build(t, name, dtype, **cfg_kw)
    return model.model.layers[0].mlp.experts


def test_expert_parallel_sentinels(hf):
    """Ids >= E (another rank's experts, weight 0) are skipped: the same output and gradients as
    transformers' grouped_mm, which skips them too, and zero gradients at the sentinel slots."""
    from mmkernels.integrations.transformers import experts_forward
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts = _experts_module(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    T = 13
    ids = torch.stack([torch.randperm(EXPERTS + 2, generator=gen)[:TOP_K] for _ in range(T)])
    ids[ids > EXPERTS] = EXPERTS  # sentinels are num_experts
    ids[0] = EXPERTS  # a token with no local expert at all
    w = torch.rand(T, TOP_K, generator=gen)
    w = w.masked_fill(ids == EXPERTS, 0.0)
    x = torch.randn(T, HIDDEN, generator=gen)
    dy = torch.randn(T, HIDDEN, generator=gen)
    results = []
    for fn in (grouped_mm_experts_forward, experts_forward):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        out = fn(experts, xx, ids, ww)
        out.backward(dy)
        results.append((out.detach(), xx.grad, ww.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for what, a, r in zip(("out", "dx", "dw", "d gate_up", "d down"), results[1], results[0]):
        _close(a, r, 1e-5, what)
    assert (results[1][0][0] == 0).all()
    assert (results[1][2][ids == EXPERTS] == 0).all()


@pytest.mark.parametrize("block_m", [1, 2, 64])
def test_routing_from_ids_metadata(block_m):
    """The E+1-column routing with column E cut off is the dispatch of the non-sentinel slots,
    with the sentinel slots as dropped rows past offsets[E] and their tiles gone from the table."""
    from mmkernels.integrations.transformers import routing_from_ids
    from mmkernels.reference import dispatch_ref

    E = 5
    ids = torch.tensor([[0, 5], [2, 7], [5, 1], [2, 0], [6, 5], [4, 3], [1, 2]])
    r = routing_from_ids(ids, E, block_m=block_m)
    keep = ids < E
    ref = dispatch_ref(ids.clamp(max=E), E + 1, None, block_m)
    assert r.num_experts == E and r.block_m == block_m and r.capacity is None
    assert r.counts.tolist() == ref["counts"][:E].tolist()
    assert r.offsets.tolist() == ref["offsets"][:E + 1].tolist()
    assert r.offsets[-1].item() == int(keep.sum())
    assert torch.equal(r.sorted_slots, ref["sorted_slots"]) and torch.equal(r.slot_rows, ref["slot_rows"])
    rows = r.slot_rows.reshape(ids.shape)
    assert ((rows < r.offsets[-1]) == keep).all()  # sentinel slots: the rows past offsets[E]
    assert torch.equal(r.dropped, ~keep)
    tiles = [(e, s) for e, s in zip(ref["tile_experts"].tolist(), ref["tile_row_starts"].tolist()) if 0 <= e < E]
    n = len(tiles)
    assert int(r.num_tiles) == n == sum(-(-c // block_m) for c in r.counts.tolist())
    assert list(zip(r.tile_experts[:n].tolist(), r.tile_row_starts[:n].tolist())) == tiles
    assert (r.tile_experts[n:] == -1).all() and (r.tile_row_starts[n:] == -1).all()


def test_unsupported_activation_raises(hf):
    from mmkernels.integrations.transformers import experts_forward

    experts = _experts_module(hf, hidden_act="relu2")
    x = torch.randn(4, HIDDEN, dtype=torch.float64)
    ids = torch.tensor([[0, 1]] * 4)
    with pytest.raises(NotImplementedError, match="ReLUSquaredActivation"):
        experts_forward(experts, x, ids, torch.full((4, 2), 0.5, dtype=torch.float64))


def test_no_gate_raises_or_falls_back(hf, monkeypatch):
    """Experts without a gate (has_gate=False): NotImplementedError; with register(..., fallback=True),
    transformers' grouped_mm and the same result as eager."""
    from mmkernels.integrations import transformers as integration

    experts = _experts_module(hf, dtype=torch.float32)  # grouped_mm has no float64 on CPU
    x = torch.randn(4, HIDDEN)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    w = torch.rand(4, 2)
    monkeypatch.setattr(experts, "has_gate", False)
    with pytest.raises(NotImplementedError, match="without a gate"):
        integration.experts_forward(experts, x, ids, w)

    monkeypatch.setattr(experts, "has_gate", True)
    monkeypatch.setattr(experts, "act_fn", hf.activations.ACT2FN["relu2"])
    called = []
    import transformers.integrations.moe as tmoe

    real = tmoe.grouped_mm_experts_forward
    monkeypatch.setattr(tmoe, "grouped_mm_experts_forward", lambda *a: called.append(1) or real(*a))
    out = integration.experts_forward_with_fallback(experts, x, ids, w)
    assert called
    eager = type(experts).forward.__wrapped__(experts, x, ids, w)  # the class's own (eager) forward
    _close(out, eager, 1e-5, "fallback output")


def test_register_names(hf):
    from mmkernels.integrations import transformers as integration
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert integration.register() == "mmkernels"
    assert ALL_EXPERTS_FUNCTIONS["mmkernels"] is integration.experts_forward
    assert integration.register("mmkernels_fb", fallback=True) == "mmkernels_fb"
    assert ALL_EXPERTS_FUNCTIONS["mmkernels_fb"] is integration.experts_forward_with_fallback
    model = _build(hf, "olmoe", torch.float32)
    model.set_experts_implementation("mmkernels_fb")
    assert model.config._experts_implementation == "mmkernels_fb"


def test_transposed_weights_are_views(hf, monkeypatch):
    """gpt-oss: the (E, H, 2I) / (E, I, H) parameters reach moe.experts as transposes, not copies."""
    from mmkernels.integrations.transformers import experts_forward

    experts = _experts_module(hf, "gpt_oss")
    seen = {}
    real = moe.experts

    def spy(x, routing, gate_up, down, **kw):
        seen["gate_up"], seen["down"], seen["kw"] = gate_up, down, kw
        return real(x, routing, gate_up, down, **kw)

    monkeypatch.setattr(moe, "experts", spy)
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    experts_forward(experts, x, torch.tensor([[0, 1], [2, 3], [3, 0]]), torch.rand(3, 2, dtype=torch.float64))
    assert seen["gate_up"].data_ptr() == experts.gate_up_proj.data_ptr()
    assert seen["gate_up"].shape == (EXPERTS, 2 * INTER, HIDDEN)
    assert seen["down"].data_ptr() == experts.down_proj.data_ptr()
    assert seen["down"].shape == (EXPERTS, HIDDEN, INTER)
    kw = seen["kw"]
    assert kw["interleaved"] and kw["activation"] == "swiglu_oai"
    assert kw["swiglu_alpha"] == experts.alpha and kw["swiglu_limit"] == experts.limit


# ----------------------------------------------------------------------------------------------
# nn.MoE
# ----------------------------------------------------------------------------------------------

def _act_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) · up from the formulas (swiglu_oai: gpt-oss's constants 1.702 and 7)."""
    if activation == "silu":
        return gate / (1 + torch.exp(-gate)) * up
    if activation == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0))) * up
    if activation == "gelu_tanh":
        return 0.5 * gate * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3))) * up
    if activation == "relu":
        return torch.where(gate > 0, gate, torch.zeros_like(gate)) * up
    assert activation == "swiglu_oai"
    g = torch.where(gate > 7.0, torch.full_like(gate, 7.0), gate)
    u = torch.where(up > 7.0, torch.full_like(up, 7.0), torch.where(up < -7.0, torch.full_like(up, -7.0), up))
    return (u + 1) * g / (1 + torch.exp(-1.702 * g))


def _moe_ref(layer: mmkernels.nn.MoE, x: torch.Tensor):
    """The layer in float64, naively: the router, the reference routing (``route_ref``), then one
    token and one choice at a time, matrix-vector products; the shared expert from its formula.
    Returns (output (T, H), logits (T, E), the parameters' float64 copies it is differentiable
    w.r.t., the reference routing)."""
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    P = params.get
    x = x.detach().double().reshape(-1, layer.hidden_size)
    I = layer.intermediate_size
    logits = x @ P("gate.weight").t()
    r = route_ref(logits, layer.top_k, **layer.route_kwargs)
    ids, dropped = r["expert_ids"].tolist(), r["dropped"].tolist()
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(layer.hidden_size, dtype=torch.float64)
        for j, e in enumerate(ids[t]):
            if dropped[t][j]:
                continue
            h = P("experts.gate_up_proj")[e] @ x[t]
            if P("experts.gate_up_proj_bias") is not None:
                h = h + P("experts.gate_up_proj_bias")[e]
            gate, up = h[:I], h[I:]  # nn.MoE: concatenated gate / up rows
            y = P("experts.down_proj")[e] @ _act_ref(gate, up, layer.activation)
            if P("experts.down_proj_bias") is not None:
                y = y + P("experts.down_proj_bias")[e]
            acc = acc + r["weights"][t, j] * y
        if layer.shared_expert is not None:
            g, u = P("shared_expert.gate_proj.weight") @ x[t], P("shared_expert.up_proj.weight") @ x[t]
            shared = P("shared_expert.down_proj.weight") @ _act_ref(g, u, layer.activation)
            acc = acc + torch.sigmoid(P("shared_expert_gate.weight")[0] @ x[t]) * shared
        rows.append(acc)
    return torch.stack(rows), logits, params, r


MOE_CASES = {
    "mixtral": dict(),
    "qwen2_shared": dict(renormalize=False, shared_expert_size=24),
    "sigmoid_grouped": dict(scoring="sigmoid", n_groups=2, topk_groups=1, routed_scaling=2.5),
    "gpt_oss": dict(softmax_after_topk=True, activation="swiglu_oai", bias=True),
    "capacity_gelu": dict(capacity_factor=0.75, activation="gelu_tanh"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("cpu_impl", CPU_IMPLS)
def test_nn_moe_matches_reference(case, dtype, cpu_impl):
    torch.manual_seed(0)
    layer = mmkernels.nn.MoE(16, 12, 6, 2, **MOE_CASES[case]).to(dtype)
    with torch.no_grad():  # weights big enough that every term matters (init std 0.02 is tiny)
        for n, p in layer.named_parameters():
            p.normal_(0, 1.0 if n == "gate.weight" else 0.3)
    x = torch.randn(2, 3, 5, 16, dtype=dtype)
    res = layer(x)
    assert isinstance(res, mmkernels.nn.MoEOutput)
    assert res.output.shape == x.shape and res.output.dtype == dtype
    assert res.router_logits.shape == (30, 6)
    ref, ref_logits, params, r = _moe_ref(layer, x)
    assert torch.equal(res.counts, r["counts"])
    tol = TOL[dtype]
    _close(res.output.reshape(-1, 16), ref, tol, "output")
    _close(res.router_logits, ref_logits, tol, "router_logits")

    dy = torch.randn(x.shape, dtype=dtype)
    res.output.backward(dy)
    (ref * dy.double().reshape(-1, 16)).sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None, n
        _close(p.grad, params[n].grad, tol, f"grad of {n}")
        assert p.grad.abs().max() > 0, f"no gradient reached {n}"


def test_nn_moe_shapes_and_init():
    layer = mmkernels.nn.MoE(8, 10, 4, 3, shared_expert_size=6)
    assert layer.gate.weight.shape == (4, 8) and layer.gate.bias is None
    assert layer.experts.gate_up_proj.shape == (4, 20, 8)
    assert layer.experts.down_proj.shape == (4, 8, 10)
    assert layer.shared_expert_gate.weight.shape == (1, 8)
    assert 0.01 < layer.experts.gate_up_proj.std().item() < 0.03
    for shape in [(8,), (5, 8), (2, 3, 8), (0, 8), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        res = layer(x)
        assert res.output.shape == shape
        T = x.numel() // 8
        assert res.router_logits.shape == (T, 4)
        assert res.counts.shape == (4,) and res.counts.sum().item() == 3 * T
        res.output.sum().backward()
        assert x.grad.shape == shape
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="top_k"):
        mmkernels.nn.MoE(8, 10, 4, 5)
    with pytest.raises(ValueError, match="activation"):
        mmkernels.nn.MoE(8, 10, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="n_groups"):
        mmkernels.nn.MoE(8, 10, 6, 2, n_groups=4, topk_groups=1)


def test_nn_moe_loads_qwen2_moe_block(hf):
    """A Qwen2MoeSparseMoeBlock's state_dict loads into nn.MoE, and both compute the same."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg, _ = _qwen2(hf)
    cfg._experts_implementation = "eager"
    block = Qwen2MoeSparseMoeBlock(cfg).double()
    _randomise(block, 5)
    layer = mmkernels.nn.MoE(HIDDEN, INTER, EXPERTS, TOP_K, renormalize=False, shared_expert_size=40).double()
    layer.load_state_dict(block.state_dict())
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    # transformers' router takes its softmax in float32 (moe.route: float64 for float64 logits)
    _close(layer(x).output, block(x), 1e-6, "output")
