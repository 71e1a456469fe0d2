"""moe.route against the routers of Hugging Face transformers, built from tiny configs with random
weights: Mixtral, Qwen3-MoE (norm_topk_prob True / False), DeepSeek-V3 (sigmoid, selection bias,
group-limited, routed_scaling) and gpt-oss (softmax after top-k); and moe.load_balancing_loss
against transformers' load_balancing_loss_func (value and gradient).

The routers return (router_logits, scores, indices); moe.route runs on their own router_logits
(and, for DeepSeek-V3, their e_score_correction_bias). DeepSeek-V3 selects with sorted=False, so
choices are compared per token as sets: both sides sorted by expert index.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels import moe  # noqa: E402
from tests.conftest import backends  # noqa: E402

from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

HIDDEN = 16
TOKENS = 33


def _randomise(router: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random router weights (Qwen3 and DeepSeek-V3 initialise them to zeros), and a random
    DeepSeek-V3 e_score_correction_bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
        if getattr(router, "bias", None) is not None:
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen) * 0.5)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(router.e_score_correction_bias.shape, generator=gen) * 0.1)
    return router


def mixtral(E=8, k=2):
    cfg = MixtralConfig(hidden_size=HIDDEN, num_local_experts=E, num_experts_per_tok=k)
    return MixtralTopKRouter(cfg), {}


def qwen3(norm, E=8, k=2):
    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
    return Qwen3MoeTopKRouter(cfg), {"renormalize": norm}


def deepseek(norm, E=16, k=4, n_group=4, topk_group=2, scaling=2.5):
    cfg = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                           topk_group=topk_group, routed_scaling_factor=scaling, norm_topk_prob=norm)
    router = DeepseekV3TopkRouter(cfg)
    return router, {"scoring": "sigmoid", "renormalize": norm, "n_groups": n_group, "topk_groups": topk_group,
                    "routed_scaling": scaling, "selection_bias": router.e_score_correction_bias}


def gpt_oss(E=8, k=4):
    cfg = GptOssConfig(hidden_size=HIDDEN, num_local_experts=E, num_experts_per_tok=k)
    return GptOssTopKRouter(cfg), {"softmax_after_topk": True}


ROUTERS = {
    "mixtral-E8-k2": lambda: mixtral(),
    "mixtral-E61-k6": lambda: mixtral(61, 6),
    "qwen3-norm": lambda: qwen3(True),
    "qwen3-nonorm": lambda: qwen3(False),
    "qwen3-nonorm-E128-k8": lambda: qwen3(False, 128, 8),
    "deepseek-v3": lambda: deepseek(True),
    "deepseek-v3-nonorm": lambda: deepseek(False),
    "deepseek-v3-E64-k8": lambda: deepseek(True, 64, 8, 8, 4),
    "gpt-oss-E8-k4": lambda: gpt_oss(),
    "gpt-oss-E32-k4": lambda: gpt_oss(32, 4),
}


def _by_expert(ids: torch.Tensor, weights: torch.Tensor):
    """Each token's choices as a set: ids and weights sorted by expert index."""
    ids = ids.cpu().long()
    order = ids.argsort(dim=1)
    return ids.gather(1, order), weights.detach().cpu().double().gather(1, order)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_matches_transformers_router(name, backend, device):
    router, kwargs = ROUTERS[name]()
    _randomise(router, seed=len(name)).to(device)
    if "selection_bias" in kwargs:                       # the buffer as moved by .to(device)
        kwargs["selection_bias"] = router.e_score_correction_bias
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        router_logits, scores, indices = router(hidden)
        with mmkernels.use_backend(backend):
            r = moe.route(router_logits, router.top_k, **kwargs)
    ids_t, w_t = _by_expert(indices, scores)
    ids_o, w_o = _by_expert(r.expert_ids, r.weights)
    assert torch.equal(ids_o, ids_t), f"expert choices differ:\n ours {ids_o.tolist()}\ntheirs {ids_t.tolist()}"
    scale = kwargs.get("routed_scaling", 1.0)
    torch.testing.assert_close(w_o, w_t, rtol=0, atol=1e-6 * scale)
    if name.startswith("mixtral") or name == "qwen3-norm":       # renormalised: weights sum to 1
        torch.testing.assert_close(r.weights.sum(1).double().cpu(), torch.ones(TOKENS, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_route_matches_qwen3_router_bfloat16(backend, device):
    """A bf16 Qwen3 router: its logits are bf16, its top-k values are cast back to bf16; moe.route
    keeps float32 weights, so the bound is bf16's rounding. Tokens with two equal bf16 logits are
    left out (torch.topk and route may break that tie differently)."""
    router, kwargs = qwen3(True)
    _randomise(router, seed=3).to(device, torch.bfloat16)
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    with torch.no_grad():
        router_logits, scores, indices = router(hidden)
        with mmkernels.use_backend(backend):
            r = moe.route(router_logits, router.top_k, **kwargs)
    assert router_logits.dtype == torch.bfloat16 and r.weights.dtype == torch.float32
    distinct = torch.tensor([len(set(row)) == len(row) for row in router_logits.float().cpu().tolist()])
    assert int(distinct.sum()) > TOKENS // 2
    ids_t, w_t = _by_expert(indices[distinct], scores[distinct])
    ids_o, w_o = _by_expert(r.expert_ids[distinct], r.weights[distinct])
    assert torch.equal(ids_o, ids_t)
    torch.testing.assert_close(w_o, w_t, rtol=2**-8, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# load_balancing_loss vs transformers' load_balancing_loss_func
# ------------------------------------------------------------------------------------------------

def _gate_logits(layers: int, B: int, S: int, E: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B * S, E, generator=gen) * 2).requires_grad_() for _ in range(layers))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_load_balancing_loss_matches_transformers(masked, top_k, layers, backend, device):
    """Value and gradient w.r.t. every layer's logits, within 1e-6."""
    B, S, E = 3, 7, 8
    ours_in = tuple(g.to(device).detach().requires_grad_() for g in _gate_logits(layers, B, S, E, seed=layers + top_k))
    theirs_in = tuple(g.detach().clone().requires_grad_() for g in ours_in)
    mask = None
    if masked:
        mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(5)) > 0.4).long().to(device)
        mask[:, 0] = 1                                                  # no sequence fully padded
    with mmkernels.use_backend(backend):
        ours = moe.load_balancing_loss(ours_in, E, top_k=top_k, attention_mask=mask)
        ours.backward()
    theirs = load_balancing_loss_func(theirs_in, E, top_k=top_k, attention_mask=mask)
    theirs.backward()
    torch.testing.assert_close(ours.detach().double().cpu().reshape(()), theirs.detach().double().cpu(),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_single_tensor_is_one_layer():
    """A deliberate difference: transformers returns 0 for a bare tensor (not a tuple); moe treats it
    as a one-layer tuple. None is 0 in both."""
    (gate,) = _gate_logits(1, 2, 5, 8, seed=9)
    ours = moe.load_balancing_loss(gate, 8, top_k=2)
    assert load_balancing_loss_func(gate, 8, top_k=2) == 0                # theirs ignores a bare tensor
    torch.testing.assert_close(ours.detach().double().reshape(()),
                               load_balancing_loss_func((gate,), 8, top_k=2).detach().double(), rtol=1e-6, atol=1e-6)
    assert float(moe.load_balancing_loss(None, 8)) == 0.0 and load_balancing_loss_func(None, 8) == 0
