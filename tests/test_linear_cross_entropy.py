"""Fused linear + cross-entropy: the loss, the target log-probabilities and the gradients of input,
weight and bias against the float64 reference and F.linear_cross_entropy, on the CPU path and the
Triton path (interpreter on CPU): every reduction, class weights, label smoothing, z-loss,
soft-capping, ignored rows, vocabularies that are no multiple of a tile, ragged chunks; bounded
memory, bad input, torch.compile and the nn module."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import testing as mt
from mmkernels.ops import linear_cross_entropy as ops
from mmkernels.reference import linear_cross_entropy_magnitudes, linear_cross_entropy_ref
from tests.conftest import backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

#: Option sets: torch's own (bias, class weights, smoothing) and the anchors' (z-loss, soft-cap), alone
#: and together.
OPTIONS = {
    "bias": dict(bias=True),
    "weight+smoothing": dict(weight=True, label_smoothing=0.2),
    "zloss+softcap": dict(bias=True, z_loss_scale=1e-2, softcap=2.5),
    "all": dict(bias=True, weight=True, label_smoothing=0.1, z_loss_scale=1e-3, softcap=4.0),
}


def _inputs(T, H, V, dtype, device, seed, ignored=0.2, bias=False, weight=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 2 / H ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    cw = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.5).to(device) if weight else None
    t = torch.randint(0, V, (T,), generator=gen)
    t[torch.rand(T, generator=gen) < ignored] = -100
    return x, w, b, cw, t.to(device)


def _check(x, w, b, t, backend, chunk_tokens=None, **kw):
    """ours: loss, target log-probability, d input, d weight, d bias; checked against the float64
    reference, and the reference against F.linear_cross_entropy where torch has the options."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]
    reduction = kw.get("reduction", "mean")
    gen = torch.Generator().manual_seed(t.numel() + len(reduction))
    g = torch.randn(() if reduction != "none" else t.shape, generator=gen, dtype=torch.float64)
    g = g.to(device=x.device, dtype=x.dtype)
    with mmkernels.use_backend(backend):
        loss, tlp = mmkernels.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None
                                                   else None, return_target_logprob=True,
                                                   chunk_tokens=chunk_tokens, **kw)
        grads = torch.autograd.grad(loss, leaves, g)
    ref_leaves = [v.detach().double().cpu().requires_grad_() for v in leaves]
    ref_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_kw["softcap"] = ref_kw.get("softcap") or 0.0
    ref, ref_tlp = linear_cross_entropy_ref(ref_leaves[0], ref_leaves[1], t,
                                            linear_bias=ref_leaves[2] if b is not None else None, **ref_kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double().cpu())
    mags = linear_cross_entropy_magnitudes(x, w, t, g, linear_bias=b, **ref_kw)
    assert loss.dtype == x.dtype and loss.shape == ref.shape and tlp.shape == t.shape
    assert tlp.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    acc = tlp.dtype  # the logits are in x's dtype, the row math in float32 / float64
    mt.assert_close(loss, ref, backend=backend, magnitude=mags[0], what="linear_cross_entropy loss")
    mt.assert_close(tlp, ref_tlp, backend=backend, dtype=x.dtype if x.dtype != acc else acc,
                    magnitude=ref_tlp.abs() + 1, what="target log-probability")
    for name, got, want, mag in zip(("d input", "d weight", "d bias"), grads, ref_grads, mags[1:]):
        assert got.dtype == x.dtype and got.shape == want.shape
        mt.assert_close(got, want, backend=backend, magnitude=mag, what=f"linear_cross_entropy {name}")
    if not kw.get("z_loss_scale") and not kw.get("softcap"):  # torch's own semantics, in float64
        torch_leaves = [v.detach().double().cpu().requires_grad_() for v in leaves]
        torch_kw = {k: v for k, v in ref_kw.items() if k not in ("z_loss_scale", "softcap")}
        want = F.linear_cross_entropy(torch_leaves[0].reshape(-1, x.shape[-1]), torch_leaves[1], t.cpu().reshape(-1),
                                      linear_bias=torch_leaves[2] if b is not None else None, **torch_kw)
        torch.testing.assert_close(ref.detach().reshape(want.shape), want.detach(), rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
        for r, tg in zip(ref_grads, torch.autograd.grad(want, torch_leaves, g.double().cpu().reshape(want.shape))):
            torch.testing.assert_close(r, tg, rtol=1e-12, atol=1e-12, equal_nan=True)
    return grads


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", list(OPTIONS), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_backward(reduction, options, dtype, backend, device, poison_outputs):
    """T = 29 tokens in chunks of 8 (a ragged last chunk), vocabulary 130 (no multiple of a tile)."""
    opts = dict(OPTIONS[options])
    x, w, b, cw, t = _inputs(29, 16, 130, dtype, device, seed=len(options) * 7 + len(reduction),
                             bias=opts.pop("bias", False), weight=opts.pop("weight", False))
    _check(x, w, b, t, backend, chunk_tokens=8, reduction=reduction, weight=cw, **opts)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, backend, device, poison_outputs):
    """mean: NaN (as torch); the gradients exact zeros; the target log-probabilities 0."""
    x, w, b, _, t = _inputs(9, 8, 21, torch.float32, device, seed=3, bias=True)
    t_all = torch.full_like(t, 5)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    with mmkernels.use_backend(backend):
        loss, tlp = mmkernels.linear_cross_entropy(leaves[0], leaves[1], t_all, linear_bias=leaves[2],
                                                   ignore_index=5, reduction=reduction, z_loss_scale=0.1,
                                                   return_target_logprob=True, chunk_tokens=4)
        loss.sum().backward()
    want = F.linear_cross_entropy(x.cpu().double(), w.cpu().double(), t_all.cpu(), linear_bias=b.cpu().double(),
                                  ignore_index=5, reduction=reduction)
    torch.testing.assert_close(loss.detach().cpu().double(), want, equal_nan=True)
    assert torch.equal(tlp, torch.zeros_like(tlp))
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("backend,device", backends())
def test_leading_dims_one_chunk_and_default_chunking(backend, device, poison_outputs):
    """(B, S, H) input with (B, S) targets; the default chunk (one chunk here) and chunks of one token."""
    x, w, _, _, t = _inputs(12, 8, 50, torch.float32, device, seed=11)
    for chunk in (None, 1):
        _check(x.reshape(3, 4, 8), w, None, t.reshape(3, 4), backend, chunk_tokens=chunk, reduction="none")
        _check(x.reshape(3, 4, 8), w, None, t.reshape(3, 4), backend, chunk_tokens=chunk, label_smoothing=0.3)


