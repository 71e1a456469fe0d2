"""The C++ CPU kernels (csrc/, mmkernels._cpp): built on first use, equal to the vectorised-torch
path they replace, and a clean fallback when no compiler is present."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import _cpp, moe
from mmkernels.ops import routing as R

from mmkernels import testing as mt
from mmkernels.reference import (FORWARD, attention_module_magnitudes, attention_module_ref, dispatch_ref,
                                 experts_ref, route_ref, routing_keys_ref, routing_weights_ref, select_experts_ref,
                                 softmax_backward_magnitude, softmax_backward_ref)
from tests.conftest import backends

HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_cpp = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler on this machine: the fallback is tested below")

TORCH_FORWARD = {"softmax": torch.softmax, "log_softmax": torch.log_softmax,
                 "softmin": torch.nn.functional.softmin}
FIELDS = ("counts", "offsets", "sorted_slots", "slot_rows", "dropped", "tile_experts", "tile_row_starts", "num_tiles")


OPS = ("route_softmax_topk", "top_k_ids", "cpu_isa", "route_metadata", "experts_forward", "experts_backward",
       "bilinear_forward", "bilinear_backward", "softmax_forward", "softmax_backward", "gated_blend_forward", "gated_blend_backward",
       "attention_forward", "attention_backward", "hard_switch_backward", "product_exp_cis_", "product_dx_",
       "product_over_last", "product_over_last_backward",
       "cache_info", "empty_cache")


@needs_cpp
def test_cpp_kernels_build_and_say_so():
    assert _cpp.load(), _cpp.status()
    assert _cpp.status().startswith("C++ CPU kernels active")
    from mmkernels.families import cpu_paths

    assert "C++ for attention, bilinear, experts, gating, product, routing, softmax; torch for cross_entropy" in cpu_paths()
    missing = [name for name in OPS if not hasattr(_cpp.ops(), name)]
    assert not missing, f"operators not registered: {missing}"


def _ran(fn) -> set:
    """The mmkernels_cpu operators one call of ``fn`` ran (from the profiler's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name.split("::")[1] for e in prof.events() if e.name.startswith("mmkernels_cpu::")}


def _one_step_of_the_cpp_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=gen, requires_grad=True)
    r = moe.route(torch.randn(40, 6, generator=gen, requires_grad=True), 2)
    out = moe.experts(x, r, torch.randn(6, 10, 8, generator=gen, requires_grad=True),
                      torch.randn(6, 8, 5, generator=gen, requires_grad=True))
    z, w = torch.randn(40, 3, generator=gen, requires_grad=True), torch.randn(4, 3, 8, generator=gen, requires_grad=True)
    y = mmkernels.bilinear(z, x, w)
    x3 = x[:, :6].reshape(40, 3, 2).contiguous()
    s = mmkernels.attention_module(z, x3) + mmkernels.hard_switch(z, x3)
    (out.sum() + y.sum() + s.sum()).backward()


@needs_cpp
def test_each_op_runs_its_cpp_kernels_forward_and_backward():
    """Not a silent fallback: on the C++ path every op's forward and backward run their operators
    (seen by the profiler); on the torch path none runs."""
    assert _cpp.load(), _cpp.status()
    with _cpp.use_cpu_impl("cpp"):
        assert _ran(_one_step_of_the_cpp_ops) >= {"route_softmax_topk", "route_metadata", "experts_forward",
                                                "experts_backward", "bilinear_forward", "bilinear_backward",
                                                "attention_forward", "attention_backward", "hard_switch_backward"}
    with _cpp.use_cpu_impl("torch"):
        assert _ran(_one_step_of_the_cpp_ops) == set()


