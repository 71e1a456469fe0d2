"""Product units (fused Triton GEMMs with the log / sign operands; torch on CPU), sigma-pi units with
sparse conjuncts and the pi-sigma network: outputs and every gradient against the float64
references on the CPU path and the Triton path (interpreter on CPU); exact zeros and negative
inputs, integer exponents, gradcheck, bad input, nn modules and the compile tier."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import testing as mt
from mmkernels import _cpp
from tests.conftest import CPU_IMPLS, assert_compiled_clean, backends, compile_family
from mmkernels.reference import pi_sigma_ref, product_unit_magnitudes, product_unit_ref, sigma_pi_unit_ref


def _product_inputs(lead, I, J, K, dtype, device, seed, integer=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*lead, I, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    x = x * torch.where(torch.rand(*lead, I, generator=gen) < 0.4, -1.0, 1.0)  # negatives
    if integer:
        w = torch.randint(0, 3, (J, I), generator=gen).double()  # x = 0 allowed: 0^0 = 1, 0^k = 0
        x.reshape(-1, I)[::5, 0] = 0.0
    else:
        w = torch.randn(J, I, generator=gen, dtype=torch.float64) * 0.3
    v = torch.randn(K, J, generator=gen, dtype=torch.float64) if K else None
    do = torch.randn(*lead, K or J, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(v), cast(do)


def _check_product(x, w, v, do, backend):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, v)]
    with mmkernels.use_backend(backend):
        out = mmkernels.product_unit(*leaves)
        out.backward(do)
    refs = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (x, w, v)]
    ref = product_unit_ref(*refs)
    ref.backward(do.double().cpu())
    assert out.shape == ref.shape and out.dtype == x.dtype
    mt.assert_close(out, ref, backend=backend, what="product unit out")
    dp = do.double().cpu() if v is None else do.double().cpu() @ v.double().cpu()
    dx_mag, dw_mag = product_unit_magnitudes(x, w, dp)
    mt.assert_close(leaves[0].grad, refs[0].grad, backend=backend, magnitude=dx_mag, what="product unit dx")
    mt.assert_close(leaves[1].grad, refs[1].grad, backend=backend, magnitude=dw_mag, what="product unit dW")
    if v is not None:
        mt.assert_close(leaves[2].grad, refs[2].grad, backend=backend, what="product unit dv")
    return out


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead,I,J,K", [((1,), 1, 1, 0), ((20,), 9, 7, 3), ((2, 35), 40, 70, 0), ((130,), 33, 5, 4)])
def test_product_unit(lead, I, J, K, dtype, backend, device, poison_outputs):
    """Tiles crossing every block boundary (64 x 64 x 32) on the Triton path."""
    _check_product(*_product_inputs(lead, I, J, K, dtype, device, seed=I * J + K), backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_product_unit_integer_exponents_are_exact_products(backend, device, poison_outputs):
    """Integer exponents: the log-space form is the real product Π x_i^{w_ji}, signs and exact
    zeros included (0^0 = 1, 0^k = 0 up to 2^-100 per power)."""
    x, w, _, do = _product_inputs((12,), 6, 5, 0, torch.float64, device, seed=3, integer=True)
    out = _check_product(x, w, None, do, backend)
    direct = torch.prod(x.cpu().unsqueeze(-2) ** w.cpu(), dim=-1)
    torch.testing.assert_close(out.cpu(), direct, rtol=1e-12, atol=1e-25)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("integer", [False, True], ids=["real", "integer"])
def test_product_unit_float32_zeros_signs_and_magnitudes(integer, backend, device, poison_outputs):
    """float32 (the CPU path's C++ epilogue and dx, csrc/product.cpp): exact zeros, -0.0, small and
    large |x|, real and integer exponents (cos / sin of π·B exactly ±1 and 0 at integer B), against
    the float64 reference; a rerun gives the same bits."""
    x, w, v, do = _product_inputs((64,), 12, 9, 4, torch.float32, device, seed=11, integer=integer)
    x[::7, 1] = 0.0
    x[3::7, 2] = -0.0
    x[1::9, 3] = 1e-4  # |log x| up to ~9: float32 keeps exp(A) within its tolerance
    x[2::9, 4] = -300.0
    first = _check_product(x, w, v, do, backend)
    with mmkernels.use_backend(backend):
        again = mmkernels.product_unit(x, w, v)
    assert torch.equal(first.detach(), again)


@pytest.mark.parametrize("backend,device", [b for b in backends(cpu_torch=True) if b.values[0] == "cpu"])
def test_product_unit_double_backward(backend, device):
    """create_graph: the backward makes P, Q and the logs again from x and W with torch ops, so a
    gradient of the gradient is right (gradgradcheck, float64; the saved P and Q carry no graph)."""
    x, w, v, _ = _product_inputs((4,), 3, 2, 2, torch.float64, device, seed=9)
    args = tuple(t.detach().requires_grad_() for t in (x, w, v))
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradgradcheck(mmkernels.product_unit, args)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_product_unit_gradcheck(backend, device):
    x, w, v, _ = _product_inputs((4,), 3, 2, 2, torch.float64, device, seed=9)
    args = tuple(t.detach().requires_grad_() for t in (x, w, v))
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(mmkernels.product_unit, args)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_sigma_pi_unit_with_sparse_conjuncts(backend, device, poison_outputs):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    z[0, 0, 2] = 0.0  # an exact zero inside a conjunct
    conj = torch.tensor([[0, 2, -1], [1, 1, 3], [4, -1, -1], [-1, -1, -1], [2, 3, 4]])  # a power, a constant
    w, b = torch.randn(2, 5, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)
    do = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64)
    leaves = [t.clone().to(device).requires_grad_() for t in (z, w, b)]
    with mmkernels.use_backend(backend):
        out = mmkernels.sigma_pi_unit(leaves[0], conj, leaves[1], leaves[2])
        out.backward(do.to(device))
        assert torch.autograd.gradcheck(lambda *a: mmkernels.sigma_pi_unit(a[0], conj, a[1], a[2], "tanh"),
                                        tuple(t.detach().requires_grad_() for t in leaves))
    refs = [t.clone().requires_grad_() for t in (z, w, b)]
    ref = sigma_pi_unit_ref(refs[0], conj, refs[1], refs[2])
    ref.backward(do)
    mt.assert_close(out, ref, backend=backend)
    for a, r in zip(leaves, refs):
        mt.assert_close(a.grad, r.grad, backend=backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_pi_sigma(backend, device, poison_outputs):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    w, b = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)
    do = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    leaves = [t.clone().to(device).requires_grad_() for t in (z, w, b)]
    with mmkernels.use_backend(backend):
        out = mmkernels.pi_sigma(*leaves, activation=None)
        out.backward(do.to(device))
        sig = mmkernels.pi_sigma(z.to(device), w.to(device), b.to(device))
        assert torch.autograd.gradcheck(mmkernels.pi_sigma, tuple(t.detach().requires_grad_() for t in leaves))
    refs = [t.clone().requires_grad_() for t in (z, w, b)]
    ref = pi_sigma_ref(*refs)
    ref.backward(do)
    mt.assert_close(out, ref, backend=backend)
    mt.assert_close(sig, torch.sigmoid(ref.detach()), backend=backend)
    for a, r in zip(leaves, refs):
        mt.assert_close(a.grad, r.grad, backend=backend)


@pytest.mark.parametrize("cpu_impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("S", [0, 1, 2, 3, 4, 5, 8])
def test_product_over_last_is_exact_with_zeros_and_twice_differentiable(S, dtype, cpu_impl):
    """The products' backward (prefix times suffix products, no division) against torch's own
    product backward (bitwise in float64), with one and with several zero factors in a product, and
    its own gradient (gradgradcheck); on both CPU impls (the C++ pass of csrc/product.cpp: S of 2,
    3, 4 and 8 compiled as constants, the rest at run time), 41 rows so that a vector's tail runs."""
    from mmkernels.ops.product import ProductOverLastFunction

    gen = torch.Generator().manual_seed(11)
    h = torch.randn(41, 3, S, generator=gen, dtype=torch.float64).to(dtype)
    if S >= 2:
        h[0, 0, 0] = 0.0       # one zero: its gradient is the product of the others
        h[1, 1, :2] = 0.0      # two zeros: every gradient of that product is 0
    g = torch.randn(41, 3, generator=gen, dtype=torch.float64).to(dtype)
    ours, theirs = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = ProductOverLastFunction.apply(ours)
    out.backward(g)
    theirs.prod(dim=-1).backward(g)
    rtol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, theirs.prod(dim=-1).detach(), rtol=rtol, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=rtol, atol=0)
    if S >= 2:  # two zero factors: every gradient of that product is exactly 0
        assert not ours.grad[1, 1].any()
    if cpu_impl == "auto" and _cpp.ops() is not None and _cpp.has_ops(("product_over_last_backward",)):
        # the C++ pass keeps the torch ops' order (test_cpp asserts that it builds where it can)
        with _cpp.use_cpu_impl("torch"):
            plain = h.clone().requires_grad_()
            ProductOverLastFunction.apply(plain).backward(g)
        assert torch.equal(ours.grad, plain.grad)
    if dtype == torch.float64:
        leaf = h.clone().requires_grad_()
        assert torch.autograd.gradgradcheck(ProductOverLastFunction.apply, (leaf,))


