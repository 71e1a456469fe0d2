"""Attention module / soft switch and hard switch: forward and gradients against the float64
references on the CPU path and the Triton path (interpreter on CPU); masks (fully masked rows),
temperature, J = 1, odd D, D past one tile, J past the fused limit, gradcheck, bad input, the
nn modules and the compile tier."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import testing as mt
from mmkernels.ops import attention as ops
from tests.conftest import assert_compiled_clean, backends, compile_family
from mmkernels.reference import attention_module_magnitudes, attention_module_ref, hard_switch_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(5, 1, 3), (7, 6, 5), (3, 17, 200), (2, 3, 5, 7)]  # z (..., J), x (..., J, D): lead.., J, D


def _inputs(shape, dtype, device, seed, masked=None):
    *lead, J, D = shape
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, J, generator=gen, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    x = torch.randn(*lead, J, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    ds = torch.randn(*lead, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    mask = None
    if masked == "random":
        mask = torch.rand(*lead, J, generator=gen) < 0.6
        mask.reshape(-1, J)[::3] = False  # fully masked rows
        mask = mask.to(device)
    elif masked == "broadcast":
        mask = (torch.arange(J) % 2 == 0).to(device)  # (J,), broadcast over the leading dims
    return z, x, ds, mask


def _check(z, x, ds, mask, tau, backend):
    zr, xr = z.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    with mmkernels.use_backend(backend):
        s = mmkernels.attention_module(zr, xr, mask, temperature=tau)
        s.backward(ds)
    z64, x64 = z.detach().double().cpu().requires_grad_(), x.detach().double().cpu().requires_grad_()
    ref = attention_module_ref(z64, x64, None if mask is None else mask.cpu(), tau)
    ref.backward(ds.double().cpu())
    s_mag, dz_mag = attention_module_magnitudes(z, x, ds, None if mask is None else mask.cpu(), tau)
    assert s.shape == ref.shape and s.dtype == x.dtype
    mt.assert_close(s, ref, backend=backend, magnitude=s_mag, what="attention s")
    mt.assert_close(xr.grad, x64.grad, backend=backend, what="attention dx")
    mt.assert_close(zr.grad, z64.grad, backend=backend, magnitude=dz_mag, what="attention dz")
    return s, zr.grad, xr.grad


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masked", [None, "random", "broadcast"])
def test_forward_backward(shape, masked, dtype, backend, device, poison_outputs):
    z, x, ds, mask = _inputs(shape, dtype, device, seed=sum(shape), masked=masked)
    for tau in (1.0, 0.37):
        _check(z, x, ds, mask, tau, backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_fully_masked_rows_give_zeros_not_nan(backend, device, poison_outputs):
    z, x, ds, _ = _inputs((4, 6, 9), torch.float32, device, seed=1)
    mask = torch.zeros(4, 6, dtype=torch.bool, device=device)
    mask[1, 2] = True
    s, dz, dx = _check(z, x, ds, mask, 1.0, backend)
    for r in (0, 2, 3):
        assert torch.equal(s[r], torch.zeros_like(s[r])) and torch.equal(dz[r], torch.zeros_like(dz[r]))
        assert torch.equal(dx[r], torch.zeros_like(dx[r]))
    torch.testing.assert_close(s[1], x[1, 2])  # one allowed input: s is that input


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_more_inputs_than_the_fused_limit(backend, device, poison_outputs):
    """J > MAX_J runs the torch composition on every backend, with the same results."""
    z, x, ds, mask = _inputs((2, ops.MAX_J + 76, 3), torch.float32, device, seed=4, masked="random")
    _check(z, x, ds, mask, 1.0, backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_strided_inputs_and_gradcheck(backend, device):
    z, x, ds, mask = _inputs((3, 5, 4), torch.float64, device, seed=6, masked="random")
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # strides (20, 1, 5)
    zt = torch.randn(5, 3, dtype=torch.float64, device=device).T  # strides (1, 3)
    _check(zt, xt, ds, mask, 0.8, backend)
    zg, xg = zt.detach().requires_grad_(), xt.detach().requires_grad_()
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: mmkernels.attention_module(a, b, mask, 0.8), (zg, xg))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("straight_through", [False, True])
def test_hard_switch(straight_through, backend, device, poison_outputs):
    z, x, ds, _ = _inputs((2, 5, 4, 3), torch.float32, device, seed=9)
    z[0, 0, 1] = z[0, 0, 3] = z[0, 0].max() + 1  # a tie: the lower index wins
    zr, xr = z.clone().requires_grad_(), x.clone().requires_grad_()
    with mmkernels.use_backend(backend):
        s = mmkernels.hard_switch(zr, xr, straight_through=straight_through, temperature=0.5)
        s.backward(ds)
    torch.testing.assert_close(s.double().cpu(), hard_switch_ref(z, x), rtol=0, atol=0)
    chosen = z.argmax(-1)
    want_dx = torch.zeros_like(x).scatter_(-2, chosen[..., None, None].expand(*chosen.shape, 1, 3), ds[..., None, :])
    assert torch.equal(xr.grad, want_dx)  # only the selected input gets the gradient
    if straight_through:  # the soft switch's gradient
        z64 = z.double().cpu().requires_grad_()
        attention_module_ref(z64, x.double().cpu(), None, 0.5).backward(ds.double().cpu())
        _, dz_mag = attention_module_magnitudes(z, x, ds, None, 0.5)
        mt.assert_close(zr.grad, z64.grad, backend=backend, magnitude=dz_mag)
    else:
        assert zr.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_kernel_special_values_as_the_composition(dtype):
    """The C++ attention module (csrc/attention.cpp) against the torch composition it replaces, on
    rows holding NaN, +inf, -inf, +inf with -inf, only -inf, and a fully masked row: the same NaN
    pattern and the same values, forward (s, lse) and backward (dz, dx); reruns bitwise equal."""
    from mmkernels import _cpp

    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "attention_forward"):
        pytest.fail(f"the C++ CPU kernels did not load: {_cpp.status(build=False)}")
    inf, nan = float("inf"), float("nan")
    z, x, ds, _ = _inputs((7, 5, 33), dtype, "cpu", seed=21)
    z[0, 1], z[1, 2], z[2, 3] = nan, inf, -inf
    z[3, 0], z[3, 4] = inf, -inf
    z[4] = -inf
    mask = torch.ones(7, 5, dtype=torch.bool)
    mask[5] = False
    mask[6, 1:] = False
    mask[0, 1] = False  # the NaN of row 0 is masked out: that row is finite
    for m in (None, mask):
        want_s, want_lse = ops._torch_forward(z, x, m, 0.7)
        s, lse = cpp.attention_forward(z, x, m, 0.7)
        torch.testing.assert_close(s, want_s, equal_nan=True)
        torch.testing.assert_close(lse, want_lse, equal_nan=True)
        want = ops._torch_backward(z, x, m, s, lse, ds, 0.7)
        got = cpp.attention_backward(z, x, m, s, lse, ds, 0.7)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True)
        again = cpp.attention_forward(z, x, m, 0.7) + cpp.attention_backward(z, x, m, s, lse, ds, 0.7)
        for a, b in zip(again, (s, lse) + tuple(got)):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_bad_input_names_the_argument():
    z, x = torch.randn(3, 4), torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="z must be"):
        mmkernels.attention_module(z, x[:, :3])
    with pytest.raises(TypeError, match="same dtype"):
        mmkernels.attention_module(z.double(), x)
    with pytest.raises(TypeError, match="mask must be a bool"):
        mmkernels.attention_module(z, x, torch.ones(3, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        mmkernels.attention_module(z, x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        mmkernels.attention_module(z, x, temperature=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        mmkernels.hard_switch(z.long(), x)
    with pytest.raises(ValueError, match="J >= 1"):
        mmkernels.hard_switch(torch.randn(3, 0), torch.randn(3, 0, 5))


def test_nn_modules():
    z, x, ds, mask = _inputs((4, 3, 6), torch.float32, "cpu", seed=2, masked="random")
    m = mmkernels.nn.SoftSwitch(temperature=2.0)
    assert isinstance(m, mmkernels.nn.AttentionModule) and "temperature=2.0" in repr(m)
    torch.testing.assert_close(m(z, x, mask), mmkernels.attention_module(z, x, mask, 2.0), rtol=0, atol=0)
    h = mmkernels.nn.HardSwitch(straight_through=True)
    torch.testing.assert_close(h(z, x).double(), hard_switch_ref(z, x))


@pytest.mark.compile
def test_kernels_compile_for_sm80_and_sm90_without_local_memory():
    results = compile_family("attention", (80, 90))
    assert_compiled_clean(results, ("attention_fwd_kernel", "attention_bwd_kernel"), (80, 90))
    configs = {(c.block_j, c.block_d) for c in ops.launch_configs()}
    built = {tuple(int(v.split("=")[1]) for v in r.config.split()[:2]) for r in results}
    assert configs <= built


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_hard_switch_gradcheck_on_x(backend, device):
    """The hard switch is differentiable in x (a selection); z's straight-through gradient is by
    design not the (zero) true one, so only x is checked numerically."""
    z, x, _, _ = _inputs((3, 4, 2), torch.float64, device, seed=12)
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v: mmkernels.hard_switch(z, v), (x.detach().requires_grad_(),))