@needs_cpp
def test_experts_pooled_buffers_across_sizes_match_the_reference():
    """The C++ experts' pooled outputs and scratch (csrc/pool.h) across calls of growing and
    shrinking size — new tensors, exact-fit and larger recycled ones, and calls under the pool's
    1 MB threshold — against the float64 reference, forward and dx, each time."""
    assert _cpp.load(), _cpp.status()
    gen = torch.Generator().manual_seed(3)
    E, H, I, k = 5, 256, 8, 2
    gu = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) * H ** -0.5
    dn = torch.randn(E, H, I, generator=gen, dtype=torch.float64) * I ** -0.5
    hits = _cpp.cache_info()["hits"]
    with _cpp.use_cpu_impl("cpp"):
        for T in (600, 1024, 7, 1024, 513):  # rows x H: 1.2 MB, 2 MB, under 1 MB, 2 MB, 1.05 MB
            x = torch.randn(T, H, generator=gen, dtype=torch.float64, requires_grad=True)
            dout = torch.randn(T, H, generator=gen, dtype=torch.float64)
            r = moe.route(torch.randn(T, E, generator=gen, dtype=torch.float64), k)
            out = moe.experts(x, r, gu, dn)
            (dx,) = torch.autograd.grad(out, x, dout)
            xr = x.detach().requires_grad_()
            ref = experts_ref(xr, r.weights.detach(), r.expert_ids, r.dropped, gu, dn)
            (dx_ref,) = torch.autograd.grad(ref, xr, dout)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
    assert _cpp.cache_info()["hits"] > hits  # the later calls did recycle


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_experts_reruns_are_bitwise_identical(dtype):
    """The C++ experts share the experts among threads first come, first served: an expert's GEMMs
    run in whichever thread's scratch, so every scratch region must have one alignment whatever the
    thread (MKL's kernels differ by alignment). Widths whose regions used to start at odd offsets
    (H = 32, I = 16: 65 values a row), two threads: ten calls give one result, forward and every
    gradient."""
    assert _cpp.load(), _cpp.status()
    gen = torch.Generator().manual_seed(5)
    T, H, I, E, k = 18, 32, 16, 16, 4
    x = torch.randn(T, H, generator=gen, dtype=dtype)
    gu = torch.randn(E, 2 * I, H, generator=gen, dtype=dtype) * 0.2
    dn = torch.randn(E, H, I, generator=gen, dtype=dtype) * 0.2
    logits, dout = torch.randn(T, E, generator=gen, dtype=dtype), torch.randn(T, H, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        with _cpp.use_cpu_impl("cpp"):
            for _ in range(10):
                leaves = [t.clone().requires_grad_() for t in (x, gu, dn, logits)]
                out = moe.experts(leaves[0], moe.route(leaves[3], k, block_m=16), leaves[1], leaves[2])
                out.backward(dout)
                results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for rerun in results[1:]:
        for got, first in zip(rerun, results[0]):
            assert torch.equal(got, first)


@needs_cpp
@pytest.mark.parametrize("T,E,k,cap,block_m", [(0, 4, 2, 2**31 - 1, 16), (1, 1, 1, 2**31 - 1, 1), (5, 4, 2, 2**31 - 1, 16),
                                                (64, 7, 3, 2**31 - 1, 4), (64, 8, 2, 10, 16), (333, 16, 4, 0, 64),
                                                (1000, 64, 8, 90, 32), (257, 3, 3, 2**31 - 1, 128)])
def test_route_metadata_equals_the_reference_and_the_torch_path(T, E, k, cap, block_m):
    gen = torch.Generator().manual_seed(T * 31 + E)
    assert _cpp.load(), _cpp.status()
    for ids in (torch.randint(0, E, (T, k), generator=gen), torch.zeros(T, k, dtype=torch.long)):  # + one expert gets all
        ref = dispatch_ref(ids, E, None if cap == 2**31 - 1 else cap, block_m)  # slot by slot, in Python
        fallback = R._metadata(ids, E, cap, block_m)
        got = _cpp.ops().route_metadata(ids, E, cap, block_m)
        for name, a, b in zip(FIELDS, got, fallback):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
            assert torch.equal(a, ref[name].to(a.dtype)), name


@pytest.fixture(params=[3, 2, 1, 0], ids=["avx512bf16", "avx512", "avx2", "baseline"])
def cpu_isa(request):
    """Each test with the C++ kernels capped at AVX-512 with BF16, AVX-512, AVX2 and the baseline
    (the router's scalar pass). A cap the CPU cannot run falls back to the best it has (checked here: the selection
    logic), and the test runs on that one — nothing skips for the CPU it runs on; every level is
    compiled into the library whatever the CPU."""
    assert _cpp.load(), _cpp.status()
    ops = _cpp.ops()
    before = ops.cpu_isa(-1)
    ops.cpu_isa(3)
    best = ops.cpu_isa(-1)  # what the CPU has
    got = ops.cpu_isa(request.param)
    assert got == min(request.param, best), (request.param, best, got)
    assert f"{_cpp.CPU_ISAS[got]} kernels" in _cpp.status()
    yield got
    ops.cpu_isa(before)


_KIND_NAMES = ("softmax", "log_softmax", "softmin")


def _special_rows(x: torch.Tensor) -> torch.Tensor:
    """x with the rows a softmax gets wrong: NaN, +inf, all -inf, some -inf, huge and tiny values."""
    x = x.clone()
    n = x.shape[-1]
    x[0, n // 2] = float("nan")
    x[1, 0] = float("inf")
    x[2] = float("-inf")
    x[3, ::2] = float("-inf")
    x[4] = x[4] * 1e4
    x[5] = x[5] * 1e-30
    return x


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 7, 33, 1000, 1800, 2500, 5000])
def test_softmax_loops_at_each_level(cpu_isa, dtype, N):
    """csrc/softmax.cpp's forward and backward of every kind at the level the fixture picks:
    against the float64 references, special values as torch, bitwise-identical reruns. (1800
    float64 and 2500 float32 elements: rows that ask for the next row's x while they finish; each
    row as computed alone, where no next row is asked for, gives the same bits.)"""
    ops = _cpp.ops()
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(9, N, generator=gen).mul_(4).to(dtype)
    if N > 1:
        x = _special_rows(x)
    dy = torch.randn(9, N, generator=gen).to(dtype)
    for kind, name in enumerate(_KIND_NAMES):
        y = ops.softmax_forward(x, kind)
        torch_y = TORCH_FORWARD[name](x.float(), -1)
        mt.assert_close(y, FORWARD[name](x, -1), backend="cpu", what=f"{name} forward")
        assert torch.equal(torch.isnan(y), torch.isnan(torch_y.to(dtype))), name
        mt.assert_same_bits(ops.softmax_forward(x, kind), y, f"{name} forward rerun")
        alone = torch.cat([ops.softmax_forward(x[i:i + 1], kind) for i in range(x.shape[0])])
        mt.assert_same_bits(alone, y, f"{name} forward, each row alone")
        finite = ~torch.isnan(y).any(-1)  # the backward's rows of a finite forward
        yf, dyf = y[finite], dy[finite]
        ref, magnitude = softmax_backward_ref(yf, dyf, -1, name), softmax_backward_magnitude(yf, dyf, -1, name)
        dx = ops.softmax_backward(yf, dyf, kind, -1)
        mt.assert_close(dx, ref, backend="cpu", what=f"{name} backward", magnitude=magnitude)
        # an explicit store mode: the same loops and blocks, the same bits
        plain = ops.softmax_backward(yf, dyf, kind, 0)
        mt.assert_close(plain, ref, backend="cpu", what=f"{name} backward, our loops", magnitude=magnitude)
        mt.assert_same_bits(ops.softmax_backward(yf, dyf, kind, 1), plain, f"{name} backward, streamed")
        mt.assert_same_bits(plain, dx, f"{name} backward, stream=0")
        if name == "log_softmax" and yf.shape[0]:
            # positive y (not log-softmax outputs, but legal arguments): one in a row's last block, a
            # row of them up to 60 (exp_np, exact to float's rounding up to kExpNpMax = 88) and one
            # past 88 (std::exp; that row's dy small, so its dx stays finite), in either store mode
            yp = yf.clone()
            yp[0, -1] = 0.5
            dyp = dyf.clone()
            if yp.shape[0] >= 3:
                yp[-1] = torch.linspace(-20.0, 60.0, N).to(dtype)
                yp[-2, 0] = 88.5
                dyp[-2] *= 1e-3
            dxp = ops.softmax_backward(yp, dyp, kind, -1)
            mt.assert_close(dxp, softmax_backward_ref(yp, dyp, -1, name), backend="cpu", what=f"{name} backward, y > 0",
                            magnitude=softmax_backward_magnitude(yp, dyp, -1, name))
            for stream in (0, 1):
                mt.assert_same_bits(ops.softmax_backward(yp, dyp, kind, stream), dxp, f"{name} y > 0, stream={stream}")


