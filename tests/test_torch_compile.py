"""``torch.compile(fullgraph=True)`` of the ops, the MoE layers and transformers MoE models running
``experts_implementation="mmkernels"``: every op is a ``torch.library`` custom op with a fake
kernel and the routing and experts path reads no data on the host, so the tracer sees one op each —
zero graph breaks (``fullgraph=True`` raises on any, and dynamo's counters stay empty) — and the
compiled forward and backward equal eager, on the CPU path (C++ and vectorised torch) and on the
Triton path under the interpreter. Most tests compile with ``backend="aot_eager"`` (dynamo,
AOTAutograd and the fake kernels, without inductor's code generation, which tests nothing of
ours and costs a minute a model); one runs inductor end to end. (The compile tier, the
ahead-of-time Triton compile, is tests/test_compile_tier.py.)"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import mmkernels
from mmkernels import nn as mnn
from mmkernels import testing as mt
from tests.conftest import backends


def _leaves(args):
    return [t.clone().requires_grad_() if t.is_floating_point() else t for t in args]


def _grads(ts):
    return [t.grad for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.slow
def test_module_ops_compile_fullgraph_and_match_eager():
    def f(logits, t, z, x, a, b, w, px, pw):
        return (mmkernels.cross_entropy(logits, t, label_smoothing=0.1) + mmkernels.attention_module(z, x).sum()
                + mmkernels.gated_fusion(a, b, w).sum() + mmkernels.product_unit(px, pw).sum())

    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = [r(8, 10), torch.randint(0, 10, (8,), generator=gen), r(8, 3), r(8, 3, 4), r(8, 4), r(8, 4), r(4, 8),
            torch.rand(8, 5, generator=gen) + 0.5, r(3, 5)]
    eager, comp = _leaves(args), _leaves(args)
    with mmkernels.use_backend("cpu"):
        want = f(*eager)
        want.backward()
        got = _compiled(f, "inductor")(*comp)
        got.backward()
    mt.assert_close(got, want.detach().double(), backend="cpu")
    for g, w in zip(_grads(comp), _grads(eager)):
        mt.assert_close(g, w.double(), backend="cpu", magnitude=w.abs() + 1e-3)


#: The MoE layers people compile: the Mixtral / Qwen3 default, a Qwen2-MoE shared expert, DeepSeek-V3
#: routing (sigmoid scores, a selection bias, group-limited top-k) and the dense mixture.
LAYERS = {
    "moe": lambda: mnn.MoE(16, 24, 8, 2),
    "shared-expert": lambda: mnn.MoE(16, 24, 8, 2, shared_expert_size=12),
    "deepseek": lambda: mnn.MoE(16, 24, 8, 2, scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5),
    "dense": lambda: mnn.DenseMoE(16, 24, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_moe_layers_compile_fullgraph_and_match_eager(backend, device, layer):
    """Forward and backward of ``torch.compile(layer, fullgraph=True)`` equal eager (output, d input
    and every parameter's gradient), with zero graph breaks."""
    torch.manual_seed(0)
    mod = LAYERS[layer]().to(device)
    x = torch.randn(10, 16, device=device)

    def f(x):
        return mod(x).output

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.backward(torch.ones_like(out))
        grads = [xi.grad] + [p.grad.clone() for p in mod.parameters()]
        mod.zero_grad(set_to_none=True)
        return out.detach(), grads

    with mmkernels.use_backend(backend):
        want, want_grads = run(f)
        got, got_grads = run(_compiled(f, "inductor" if (layer, backend) == ("moe", "cpu") else "aot_eager"))
    mt.assert_close(got, want.double(), backend=backend)
    for g, w in zip(got_grads, want_grads):
        mt.assert_close(g, w.double(), backend=backend, magnitude=w.abs() + 1e-3)


def _compiled(fn, backend: str):
    """``torch.compile(fn, fullgraph=True)`` from a clean dynamo state (the implementation choice is a
    constant of the traced graph), checked to trace without a graph break."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)

    def call(*args):
        out = compiled(*args)
        assert not counters["graph_break"], dict(counters["graph_break"])
        return out
    return call


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("backend,device", backends())
def test_transformers_moe_models_compile_fullgraph(backend, device, model):
    """A tiny transformers Qwen3-MoE / Mixtral (float64) with ``experts_implementation="mmkernels"``:
    the compiled forward and backward (logits and every parameter's gradient) equal eager."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.integrations.moe")
    from mmkernels.integrations import transformers as integration
    from tests.test_experts_transformers import VOCAB, _build

    integration.register()
    eager = _build(transformers, model, torch.float64)
    eager.set_experts_implementation("mmkernels")
    compiled = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    proj = torch.randn(2, 9, VOCAB, generator=gen, dtype=torch.float64)

    def run(m, fn):
        m.zero_grad(set_to_none=True)
        logits = fn(ids)
        (logits * proj).sum().backward()
        return logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    with mmkernels.use_backend(backend):
        want, want_grads = run(eager, lambda i: eager(i).logits)
        got, got_grads = run(compiled, _compiled(lambda i: compiled(i).logits, "aot_eager"))
    mt.assert_close(got, want, backend=backend)
    assert set(got_grads) == set(want_grads)
    for n, g in want_grads.items():
        mt.assert_close(got_grads[n], g, backend=backend, magnitude=g.abs().max().expand_as(g), what=n)
