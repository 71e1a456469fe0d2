"""``torch.compile(fullgraph=True)`` of the ops and the MoE layers: every op is a ``torch.library``
custom op with a fake kernel, so the tracer sees one op each — zero graph breaks — and the compiled
forward and backward equal eager, on the CPU path (C++ and vectorised torch) and on the Triton path
under the interpreter. (The compile tier, the ahead-of-time Triton compile, is tests/test_compile_tier.py.)"""
import pytest
import torch
import torch._dynamo

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
    torch._dynamo.reset()
    with mmkernels.use_backend("cpu"):
        want = f(*eager)
        want.backward()
        assert torch._dynamo.explain(f)(*_leaves(args)).graph_break_count == 0
        got = torch.compile(f, fullgraph=True)(*comp)
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
    and every parameter's gradient), with zero graph breaks (``torch._dynamo.explain``)."""
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

    torch._dynamo.reset()  # the backend choice is a constant of the traced graph
    with mmkernels.use_backend(backend):
        want, want_grads = run(f)
        explained = torch._dynamo.explain(f)(x.clone().requires_grad_())
        assert explained.graph_break_count == 0, explained.break_reasons
        got, got_grads = run(torch.compile(f, fullgraph=True))
    mt.assert_close(got, want.double(), backend=backend)
    for g, w in zip(got_grads, want_grads):
        mt.assert_close(g, w.double(), backend=backend, magnitude=w.abs() + 1e-3)