@needs_cpp
@pytest.mark.parametrize("N", [31, 32, 33, 64, 97])
def test_bfloat16_subnormal_results_as_torch(cpu_isa, N):
    """bfloat16 softmax outputs and softmax-backward gradients below float's normal range (the
    AVX512-BF16 conversion would flush them to zero; the level narrows such blocks as the others
    do): torch's bits, at every level, in the blocks of 32 and the pairs of the forward and in the
    tails."""
    ops = _cpp.ops()
    x = torch.zeros(3, N)
    x[:, 1::3] = -87.0  # exp(-87) = 1.6e-38 over a sum of about N: a subnormal float
    x[1] = torch.linspace(-87.0, -80.0, N)  # and a row of normal values near it
    x = x.bfloat16()
    y = ops.softmax_forward(x, 0)
    torch_y = torch.softmax(x.float(), -1).bfloat16()
    tiny = torch_y.float().abs() < torch.finfo(torch.float32).tiny
    assert tiny.any() and (torch_y[tiny] != 0).all()
    assert torch.equal(y[tiny].view(torch.int16), torch_y[tiny].view(torch.int16))
    mt.assert_close(y, torch_y.double(), backend="cpu", what="bfloat16 forward, subnormal outputs")
    dy = torch.full_like(y, 1e-30)  # y·(dy - Σ y·dy): subnormal where y is 1e-8
    dy[:, ::2] = 0
    ys = torch.full_like(y, 1e-8)
    for stream in (0, 1):
        dx = ops.softmax_backward(ys, dy, 0, stream)
        torch_dx = torch._softmax_backward_data(dy.float(), ys.float(), -1, torch.float32).bfloat16()
        small = torch_dx.float().abs() < torch.finfo(torch.float32).tiny
        assert (small & (torch_dx != 0)).any()
        assert torch.equal(dx.view(torch.int16), torch_dx.view(torch.int16)), f"stream={stream}"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1, 5), (2, 7, 3), (2, 33, 16), (3, 1000, 37), (2, 64, 300), (1, 5000, 8)])