def test_gradients_only_for_what_requires_grad_and_no_grad_mode(monkeypatch):
    x, w, b, _, t = _inputs(10, 8, 30, torch.float64, "cpu", seed=1, bias=True)
    wr = w.clone().requires_grad_()
    loss = mmkernels.linear_cross_entropy(x, wr, t, linear_bias=b)
    loss.backward()
    ref, _ = linear_cross_entropy_ref(x, wr.detach().requires_grad_(), t, linear_bias=b)

    def no_backward(*args, **kw):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(ops, "row_backward", no_backward)
    with torch.no_grad():
        nog = mmkernels.linear_cross_entropy(x, wr, t, linear_bias=b)
    assert not nog.requires_grad
    torch.testing.assert_close(nog, ref.detach(), rtol=1e-12, atol=1e-12)
    assert wr.grad is not None and wr.grad.shape == w.shape


def test_reduced_loss_differentiates_once_and_none_twice():
    x, w, _, _, t = _inputs(10, 8, 30, torch.float64, "cpu", seed=2)
    xr = x.clone().requires_grad_()
    loss = mmkernels.linear_cross_entropy(xr, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated once"):
        loss.backward()
    xr.grad = None
    rows = mmkernels.linear_cross_entropy(xr, w, t, reduction="none")
    rows.sum().backward(retain_graph=True)
    first = xr.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(xr.grad, 2 * first)


def test_cpu_memory_stays_near_one_chunk():
    """Forward + backward at 512 tokens, vocabulary 4000, chunks of 32 tokens: the peak above the
    gradients is within 10% of the unfused composition's (torch's profiler, as the bench)."""
    from mmkernels.bench.check import peak_memory

    x, w, b, cw, t = _inputs(512, 32, 4000, torch.float32, "cpu", seed=4, bias=True, weight=True)
    cw = cw.float()
    grads_bytes = sum(v.numel() * v.element_size() for v in (x, w, b))

    def step(fn):
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]

        def run():
            loss = fn(*leaves)
            loss.backward()
            return loss
        return run

    ours = step(lambda xx, ww, bb: mmkernels.linear_cross_entropy(xx, ww, t, linear_bias=bb, weight=cw,
                                                                  label_smoothing=0.1, chunk_tokens=32))
    unfused = step(lambda xx, ww, bb: F.cross_entropy(F.linear(xx, ww, bb), t, weight=cw, label_smoothing=0.1))
    peak_ours, how = peak_memory(ours, torch.device("cpu"))
    peak_unfused, _ = peak_memory(unfused, torch.device("cpu"))
    if peak_ours is None:
        pytest.fail(f"no memory figure: {how}")
    above_ours, above_unfused = peak_ours - grads_bytes, peak_unfused - grads_bytes
    assert above_ours <= 0.10 * above_unfused, (above_ours, above_unfused)


