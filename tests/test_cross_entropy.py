"""Fused cross-entropy: value and gradient against the float64 reference and F.cross_entropy, on the
CPU path and the Triton path (interpreter on CPU), every reduction, ignore_index, label smoothing,
in-place backward, bad input, gradcheck and the nn module."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import testing as mt
from mmkernels.ops import cross_entropy as ops
from tests.conftest import assert_compiled_clean, backends, compile_family
from mmkernels.reference import cross_entropy_magnitudes, cross_entropy_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(N, C, dtype, device, seed, ignored=0.25, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    t = torch.randint(0, C, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < ignored] = ignore_index
    return x, t.to(device)


def _check(x, t, backend, **kw):
    """ours: loss and d logits; checked against the float64 reference and F.cross_entropy."""
    xr = x.detach().clone().requires_grad_()
    # the incoming gradient seeded too: drawn from the global generator, a tiny one (whatever the
    # tests before left it at) put every float16 d logit below float16's normal range, where no
    # rounding meets a relative bound
    gen = torch.Generator().manual_seed(x.numel())
    g = torch.randn(() if kw.get("reduction", "mean") != "none" else t.shape, dtype=torch.float64, generator=gen)
    g = g.to(device=x.device, dtype=x.dtype)
    with mmkernels.use_backend(backend):  # the backward too: the backend is read at each call
        loss = mmkernels.cross_entropy(xr, t, **kw)
        loss.backward(g)
    x64 = x.detach().double().cpu().requires_grad_()
    ref = cross_entropy_ref(x64, t, **kw)
    ref.backward(g.double().cpu())
    assert loss.dtype == x.dtype and loss.shape == ref.shape and xr.grad.dtype == x.dtype
    loss_mag, grad_mag = cross_entropy_magnitudes(x, t, g, **kw)
    mt.assert_close(loss, ref, backend=backend, magnitude=loss_mag, what="cross_entropy loss")
    mt.assert_close(xr.grad, x64.grad, backend=backend, magnitude=grad_mag, what="cross_entropy d logits")
    # and torch's own, computed in float64 (so that only our rounding differs)
    x_t = x.detach().double().cpu().requires_grad_()
    want = F.cross_entropy(x_t, t.cpu(), **kw)
    want.backward(g.double().cpu())
    torch.testing.assert_close(ref.detach(), want.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(x64.grad, x_t.grad, rtol=1e-12, atol=1e-12, equal_nan=True)
    return xr.grad


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C", [(1, 1), (7, 13), (33, 100), (3, 5000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_backward(N, C, reduction, dtype, backend, device, poison_outputs):
    x, t = _inputs(N, C, dtype, device, seed=N * C)
    for eps in (0.0, 0.1):
        _check(x, t, backend, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_everywhere_and_full_smoothing(reduction, backend, device, poison_outputs):
    """A custom ignore_index on every row (mean: NaN, as torch; the gradient is all zeros), on none,
    and label smoothing 1 (the target term vanishes)."""
    x, t = _inputs(9, 6, torch.float32, device, seed=5, ignored=0.0)
    t_all = torch.full_like(t, 3)
    xr = x.clone().requires_grad_()
    with mmkernels.use_backend(backend):
        loss = mmkernels.cross_entropy(xr, t_all, ignore_index=3, reduction=reduction)
        loss.sum().backward()
    want = F.cross_entropy(x.cpu().double(), t_all.cpu(), ignore_index=3, reduction=reduction)
    torch.testing.assert_close(loss.detach().cpu().double(), want, equal_nan=True)
    assert torch.equal(xr.grad, torch.zeros_like(x))  # every reduction, mean's NaN loss included (as torch)
    if reduction != "mean":
        _check(x, t, backend, reduction=reduction, label_smoothing=1.0, ignore_index=3)


@pytest.mark.parametrize("backend,device", backends())
def test_minus_infinity_logits(backend, device, poison_outputs):
    """-inf logits that are not the target: a finite loss without smoothing (no 0·inf NaN); with
    smoothing the loss is +inf, as torch."""
    x, t = _inputs(6, 10, torch.float32, device, seed=2, ignored=0.0)
    x[:, 0] = float("-inf")
    t[t == 0] = 1
    grad = _check(x, t, backend, reduction="sum")
    assert torch.isfinite(grad).all()
    with mmkernels.use_backend(backend):
        loss = mmkernels.cross_entropy(x, t, reduction="none", label_smoothing=0.2)
    assert torch.isinf(loss).all() and (loss > 0).all()


@pytest.mark.parametrize("backend,device", backends())
def test_one_dim_input_and_strided_logits(backend, device, poison_outputs):
    x, t = _inputs(8, 12, torch.float32, device, seed=7)
    wide = torch.randn(12, 16, device=device).T[:, :12]  # (16, 12) with strides (1, 16)
    with mmkernels.use_backend(backend):
        one = mmkernels.cross_entropy(x[0], torch.tensor(5, device=device), reduction="none")
        strided = mmkernels.cross_entropy(wide[:8], t.clamp(min=0))
    assert one.shape == ()
    torch.testing.assert_close(one.double().cpu(), cross_entropy_ref(x[0], torch.tensor(5), reduction="none"))
    torch.testing.assert_close(strided.double().cpu(), cross_entropy_ref(wide[:8], t.clamp(min=0)))


@pytest.mark.parametrize("backend,device", backends())
def test_inplace_backward_writes_the_gradient_into_the_logits(backend, device, poison_outputs):
    x, t = _inputs(10, 30, torch.float32, device, seed=3)
    _check(x, t, backend, label_smoothing=0.05)
    plain = x.detach().clone().requires_grad_()
    with mmkernels.use_backend(backend):
        mmkernels.cross_entropy(plain * 1.0, t, label_smoothing=0.05).backward()
    want = plain.grad
    h = x.detach().clone().requires_grad_()
    with mmkernels.use_backend(backend):
        logits = h * 1.0  # an op's output, as the output layer's
        ptr = logits.data_ptr()
        mmkernels.cross_entropy(logits, t, label_smoothing=0.05, inplace_backward=True).backward()
    mt.assert_close(h.grad, want.to(h.dtype), backend=backend)
    mt.assert_close(logits.detach(), want, backend=backend)  # the logits' storage holds d logits
    assert logits.data_ptr() == ptr
    with pytest.raises(ValueError, match="leaf"):
        mmkernels.cross_entropy(h, t, inplace_backward=True)


@pytest.mark.parametrize("backend,device", backends())
def test_gradcheck(backend, device):
    x, t = _inputs(4, 7, torch.float64, device, seed=11)
    x.requires_grad_()
    with mmkernels.use_backend(backend):
        for kw in (dict(), dict(reduction="none", label_smoothing=0.3), dict(reduction="sum")):
            assert torch.autograd.gradcheck(lambda v: mmkernels.cross_entropy(v, t, **kw), (x,))


def test_bad_input_names_the_argument():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="target must have shape"):
        mmkernels.cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="target must hold integer"):
        mmkernels.cross_entropy(x, t.float())
    with pytest.raises(TypeError, match="input must be float"):
        mmkernels.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="reduction"):
        mmkernels.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        mmkernels.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="movedim"):
        mmkernels.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"target\[2\] = 7"):
        mmkernels.cross_entropy(x, torch.tensor([0, 1, 7, 3]))
    with pytest.raises(ValueError, match="at least one class"):
        mmkernels.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


def test_cpu_path_works_in_bounded_chunks(monkeypatch):
    """The CPU path steps through row chunks: results do not depend on the chunk size."""
    x, t = _inputs(37, 11, torch.float32, "cpu", seed=4)

    def run():
        xr = x.clone().requires_grad_()
        loss = mmkernels.cross_entropy(xr, t, label_smoothing=0.1, reduction="none")
        loss.backward(torch.linspace(-1, 1, 37))
        return loss.detach(), xr.grad

    want = run()
    monkeypatch.setattr(ops, "CPU_CHUNK_ELEMS", 30)  # 2 rows a chunk
    _check(x, t, "cpu", label_smoothing=0.1)
    for a, b in zip(run(), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_nn_module_is_a_drop_in():
    m = mmkernels.nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1, reduction="sum")
    assert isinstance(m, torch.nn.CrossEntropyLoss)
    x, t = _inputs(6, 4, torch.float32, "cpu", seed=8, ignored=0.0)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x, t, ignore_index=2, label_smoothing=0.1,
                                                        reduction="sum"))
    w = torch.rand(4) + 0.5
    m = mmkernels.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x, t, weight=w, label_smoothing=0.1))
    assert set(m.state_dict()) == set(torch.nn.CrossEntropyLoss(weight=w).state_dict())  # the weight buffer
    with pytest.raises(ValueError, match="weight must be a float"):
        mmkernels.cross_entropy(x, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="softcap"):
        mmkernels.cross_entropy(x, t, softcap=0.0)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_z_loss_and_softcap(reduction, dtype, backend, device, poison_outputs):
    """Class weights (weighted mean), label smoothing, a z-loss and soft-capping together: loss and
    d logits against the float64 reference of an output layer with an identity weight (whose
    logits are the input), and torch's own for the weights alone."""
    from mmkernels.reference import linear_cross_entropy_magnitudes, linear_cross_entropy_ref

    x, t = _inputs(21, 37, dtype, device, seed=3)
    w = (torch.rand(37, generator=torch.Generator().manual_seed(1)) + 0.5).to(device)
    g = torch.randn(() if reduction != "none" else t.shape, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64).to(device=device, dtype=dtype)
    eye = torch.eye(37, dtype=torch.float64)
    for kw in (dict(weight=w, label_smoothing=0.2), dict(weight=w, label_smoothing=0.1, z_loss_scale=1e-2,
                                                          softcap=5.0)):
        xr = x.detach().clone().requires_grad_()
        with mmkernels.use_backend(backend):
            loss = mmkernels.cross_entropy(xr, t, reduction=reduction, **kw)
            loss.backward(g)
        ref_kw = {**kw, "weight": w.cpu(), "softcap": kw.get("softcap", 0.0)}
        x64 = x.detach().double().cpu().requires_grad_()
        ref, _ = linear_cross_entropy_ref(x64, eye, t, reduction=reduction, **ref_kw)
        ref.backward(g.double().cpu())
        mags = linear_cross_entropy_magnitudes(x, eye, t, g, reduction=reduction, **ref_kw)
        mt.assert_close(loss, ref, backend=backend, magnitude=mags[0], what="loss")
        mt.assert_close(xr.grad, x64.grad, backend=backend, magnitude=mags[1], what="d logits")
        if "softcap" not in kw:
            want = F.cross_entropy(x.detach().double().cpu(), t.cpu(), weight=w.double().cpu(),
                                   reduction=reduction, label_smoothing=0.2)
            torch.testing.assert_close(ref.detach(), want, rtol=1e-12, atol=1e-12)


def test_every_launch_config_is_a_power_of_two_up_to_the_cap():
    cfgs = ops.launch_configs()
    assert [c.block_c for c in cfgs] == [1 << p for p in range(0, 13)]
    assert ops.resolve_config(32000).block_c == ops.MAX_BLOCK_C


@pytest.mark.compile
def test_kernels_compile_for_sm80_and_sm90_without_local_memory():
    """Compile tier: both kernels at every config the resolver returns (and the bf16 / fp16 /
    fp64 / smoothing / int64 variants) build for sm_80 and sm_90 with no spills."""
    results = compile_family("cross_entropy", (80, 90))
    assert_compiled_clean(results, ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"), (80, 90))
    blocks = {r.config.split()[0] for r in results}
    assert {f"BLOCK_C={c.block_c}" for c in ops.launch_configs()} <= blocks