def test_bad_input_names_the_argument():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"weight must be \(J, I\)"):
        mmkernels.product_unit(x, w[:, :3])
    with pytest.raises(ValueError, match=r"out_weight must be \(K, J\)"):
        mmkernels.product_unit(x, w, torch.randn(2, 4))
    with pytest.raises(TypeError, match="same dtype"):
        mmkernels.product_unit(x, w.double())
    with pytest.raises(ValueError, match="conjuncts entries"):
        mmkernels.sigma_pi_unit(x, torch.tensor([[0, 4]]), torch.randn(1, 1))
    with pytest.raises(TypeError, match="conjuncts must be"):
        mmkernels.sigma_pi_unit(x, torch.tensor([[0.0, 1.0]]), torch.randn(1, 1))
    with pytest.raises(ValueError, match=r"weight must be \(K, Q\)"):
        mmkernels.sigma_pi_unit(x, torch.tensor([[0, 1]]), torch.randn(1, 2))
    with pytest.raises(ValueError, match="activation"):
        mmkernels.pi_sigma(x, torch.randn(2, 3, 4), activation="softsign")
    with pytest.raises(ValueError, match=r"weight must be \(K, S, n\)"):
        mmkernels.pi_sigma(x, torch.randn(2, 3, 5))


def test_nn_modules():
    torch.manual_seed(0)
    x = torch.rand(6, 5) + 0.5
    pu = mmkernels.nn.ProductUnit(5, 4, 3)
    mt.assert_close(pu(x), product_unit_ref(x, pu.weight, pu.out_weight), backend="cpu")
    conj = torch.tensor([[0, 1], [2, -1], [3, 4]])
    sp = mmkernels.nn.SigmaPi(conj, 2, activation="sigmoid")
    mt.assert_close(sp(x), torch.sigmoid(sigma_pi_unit_ref(x, conj, sp.weight, sp.bias)), backend="cpu")
    ps = mmkernels.nn.PiSigma(5, 3, 2)
    mt.assert_close(ps(x), torch.sigmoid(pi_sigma_ref(x, ps.weight, ps.bias)), backend="cpu")
    assert "conjuncts=3" in repr(sp)


@pytest.mark.compile
def test_kernels_compile_for_sm80_and_sm90_without_local_memory():
    results = compile_family("product", (80, 90))
    assert_compiled_clean(results, ("product_terms_kernel", "product_dweight_kernel"), (80, 90))