def test_bad_input_names_the_argument():
    x, w, b, _, t = _inputs(4, 8, 10, torch.float32, "cpu", seed=0, bias=True)
    L = mmkernels.linear_cross_entropy
    with pytest.raises(ValueError, match="linear_weight"):
        L(x, w[:, :4], t)
    with pytest.raises(ValueError, match="linear_weight must have input's dtype"):
        L(x, w.double(), t)
    with pytest.raises(ValueError, match="linear_bias"):
        L(x, w, t, linear_bias=b[:3])
    with pytest.raises(ValueError, match="weight must be a float"):
        L(x, w, t, weight=torch.ones(3))
    with pytest.raises(TypeError, match="target"):
        L(x, w, t.float())
    with pytest.raises(ValueError, match="target must have shape"):
        L(x, w, t[:2])
    with pytest.raises(ValueError, match="reduction"):
        L(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        L(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss_scale"):
        L(x, w, t, z_loss_scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        L(x, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        L(x, w, t, chunk_tokens=0)
    with pytest.raises(IndexError, match="out of range"):
        L(x, w, torch.tensor([0, 1, 10, 2]))


def test_ignore_index_none_means_minus_100_as_torch():
    x, w, _, _, t = _inputs(6, 8, 10, torch.float64, "cpu", seed=9, ignored=0.5)
    got = mmkernels.linear_cross_entropy(x, w, t, ignore_index=None)
    torch.testing.assert_close(got, F.linear_cross_entropy(x, w, t, ignore_index=None), rtol=1e-12, atol=1e-12)


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the custom ops; the result matches eager."""
    x, w, b, cw, t = _inputs(20, 8, 40, torch.float32, "cpu", seed=6, bias=True, weight=True)

    def f(xx, ww, bb):
        return mmkernels.linear_cross_entropy(xx, ww, t, linear_bias=bb, weight=cw, z_loss_scale=1e-3,
                                              chunk_tokens=8)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        loss = fn(*leaves)
        loss.backward()
        outs.append((loss.detach(), *[v.grad for v in leaves]))
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_nn_module_is_a_drop_in():
    """Same parameters and state_dict keys as torch.nn.LinearCrossEntropyLoss; same loss."""
    torch.manual_seed(0)
    ours = mmkernels.nn.LinearCrossEntropyLoss(8, 30, bias=True, label_smoothing=0.1, dtype=torch.float64)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 30, bias=True, label_smoothing=0.1, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x, _, _, _, t = _inputs(12, 8, 30, torch.float64, "cpu", seed=8)
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-12, atol=1e-12)
    assert "z_loss_scale" in repr(mmkernels.nn.LinearCrossEntropyLoss(8, 30, z_loss_scale=1e-4))


def test_chunk_size_follows_the_vocabulary():
    assert ops.chunk_tokens_for(4096, 32000, torch.device("cpu")) == ops.CHUNK_ELEMS["cpu"] // 32000
    assert ops.chunk_tokens_for(16384, 128256, torch.device("cuda")) == ops.CHUNK_ELEMS["cuda"] // 128256
    assert ops.chunk_tokens_for(10, 32000, torch.device("cpu")) == 10
    assert ops.chunk_tokens_for(100, 10 ** 9, torch.device("cpu")) == 16
    assert ops.chunk_tokens_for(100, 50, torch.device("cpu"), chunk_tokens=7) == 7


@pytest.mark.parametrize("backend,device", [p for p in backends() if p.id == "triton"])
def test_loss_alone_takes_no_logits(backend, device, monkeypatch, poison_outputs):
    """Without gradients the Triton path is one GEMM kernel with a log-sum-exp epilogue
    (triton_stats): no logits chunk, no cross-entropy row kernel; every term, a vocabulary over
    several programs, equal to the float64 reference."""
    x, w, b, cw, t = _inputs(45, 24, 333, torch.float32, device, seed=12, bias=True, weight=True)

    def no_rows(*args, **kw):
        raise AssertionError("the row kernels ran: the logits were materialised")

    monkeypatch.setattr(ops, "row_forward", no_rows)
    kw = dict(weight=cw, label_smoothing=0.1, z_loss_scale=1e-3, softcap=5.0)
    with mmkernels.use_backend(backend), torch.no_grad():
        loss, tlp = mmkernels.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none",
                                                   return_target_logprob=True, **kw)
    ref, ref_tlp = linear_cross_entropy_ref(x, w, t, linear_bias=b, reduction="none", **kw)
    cfg, v_split = ops.resolve_stats(45, 333, torch.float32, 132, softcap=True)
    assert -(-333 // v_split) > 1  # the vocabulary over several programs, combined after
    mt.assert_close(loss, ref, backend="triton-tf32" if ops.dot_class(x.dtype) == "tf32" else backend,
                    dtype=torch.float32, magnitude=ref.abs() + 1, what="loss")
    mt.assert_close(tlp, ref_tlp, backend=backend, dtype=torch.float32, magnitude=ref_tlp.abs() + 1,
                    what="target log-probability")