def test_softmax_columns_at_each_level(cpu_isa, dtype, shape):
    """csrc/softmax.cpp's column kernels (the reduced dim in the middle, no transpose) at the level
    the fixture picks: tiles of one cache line, of many columns and of a remainder; special values
    in some columns; against the float64 references, bitwise-identical reruns. bfloat16 in float
    math, each result rounded once; its backward with plain stores asked for (stream 0: below the
    AVX512-BF16 level the default runs ATen's softmax backward)."""
    ops = _cpp.ops()
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    if shape[1] > 1 and shape[2] > 4:
        x[0, shape[1] // 2, 0] = float("nan")
        x[0, 0, 1] = float("inf")
        x[0, :, 2] = float("-inf")
        x[0, ::2, 3] = float("-inf")
        x[-1, :, 4] *= 1e4
    dy = torch.randn(shape, generator=gen).to(dtype)
    for kind, name in enumerate(_KIND_NAMES):
        y = ops.softmax_forward(x, kind, 1)
        mt.assert_close(y, FORWARD[name](x, 1), backend="cpu", what=f"{name} forward")
        assert torch.equal(torch.isnan(y), torch.isnan(TORCH_FORWARD[name](x, 1))), name
        mt.assert_same_bits(ops.softmax_forward(x, kind, 1), y, f"{name} forward rerun")
        yf = torch.nan_to_num(y, nan=0.0)  # the backward on the finite columns' values
        dx = ops.softmax_backward(yf, dy, kind, 0, 1)
        mt.assert_close(dx, softmax_backward_ref(yf, dy, 1, name), backend="cpu", what=f"{name} backward",
                        magnitude=softmax_backward_magnitude(yf, dy, 1, name))
        mt.assert_same_bits(ops.softmax_backward(yf, dy, kind, 0, 1), dx, f"{name} backward rerun")
        if name == "log_softmax" and shape[1] > 1:
            # a positive y past kExpNpMax = 88 in column 0 (std::exp for that tile; its dy small, so
            # dx stays finite, and of one sign, so that Σ dy does not cancel): not a log-softmax
            # output, but a legal argument
            yp, dyp = yf.clone(), dy.clone()
            yp[0, 1, 0] = 88.5
            dyp[0, :, 0] = dyp[0, :, 0].abs() * 1e-5
            dxp = ops.softmax_backward(yp, dyp, kind, 0, 1)
            mt.assert_close(dxp, softmax_backward_ref(yp, dyp, 1, name), backend="cpu", what=f"{name} backward, y > 88",
                            magnitude=softmax_backward_magnitude(yp, dyp, 1, name))


def _check_blend(ops, pre, a, b, dout, what: str):
    """csrc/gating.cpp's blend forward and backward on these tensors against the float64
    references, in their dtype, and a bitwise-identical rerun of each."""
    out = ops.gated_blend_forward(pre, a, b)
    assert out.dtype == a.dtype
    g = torch.sigmoid(pre.double())
    mt.assert_close(out, g * a.double() + (1 - g) * b.double(), backend="cpu", what=f"{what} forward")
    grads = ops.gated_blend_backward(dout, pre, a, b)
    d = dout.double()
    gg = g * (1 - g)
    want = (d * g, d * (1 - g), d * (a.double() - b.double()) * gg)
    magnitudes = (None, None, d.abs() * (a.double().abs() + b.double().abs()) * gg)  # a - b cancels
    for got, ref, mag, name in zip(grads, want, magnitudes, ("da", "db", "dpre")):
        assert got.dtype == a.dtype
        mt.assert_close(got, ref, backend="cpu", what=f"{what} {name}", magnitude=mag)
    mt.assert_same_bits(ops.gated_blend_forward(pre, a, b), out, f"{what} rerun")
    for again, first in zip(ops.gated_blend_backward(dout, pre, a, b), grads):
        mt.assert_same_bits(again, first, f"{what} backward rerun")


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1), (37, 29), (3, 1000)])
def test_gated_blend_bfloat16_at_each_level(cpu_isa, shape):
    """csrc/gating.cpp's bfloat16 blend (float math, narrowed as written) at the level the fixture
    picks: forward and backward against the float64 references of the bfloat16 inputs, within
    bfloat16's rounding; ±inf and large pre; bitwise-identical reruns. (37 x 29: 32-element
    narrowing blocks and a tail; 3 x 1000: the backward's 256-element chunks.)"""
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    pre, a, b, dout = ((torch.randn(*shape, generator=gen) * 3).bfloat16() for _ in range(4))
    if pre.numel() >= 3:
        pre.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), 80.0]).bfloat16()
    _check_blend(_cpp.ops(), pre, a, b, dout, "bf16 blend")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gating_and_attention_loops_at_each_level(cpu_isa, dtype):
    """csrc/gating.cpp's blend and csrc/attention.cpp's module at the level the fixture picks,
    forward and backward against the float64 references, bitwise-identical reruns."""
    ops = _cpp.ops()
    gen = torch.Generator().manual_seed(3)
    pre, a, b, dout = (torch.randn(37, 29, generator=gen, dtype=dtype) * 3 for _ in range(4))
    pre[0, :3] = torch.tensor([float("inf"), float("-inf"), 80.0], dtype=dtype)
    _check_blend(ops, pre, a, b, dout, "blend")

    z = torch.randn(23, 7, generator=gen, dtype=dtype).requires_grad_()
    x = torch.randn(23, 7, 19, generator=gen, dtype=dtype).requires_grad_()
    ds = torch.randn(23, 19, generator=gen, dtype=dtype)
    mask = torch.rand(23, 7, generator=gen) > 0.3
    mask[4] = False
    s, lse = ops.attention_forward(z.detach(), x.detach(), mask, 0.7)
    ref = attention_module_ref(z, x, mask, 0.7)
    mt.assert_close(s, ref, backend="cpu", what="attention forward")
    dz, dx = ops.attention_backward(z.detach(), x.detach(), mask, s, lse, ds, 0.7)
    ref_dz, ref_dx = torch.autograd.grad(ref, (z, x), ds.double())
    _, mag_dz = attention_module_magnitudes(z.detach(), x.detach(), ds, mask, 0.7)
    mt.assert_close(dz, ref_dz, backend="cpu", what="attention dz", magnitude=mag_dz)
    mt.assert_close(dx, ref_dx, backend="cpu", what="attention dx")
    mt.assert_same_bits(ops.attention_forward(z.detach(), x.detach(), mask, 0.7)[0], s, "attention rerun")


