"""Dense mixture of experts (the MoE kernels with k = E): output and gradients (x, gate, experts)
against the float64 reference on the CPU path (C++ and vectorised torch) and the Triton path."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import moe
from mmkernels import testing as mt
from tests.conftest import backends
from mmkernels.reference import dense_moe_ref


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("T,H,I,E,activation", [(9, 8, 6, 1, "silu"), (17, 12, 10, 5, "gelu"), (33, 16, 8, 7, "silu")])
def test_forward_backward(T, H, I, E, activation, backend, device, poison_outputs):
    gen = torch.Generator().manual_seed(T + E)
    f = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device)  # noqa: E731
    x, gw = f(T, H), f(E, H, scale=H ** -0.5)
    gu, dn, dy = f(E, 2 * I, H, scale=H ** -0.5), f(E, H, I, scale=I ** -0.5), f(T, H)
    leaves = [t.clone().requires_grad_() for t in (x, gw, gu, dn)]
    with mmkernels.use_backend(backend):
        out = moe.dense_moe(*leaves, activation=activation)
        out.backward(dy)
    refs = [t.detach().double().cpu().requires_grad_() for t in (x, gw, gu, dn)]
    ref = dense_moe_ref(*refs, activation=activation)
    ref.backward(dy.double().cpu())
    mt.assert_close(out, ref, backend=backend, what="dense MoE out")
    for name, a, b in zip(("x", "gate_weight", "gate_up", "down"), leaves, refs):
        mt.assert_close(a.grad, b.grad, backend=backend, what=f"dense MoE d {name}")


def test_nn_dense_moe_is_an_moe_over_every_expert():
    torch.manual_seed(0)
    m = mmkernels.nn.DenseMoE(8, 6, 4)
    assert isinstance(m, mmkernels.nn.MoE) and m.top_k == 4
    x = torch.randn(2, 3, 8)
    got = m(x)
    want = dense_moe_ref(x.reshape(-1, 8), m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj)
    mt.assert_close(got.output.reshape(-1, 8), want, backend="cpu")
    assert int(got.counts.sum()) == 6 * 4  # every token reached every expert


def test_bad_gate_weight():
    with pytest.raises(ValueError, match="gate_weight must be"):
        moe.dense_moe(torch.randn(3, 8), torch.randn(4, 7), torch.randn(4, 12, 8), torch.randn(4, 8, 6))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_gradcheck(backend, device):
    gen = torch.Generator().manual_seed(1)
    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    args = (f(3, 2), f(2, 2), f(2, 4, 2), f(2, 2, 2))  # tiny: gradcheck calls the op ~2 x 26 times
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: moe.dense_moe(*a), args)
