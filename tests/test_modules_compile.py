"""The issue 7 modules under torch.compile(fullgraph=True): their custom ops' fake kernels let the
tracer see one op each (no graph break), and the compiled forward and backward equal eager."""
import pytest
import torch

import mmkernels
from mmkernels import testing as mt


@pytest.mark.slow
def test_new_modules_compile_fullgraph_and_match_eager():
    def f(logits, t, z, x, a, b, w, px, pw):
        return (mmkernels.cross_entropy(logits, t, label_smoothing=0.1) + mmkernels.attention_module(z, x).sum()
                + mmkernels.gated_fusion(a, b, w).sum() + mmkernels.product_unit(px, pw).sum())

    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = [r(8, 10), torch.randint(0, 10, (8,), generator=gen), r(8, 3), r(8, 3, 4), r(8, 4), r(8, 4), r(4, 8),
            torch.rand(8, 5, generator=gen) + 0.5, r(3, 5)]
    floats = [i for i, t in enumerate(args) if t.is_floating_point()]
    eager = [t.clone().requires_grad_() if i in floats else t for i, t in enumerate(args)]
    comp = [t.clone().requires_grad_() if i in floats else t for i, t in enumerate(args)]
    with mmkernels.use_backend("cpu"):
        want = f(*eager)
        want.backward()
        got = torch.compile(f, fullgraph=True)(*comp)
        got.backward()
    mt.assert_close(got, want.detach().double(), backend="cpu")
    for i in floats:
        mt.assert_close(comp[i].grad, eager[i].grad.double(), backend="cpu", magnitude=eager[i].grad.abs() + 1e-3)