def _hard_rows(T: int, E: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Logits with the rows a router gets wrong: ties, -inf rows, +inf, NaN, +0 / -0."""
    key = torch.randn(T, E, generator=gen, dtype=dtype) * 3
    key[::3] = torch.randint(0, 3, (key[::3].shape), generator=gen).to(dtype)  # rows full of ties
    key[2::7] = float("-inf")
    key[5::11, : max(1, E // 2)] = float("inf")
    key[1::5, 0] = float("nan")  # some rows: NaN among -inf (NaN ranks last)
    key[4::9, -1] = float("nan")
    key[6::13] = torch.where(torch.rand(key[6::13].shape, generator=gen) < 0.5, 0.0, -0.0).to(dtype)
    return key


@needs_cpp
@pytest.mark.parametrize("E,k", [(1, 1), (5, 3), (16, 16), (17, 1), (24, 5), (32, 4), (33, 2), (48, 4), (64, 8),
                                 (64, 9), (100, 8), (128, 16), (200, 8), (256, 8), (300, 4)])
def test_router_kernel_against_the_reference(E, k, cpu_isa):
    """route_softmax_topk and top_k_ids on float32 rows of every register count of the row
    kernels (E up to 256; k up to 16 on AVX-512, 8 on AVX2; past them the scalar pass) against the
    float64 reference:
    ids exactly, weights within float32 softmax rounding, both softmax modes, hard rows included."""
    gen = torch.Generator().manual_seed(E * 100 + k)
    logits = _hard_rows(90, E, gen)
    ids_ref = select_experts_ref(routing_keys_ref(logits), k)
    assert torch.equal(_cpp.ops().top_k_ids(logits, k), ids_ref)
    for renormalize in (True, False):
        w, ids = _cpp.ops().route_softmax_topk(logits, k, renormalize, 2.5)
        assert torch.equal(ids, ids_ref)
        want = routing_weights_ref(logits, ids_ref, renormalize=renormalize, routed_scaling=2.5).detach()
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.double(), want, rtol=2e-6, atol=1e-30, equal_nan=True)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (37, 8, 2), (200, 64, 8), (50, 5, 5)])
def test_top_k_ids_equals_the_stable_order(T, E, k, dtype, cpu_isa):
    gen = torch.Generator().manual_seed(E * 7 + k)
    key = _hard_rows(T, E, gen, dtype)
    got = _cpp.ops().top_k_ids(key, k)
    want = R._best_first(key)[:, :k]
    assert got.dtype == torch.int64 and torch.equal(got, want)
    allowed = torch.rand(T, E, generator=gen) < 0.5  # DeepSeek's group mask: disallowed columns last
    assert torch.equal(_cpp.ops().top_k_ids(key, k, allowed), R._best_first(key, allowed)[:, :k])


@needs_cpp
@pytest.mark.parametrize("kw", [{}, dict(renormalize=False), dict(renormalize=False, routed_scaling=2.5),
                                dict(capacity_factor=1.0), dict(scoring="sigmoid", n_groups=4, topk_groups=2)])
def test_route_on_both_cpu_impls_against_the_reference(kw, cpu_isa):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 16, generator=gen)
    ref = route_ref(logits, 4, block_m=16, **kw)
    out = {}
    for impl in ("torch", "cpp"):
        with _cpp.use_cpu_impl(impl):
            out[impl] = moe.route(logits, 4, block_m=16, **kw)
    for name in FIELDS:
        a, b = getattr(out["cpp"], name), getattr(out["torch"], name)
        assert torch.equal(a, b), name
        assert torch.equal(a.cpu().to(ref[name].dtype), ref[name]), name
    # the C++ router's softmax: in double, rounded once, or float32 in a vector row kernel (as torch's)
    torch.testing.assert_close(out["cpp"].weights, out["torch"].weights, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out["cpp"].weights.double(), ref["weights"].detach(), rtol=2e-6, atol=1e-7)


@needs_cpp
def test_product_ops_check_their_inputs():
    assert _cpp.load(), _cpp.status()
    ops = _cpp.ops()
    a = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.product_exp_cis_(a.double(), a.double(), True)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.product_exp_cis_(a.t(), a.clone().t(), True)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.product_exp_cis_(a, torch.randn(4, 5), True)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.product_dx_(a, torch.randn(6, 4), 1e-30)


@needs_cpp
def test_bad_ids_raise_in_cpp():
    assert _cpp.load(), _cpp.status()  # a compiler is here: a failed build is a failure, not a skip
    with pytest.raises(RuntimeError, match="out of range"):
        _cpp.ops().route_metadata(torch.tensor([[0, 9]]), 4, 10, 16)


@needs_cpp
def test_corrupt_routing_raises_in_the_cpp_experts():
    """The C++ experts read rows through the routing's tensors: entries out of range raise instead
    of reading out of bounds."""
    assert _cpp.load(), _cpp.status()
    x, gu, dn = torch.randn(6, 4), torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    r = moe.route(torch.randn(6, 3), 2)
    args = lambda ss, sr, off: (x, r.weights, gu, dn, None, None, ss, sr, off, 2, 0, False, 1.0, 1.0)  # noqa: E731
    bad_rows = r.slot_rows.clone()
    bad_rows[3] = -1
    bad_slots = r.sorted_slots.clone()
    bad_slots[0] = 99
    for ss, sr, off, match in ((r.sorted_slots, bad_rows, r.offsets, "slot_rows entry"),
                               (bad_slots, r.slot_rows, r.offsets, "sorted_slots entry"),
                               (r.sorted_slots, r.slot_rows, r.offsets.flip(0).contiguous(), "offsets")):
        with pytest.raises(RuntimeError, match=match):
            _cpp.ops().experts_forward(*args(ss, sr, off))


def test_fallback_when_the_build_fails(monkeypatch):
    """No compiler: route() warns once and runs the vectorised-torch path; 'cpp' is an error."""
    def broken():
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(_cpp, "_build", broken)
    _cpp._reset_for_tests()
    try:
        logits = torch.randn(50, 8)
        with pytest.warns(RuntimeWarning, match="vectorised-torch CPU path"):
            r = moe.route(logits, 2)
        ref = route_ref(logits, 2)
        assert torch.equal(r.sorted_slots, ref["sorted_slots"].to(torch.int32))
        assert "simulated" in _cpp.status() and _cpp.status().startswith("vectorised-torch")
        with _cpp.use_cpu_impl("cpp"), pytest.raises(RuntimeError, match="unavailable"):
            moe.route(logits, 2)
        _one_step_of_the_cpp_ops()  # the experts and sigma-pi run their torch paths too
        assert _ran(_one_step_of_the_cpp_ops) == set()
    finally:
        _cpp._reset_for_tests()


def test_import_works_with_the_cpp_path_disabled():
    code = ("import torch, mmkernels; from mmkernels import moe, _cpp; r = moe.route(torch.randn(9, 4), 2); "
            "print(_cpp.status())")
    env = dict(os.environ, MMKERNELS_CPP="0")
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "disabled by MMKERNELS_CPP=0" in out.stdout


def test_import_and_ops_work_without_a_compiler(tmp_path):
    """A machine without a C++ compiler, for real: CXX names no program and the build cache is
    empty, so the first CPU op tries the build, fails, warns once, and every op runs its torch
    path (importing never builds)."""
    code = ("import warnings, torch, mmkernels; from mmkernels import moe, _cpp\n"
            "assert not _cpp._state['tried'], 'importing built something'\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    r = moe.route(torch.randn(9, 4), 2)\n"
            "    y = moe.experts(torch.randn(9, 6), r, torch.randn(4, 10, 6), torch.randn(4, 6, 5))\n"
            "    b = mmkernels.bilinear(torch.randn(9, 3), torch.randn(9, 6), torch.randn(2, 3, 6))\n"
            "print(len([x for x in w if 'vectorised-torch CPU path' in str(x.message)]), y.shape[0], b.shape[1])\n"
            "print(_cpp.status())")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("MMKERNELS_CPP", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "1 9 2", out.stdout  # warned once, and the ops ran
    assert lines[1].startswith("vectorised-torch CPU path (build failed or no compiler"), lines[1]


def test_use_cpu_impl_checks_its_argument():
    with pytest.raises(ValueError, match="impl must be one of"):
        with _cpp.use_cpu_impl("fast"):
            pass


@pytest.mark.parametrize("backend,device", [p for p in backends(cpu_torch=True) if p.values[0] == "cpu"])
def test_the_cpu_torch_param_selects_the_fallback(request, backend, device):
    want = "torch" if "cpu-torch" in request.node.callspec.id else "auto"
    assert _cpp._state["impl"] == want


@needs_cpp
def test_pooled_outputs_are_recycled_only_when_unreferenced():
    """csrc/pool.h: an output still referenced (here: kept, a view of it, or saved for backward)
    never comes back from the pool; once dropped, its memory is handed out again; outputs are
    not views (in-place use is allowed); empty_cache releases the free ones."""
    assert _cpp.load(), _cpp.status()
    gen = torch.Generator().manual_seed(5)
    T, H, I, E = 1024, 256, 160, 4  # h (2T, 2I) 2.6 MB, out (T, H) 1 MB: pooled (1 MB and over)
    x = torch.randn(T, H, generator=gen)
    gu, dn = torch.randn(E, 2 * I, H, generator=gen) * 0.05, torch.randn(E, H, I, generator=gen) * 0.05
    r = moe.route(torch.randn(T, E, generator=gen), 2)
    _cpp.empty_cache()
    with _cpp.use_cpu_impl("cpp"):
        first = moe.experts(x, r, gu, dn)
        ref = first.clone()
        view = first[:3]
        second = moe.experts(x, r, gu, dn)
        assert second.data_ptr() != first.data_ptr()  # first is alive: not recycled
        del first, second
        third = moe.experts(x, r, gu, dn)
        assert view.data_ptr() != third.data_ptr()  # a view keeps the memory taken
        torch.testing.assert_close(third, ref, rtol=0, atol=0)
        del view
        hits = _cpp.cache_info()["hits"]
        fourth = moe.experts(x, r, gu, dn)
        assert _cpp.cache_info()["hits"] > hits  # the dropped outputs' memory came back
        assert fourth._base is None  # not a view: in-place use is fine
        fourth.add_(1.0)
        torch.testing.assert_close(fourth, ref + 1.0, rtol=0, atol=0)
        xg = x.clone().requires_grad_()
        out = moe.experts(xg, r, gu, dn)  # h saved for the backward: held until then
        x2 = torch.randn(T, H, generator=gen)  # another input: a recycled h would be overwritten
        other = moe.experts(x2, r, gu, dn)
        (dx,) = torch.autograd.grad(out, xg, torch.ones_like(out))
    xr = x.clone().double().requires_grad_()
    ref_out = experts_ref(xr, r.weights, r.expert_ids, r.dropped, gu, dn)
    (dx_ref,) = torch.autograd.grad(ref_out, xr, torch.ones_like(ref_out))
    torch.testing.assert_close(ref, ref_out.float(), rtol=1e-4, atol=1e-5)  # the first output was right
    torch.testing.assert_close(dx, dx_ref.float(), rtol=1e-4, atol=1e-5)  # h was not recycled under it
    ref_other = experts_ref(x2.double(), r.weights, r.expert_ids, r.dropped, gu, dn)
    torch.testing.assert_close(other, ref_other.float(), rtol=1e-4, atol=1e-5)
    del fourth, out, other, dx, third
    held = _cpp.cache_info()["held_bytes"]
    assert held > 0 and _cpp.empty_cache() == held and _cpp.cache_info()["held_bytes"] == 0
