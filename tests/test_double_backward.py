"""A gradient of the gradient (``create_graph``) through every op whose backward runs a kernel
without a derivative of its own (C++ or Triton): under ``create_graph`` the backward runs torch ops
instead (the softmax family's formula in y and dy; the other ops the gradients of a torch
composition, ops/_util.py ``graph_grads``). Before, the second derivative came back silently 0.
gradgradcheck in float64 on every backend, and in float32 the second derivative against the same
computation through float64 torch compositions (the C++ kernels run float32). gradgradcheck on the
CPU backends only: the interpreter runs each of its perturbed forwards as a launch (14-31 s an op);
the float32 check covers the Triton path (its forward, then the same torch ops back)."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.reference import attention_module_ref, pi_sigma_ref, quadratic_ref, sigma_pi_unit_ref
from tests.conftest import backends

CONJUNCTS = torch.tensor([[0, 1], [2, 3], [1, 4]])


def _mask():
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2] = False
    mask[3] = False  # a row with nothing allowed: s = 0
    return mask


def _attention(z, x):
    return mmkernels.attention_module(z, x, _mask(), temperature=0.8)


def _bilinear_ref(z, x, w):
    return torch.einsum("nh,ni,jhi->nj", z.double(), x.double(), w.double())


# name: (ours, float64 torch composition (None: gradgradcheck only), input shapes)
CASES = {
    "softmax": (lambda x: mmkernels.softmax(x, -1), lambda x: torch.softmax(x, -1), [(4, 9)]),
    "softmax_dim0": (lambda x: mmkernels.softmax(x, 0), lambda x: torch.softmax(x, 0), [(6, 3, 2)]),
    "log_softmax": (lambda x: mmkernels.log_softmax(x, -1), lambda x: torch.log_softmax(x, -1), [(4, 9)]),
    "softmin": (lambda x: mmkernels.softmin(x, -1), lambda x: torch.softmax(-x, -1), [(4, 9)]),
    "attention_module": (_attention, lambda z, x: attention_module_ref(z, x, _mask(), temperature=0.8),
                         [(5, 4), (5, 4, 3)]),
    "hard_switch_straight_through": (lambda z, x: mmkernels.hard_switch(z, x, straight_through=True, temperature=0.7),
                                     None, [(5, 4), (5, 4, 3)]),
    "bilinear": (mmkernels.bilinear, _bilinear_ref, [(6, 4), (6, 5), (3, 4, 5)]),
    "quadratic": (mmkernels.quadratic, quadratic_ref, [(6, 4), (3, 10)]),
    "pi_sigma": (lambda z, w: mmkernels.pi_sigma(z, w, activation=None), pi_sigma_ref, [(5, 6), (3, 4, 6)]),
    "sigma_pi_unit": (lambda z, w: mmkernels.sigma_pi_unit(z, CONJUNCTS, w),
                      lambda z, w: sigma_pi_unit_ref(z, CONJUNCTS, w), [(5, 6), (2, 3)]),
}


def _inputs(name, shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    if name.startswith("hard_switch"):  # argmax well apart: the numerical derivative keeps it
        ts[0] = ts[0] + torch.arange(ts[0].shape[-1], dtype=torch.float64) * 3.0
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def _second_derivative(fn, args, seed=1):
    """d/dargs of <d fn(args)·v / dargs, u>, float64, for fixed random v and u."""
    gen = torch.Generator().manual_seed(seed)
    out = fn(*args)
    v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad((out * v).sum(), args, create_graph=True)
    s = sum((g * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g)).sum() for g in grads)
    return [None if g is None else g.double().cpu() for g in torch.autograd.grad(s, args, allow_unused=True)]


@pytest.mark.parametrize("backend,device", [b for b in backends(cpu_torch=True) if b.values[0] == "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradgradcheck(name, backend, device):
    ours, _, shapes = CASES[name]
    args = _inputs(name, shapes, torch.float64, device)
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradgradcheck(ours, tuple(args))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[1] is not None])
def test_float32_second_derivative(name, backend, device):
    ours, ref, shapes = CASES[name]
    args = _inputs(name, shapes, torch.float32, device)
    with mmkernels.use_backend(backend):
        got = _second_derivative(ours, args)
    want = _second_derivative(ref, [a.detach().double().cpu().requires_grad_() for a in args])
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.zeros_like(w) if g is None else g
        assert w.norm() > 0, (name, i)  # the check has something to find
        assert (g - w).norm() <= 1e-4 * w.norm(), (name, i, (g - w).norm() / w.norm())


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_losses_first_derivative_under_create_graph_and_a_clear_error_past_it(name, backend, device):
    """The losses' backward has no torch-ops twin (once_differentiable): under create_graph the first
    derivative is the usual one (cross-entropy's raised there before: an out= op in its CPU path),
    and a second one through the loss alone raises — torch's own error for a gradient without a
    graph, or once_differentiable's where the incoming gradient has one. (Inside a larger graph
    whose incoming gradient has none, the loss's own curvature is still dropped without an error:
    once_differentiable raises only where the incoming gradient has a graph.)"""
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, 9, (6,), generator=gen).to(device)
    if name == "cross_entropy":
        args = [torch.randn(6, 9, generator=gen, dtype=torch.float64).to(device).requires_grad_()]
        ours = lambda x: mmkernels.cross_entropy(x, target)  # noqa: E731
        ref = lambda x: torch.nn.functional.cross_entropy(x, target)  # noqa: E731
    else:
        args = [torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(),
                torch.randn(9, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()]
        ours = lambda x, w: mmkernels.linear_cross_entropy(x, w, target)  # noqa: E731
        ref = lambda x, w: torch.nn.functional.cross_entropy(x @ w.T, target)  # noqa: E731
    with mmkernels.use_backend(backend):
        grads = torch.autograd.grad(ours(*args), args, create_graph=True)
        torch.testing.assert_close(grads, torch.autograd.grad(ref(*args), args))
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
            torch.autograd.grad(sum(g.sum() for g in grads), args)
