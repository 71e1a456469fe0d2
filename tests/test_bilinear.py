"""Sigma-pi / bilinear family: forward and every gradient against the float64 einsum reference and
against F.bilinear, on the CPU path and the Triton path; gradcheck, nn.Bilinear, bad input."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import testing as mt
from tests.conftest import backends
from mmkernels.reference import bilinear_grads_ref, bilinear_magnitudes, bilinear_ref

BACKENDS = backends(cpu_torch=True)  # CPU: the C++ kernels and the vectorised-torch fallback


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", mt.cases("bilinear", tag="interp"), ids=lambda c: c.id)
def test_forward_and_all_gradients(case, backend, device, poison_outputs):
    ins = mt.make_inputs(case, device, seed=zlib.crc32(case.id.encode()))  # str hash() changes per process
    z, x, w = (ins[k].requires_grad_() for k in ("z", "x", "w"))
    bias = ins.get("bias")
    if bias is not None:
        bias.requires_grad_()
    dy = ins["dy"]
    with mmkernels.use_backend(backend):
        y = mmkernels.bilinear(z, x, w, bias)
        y.backward(dy)
    mags = bilinear_magnitudes(z, x, w, dy)
    assert y.shape == case.shape + (case.params["d"],) and y.dtype == case.dtype
    mt.assert_close(y, bilinear_ref(z, x, w, bias), backend=backend, magnitude=mags[0], what="y")
    refs = bilinear_grads_ref(z, x, w, dy)
    for name, got, ref, mag in zip(("dz", "dx", "dw", "db"), (z.grad, x.grad, w.grad, None if bias is None else bias.grad),
                                   refs, mags[1:]):
        if name == "db" and bias is None:
            continue
        assert got is not None and got.dtype == case.dtype, name
        mt.assert_close(got, ref, backend=backend, magnitude=mag, what=name)
    if case.dtype == torch.float32:  # and torch's own op agrees, output and every gradient
        leaves = [t.detach().clone().requires_grad_() for t in (z, x, w)]
        b2 = None if bias is None else bias.detach().clone().requires_grad_()
        y_torch = F.bilinear(*leaves, b2)
        y_torch.backward(dy)
        ours = [y, z.grad, x.grad, w.grad] + ([] if bias is None else [bias.grad])
        theirs = [y_torch] + [t.grad for t in leaves] + ([] if b2 is None else [b2.grad])
        for name, a, t, mag in zip(("y", "dz", "dx", "dw", "db"), ours, theirs, mags):
            mt.assert_close(a, t.double(), backend=backend, magnitude=mag, what=f"{name} vs F.bilinear")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_float64(backend, device):
    z = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(4, 5, dtype=torch.float64, device=device).t().contiguous().t().requires_grad_()
    w = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(mmkernels.bilinear, (z, x, w, b))
        assert torch.autograd.gradcheck(lambda z, x, w: mmkernels.bilinear(z, x, w), (z, x, w))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nn_bilinear_loads_torch_state_dict(backend, device):
    torch.manual_seed(0)
    theirs = torch.nn.Bilinear(6, 4, 3).to(device)
    ours = mmkernels.nn.Bilinear(6, 4, 3).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.Bilinear) and repr(ours) == repr(theirs)
    a = torch.randn(2, 5, 6, device=device, requires_grad=True)
    b = torch.randn(2, 5, 4, device=device, requires_grad=True)
    a2, b2 = (t.detach().clone().requires_grad_() for t in (a, b))
    with mmkernels.use_backend(backend):
        y = ours(a, b)
        y.sum().backward()
    y_ref = theirs(a2, b2)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for p, q in [(a.grad, a2.grad), (b.grad, b2.grad), (ours.weight.grad, theirs.weight.grad),
                 (ours.bias.grad, theirs.bias.grad)]:
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(2, 5), torch.randn(2, 4, 5)), ValueError,
     "same batch shape"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 5, 4)), ValueError,
     r"input1 must have shape \(\*, 5\)"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 6)), ValueError,
     r"input2 must have shape \(\*, 6\)"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)), ValueError,
     "weight must have shape"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(3)),
     ValueError, r"bias must have shape \(2,\)"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5).double(), torch.randn(2, 4, 5)), TypeError,
     "same dtype.*input2: torch.float64"),
    (lambda: mmkernels.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5, device="meta")),
     ValueError, "weight must be on a CPU or CUDA device"),
    (lambda: mmkernels.bilinear(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64),
                                torch.ones(2, 4, 5, dtype=torch.int64)), TypeError, "input1 must be float"),
    (lambda: mmkernels.bilinear(torch.randn(4), torch.randn(3, 5), torch.randn(2, 4, 5)), ValueError,
     "same batch shape"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a CPU/CUDA mismatch")
def test_mixed_devices():
    with pytest.raises(ValueError, match="same device"):
        mmkernels.bilinear(torch.randn(3, 4, device="cuda"), torch.randn(3, 5), torch.randn(2, 4, 5))


def test_tracers_see_the_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda z, x, w: mmkernels.bilinear(z, x, w))(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5))
    assert "mmkernels.bilinear_fwd" in gm.code
    gm = make_fx(lambda x, w: mmkernels.quadratic(x, w))(torch.randn(3, 4), torch.randn(2, 10))
    assert "mmkernels.quadratic_fwd" in gm.code


def test_quadratic_compiles_without_graph_breaks():
    """nn.Quadratic under torch.compile(fullgraph=True): forward and input / weight gradients equal
    eager (the packed weight's custom ops and their fakes)."""
    torch.manual_seed(0)
    layer = mmkernels.nn.Quadratic(6, 3)
    x = torch.randn(5, 6, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    y0 = layer(x)
    y0.sum().backward()
    assert torch.equal(y, y0) and torch.equal(gx, x.grad) and torch.equal(gw, layer.weight.grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("c,d,bias", [(1, 1, True), (5, 3, True), (7, 4, False)])
def test_quadratic_layer(c, d, bias, backend, device):
    from mmkernels.reference import quadratic_ref

    torch.manual_seed(c * 10 + d)
    layer = mmkernels.nn.Quadratic(c, d, bias=bias).to(device).double()
    x = torch.randn(2, 3, c, device=device, dtype=torch.float64, requires_grad=True)
    with mmkernels.use_backend(backend):
        y = layer(x)
        y.sum().backward()
    mt.assert_close(y, quadratic_ref(x, layer.weight, layer.bias), backend=backend)
    x2 = x.detach().clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    quadratic_ref(x2, w2, layer.bias).sum().backward()
    mt.assert_close(x.grad, x2.grad, backend=backend)
    mt.assert_close(layer.weight.grad, w2.grad, backend=backend)
    assert layer.weight.shape == (d, c * (c + 1) // 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_hyperlinear_layer(bias, backend, device):
    from mmkernels.reference import hyperlinear_ref

    torch.manual_seed(3)
    layer = mmkernels.nn.HyperLinear(4, 6, 5, bias=bias).to(device).double()
    x = torch.randn(7, 6, device=device, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 4, device=device, dtype=torch.float64, requires_grad=True)
    with mmkernels.use_backend(backend):
        y = layer(x, z)
        y.sum().backward()
    mt.assert_close(y, hyperlinear_ref(x, z, layer.weight, layer.hyper_weight, layer.bias), backend=backend)
    x2, z2 = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    u2 = layer.hyper_weight.detach().clone().requires_grad_()
    hyperlinear_ref(x2, z2, layer.weight, u2, layer.bias).sum().backward()
    mt.assert_close(x.grad, x2.grad, backend=backend)
    mt.assert_close(z.grad, z2.grad, backend=backend)
    mt.assert_close(layer.hyper_weight.grad, u2.grad, backend=backend)
