"""Gated fusion: output and every gradient (a, b, weight, bias) against the float64 reference on
the CPU path and the Triton path (interpreter on CPU); D = 1, odd D, leading dims, strided
pathways, gradcheck, bad input, the nn module and the compile tier."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import testing as mt
from tests.conftest import assert_compiled_clean, backends, compile_family
from mmkernels.reference import gated_fusion_magnitudes, gated_fusion_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(shape, dtype, device, seed, bias=True):
    D = shape[-1]
    gen = torch.Generator().manual_seed(seed)
    f = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)  # noqa: E731
    return (f(*shape), f(*shape), f(D, 2 * D, scale=(2 * D) ** -0.5), f(D) if bias else None, f(*shape))


def _check(a, b, w, c, dout, backend):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, b, w, c)]
    with mmkernels.use_backend(backend):
        out = mmkernels.gated_fusion(*leaves)
        out.backward(dout)
    refs = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (a, b, w, c)]
    ref = gated_fusion_ref(*refs)
    ref.backward(dout.double().cpu())
    mags = gated_fusion_magnitudes(a, b, w, dout)
    assert out.shape == a.shape and out.dtype == a.dtype
    mt.assert_close(out, ref, backend=backend, magnitude=mags["out"], what="gated fusion out")
    for name, got, want in zip(("a", "b", "weight", "bias"), leaves, refs):
        if got is not None:
            mt.assert_close(got.grad, want.grad, backend=backend, magnitude=mags[name], what=f"d {name}")
    return out


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 1), (7, 13), (2, 3, 64), (50, 100)], ids=str)  # the last: 3 programs
def test_forward_backward(shape, dtype, backend, device, poison_outputs):
    a, b, w, c, dout = _inputs(shape, dtype, device, seed=sum(shape))
    _check(a, b, w, c, dout, backend)
    _check(a, b, w, None, dout, backend)


@pytest.mark.parametrize("backend,device", [b for b in backends(cpu_torch=True) if b.values[0] == "cpu"])
def test_double_backward(backend, device):
    """create_graph: the blend's backward runs torch ops there (the C++ kernel has no derivative of
    its own), so a gradient of the gradient is right (gradgradcheck, float64)."""
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradgradcheck(mmkernels.gated_fusion, (a, b, w))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_strided_pathways_and_gradcheck(backend, device):
    a, b, w, c, dout = _inputs((6, 5), torch.float64, device, seed=3)
    bt = torch.randn(5, 6, dtype=torch.float64, device=device).T  # strides (1, 6)
    _check(a, bt, w, c, dout, backend)
    args = [t.detach().requires_grad_() for t in (a, bt, w, c)]
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(mmkernels.gated_fusion, tuple(args))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_saturated_gates(backend, device, poison_outputs):
    """Pre-activations of ±100: g is exactly 0 or 1 (no NaN from exp overflow) and picks b or a."""
    a, b, w, c, dout = _inputs((3, 4), torch.float32, device, seed=5)
    c = torch.tensor([100.0, -100.0, 100.0, -100.0], device=device)
    out = _check(a, b, w * 0, c, dout, backend)
    torch.testing.assert_close(out[:, ::2], a[:, ::2])
    torch.testing.assert_close(out[:, 1::2], b[:, 1::2])


def test_bad_input_names_the_argument():
    a, b, w = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        mmkernels.gated_fusion(a, b[:, :3], w)
    with pytest.raises(ValueError, match=r"weight must be \(D, 2D\)"):
        mmkernels.gated_fusion(a, b, w[:, :4])
    with pytest.raises(ValueError, match="bias must be"):
        mmkernels.gated_fusion(a, b, w, torch.randn(3))
    with pytest.raises(TypeError, match="same dtype"):
        mmkernels.gated_fusion(a, b.double(), w)
    with pytest.raises(TypeError, match="floating-point"):
        mmkernels.gated_fusion(a.long(), b, w)


def test_nn_module_is_the_gate_linear():
    m = mmkernels.nn.GatedFusion(6)
    assert isinstance(m, torch.nn.Linear) and m.weight.shape == (6, 12) and m.bias.shape == (6,)
    a, b = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    mt.assert_close(m(a, b), gated_fusion_ref(a, b, m.weight, m.bias), backend="cpu",
                    magnitude=a.abs() + b.abs())


@pytest.mark.compile
def test_kernels_compile_for_sm80_and_sm90_without_local_memory():
    results = compile_family("gating", (80, 90))
    assert_compiled_clean(results, ("gated_blend_fwd_kernel", "gated_blend_bwd_kernel"), (80, 90))
