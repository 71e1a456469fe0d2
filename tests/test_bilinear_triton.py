"""Sigma-pi / bilinear family, Triton side: the launchers of ``mmkernels.ops.bilinear``
against a float64 einsum reference (interpreter tier on CPU, natively on CUDA), and the compile
tier for the family's kernels.

fp32, fp16, bf16 and fp64 storage (bf16 under the interpreter with fp32 dot operands, DOT_F32).

Outputs the launchers allocate are poisoned with NaN, so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch

from mmkernels.ops import bilinear as BT
from mmkernels.reference import bilinear_grads_ref, bilinear_magnitudes, bilinear_ref
from mmkernels.testing.asserts import assert_close
from mmkernels.testing.poison import poison_allocations
from tests.conftest import assert_compiled_clean, assert_launch_is_compiled, compile_family, record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"


def _reference(z, x, w, bias, dy):
    """float64 (y, dz, dx, dw) of y = bilinear(z, x, w, bias), for the output gradient dy."""
    return (bilinear_ref(z, x, w, bias),) + bilinear_grads_ref(z, x, w, dy)[:3]


def _magnitudes(z, x, w, dy):
    """Σ of |terms| for each output (its rounding scale, for results that cancel)."""
    return bilinear_magnitudes(z, x, w, dy)[:4]


def _inputs(N, b, c, d, dtype, layout, bias, seed=0):
    """(z, x, w, bias, dy) on DEVICE in ``dtype``; ``layout="strided"``: z transposed, x a
    column slice, w permuted (no stride of w is 1 along c), dy transposed."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    if layout == "contiguous":
        z, x, w, dy = r(N, b), r(N, c), r(d, b, c), r(N, d)
    else:
        z = r(b, N).t()                       # (N, b), stride (1, N)
        x = r(N, 2 * c + 1)[:, 1::2]          # (N, c), stride (2c+1, 2)
        w = r(c, d, b).permute(1, 2, 0)       # (d, b, c), stride (b, 1, d*b)
        dy = r(d, N).t()
    bvec = r(d) if bias else None
    return z, x, w, bvec, dy


def _check(N, b, c, d, dtype, layout, bias, need=(True, True, True), seed=0):
    z, x, w, bvec, dy = _inputs(N, b, c, d, dtype, layout, bias, seed)
    ry, rdz, rdx, rdw = _reference(z, x, w, bvec, dy)
    my, mdz, mdx, mdw = _magnitudes(z, x, w, dy)
    if bvec is not None:
        my = my + bvec.abs().to("cpu", torch.float64)
    with poison_allocations():
        y = BT.bilinear_forward_triton(z, x, w, bvec)
        dz, dx, dw = BT.bilinear_backward_triton(z, x, w, dy, *need)
    assert y.shape == (N, d) and y.dtype == dtype
    assert_close(y, ry, backend=BACKEND, magnitude=my, what="y")
    for name, got, want, mag, wanted, shape in (("dz", dz, rdz, mdz, need[0], (N, b)),
                                                ("dx", dx, rdx, mdx, need[1], (N, c)),
                                                ("dw", dw, rdw, mdw, need[2], (d, b, c))):
        if not wanted:
            assert got is None, name
            continue
        assert got.shape == shape and got.dtype == dtype, (name, got.shape, got.dtype)
        assert_close(got, want, backend=BACKEND, magnitude=mag, what=name)


# (N, b, c, d): sizes 1, primes, non-multiples of 16; c > 16 takes the dz/dx kernel's several
# i-blocks (dz partial planes) under the interpreter's 16-wide tiles; the interpreter's launches
# fill a 4-SM "device", so the small N split h (forward, dz/dx) and the larger N split n (dW)
_SHAPES = [
    (1, 1, 1, 1),
    (5, 3, 5, 7),
    (33, 17, 13, 11),
    (33, 2, 37, 3),
    (5, 1, 20, 17),
]
_CASES = [
    pytest.param(*shape, dtype, layout, bias, id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{layout}-"
                 f"{'bias' if bias else 'nobias'}")
    for shape, dtype, layout, bias in [
        (_SHAPES[0], torch.float32, "contiguous", True),
        (_SHAPES[0], torch.float16, "strided", False),
        (_SHAPES[1], torch.float32, "contiguous", False),
        (_SHAPES[1], torch.float32, "strided", True),
        (_SHAPES[1], torch.float16, "contiguous", True),
        (_SHAPES[2], torch.float32, "contiguous", True),
        (_SHAPES[2], torch.float16, "strided", True),
        (_SHAPES[3], torch.float32, "strided", False),
        (_SHAPES[3], torch.float16, "contiguous", False),
        (_SHAPES[4], torch.float32, "strided", True),
        (_SHAPES[4], torch.float16, "contiguous", True),
        # bf16: under the interpreter the launchers feed tl.dot fp32 operands (DOT_F32)
        (_SHAPES[2], torch.bfloat16, "strided", True),
        (_SHAPES[3], torch.bfloat16, "contiguous", False),
        (_SHAPES[2], torch.float64, "strided", True),   # fp64 math throughout (ACC)
    ]
]


@pytest.mark.interp
@pytest.mark.parametrize("N, b, c, d, dtype, layout, bias", _CASES)
def test_forward_and_backward_match_reference(N, b, c, d, dtype, layout, bias):
    _check(N, b, c, d, dtype, layout, bias)


@pytest.mark.interp
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True)], ids=["dz", "dx", "dw", "dz+dw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_subsets(need, dtype):
    _check(5, 3, 19, 7, dtype, "strided", False, need=need)


@pytest.mark.interp
def test_int64_indexing(monkeypatch):
    """The USE_INT64 code paths (taken for tensors past 2**31 elements) give the same results."""
    monkeypatch.setattr(BT, "_needs_int64", lambda *t: True)
    _check(5, 3, 19, 7, torch.float32, "strided", True)
    _check(5, 3, 5, 7, torch.float16, "contiguous", False)


@pytest.mark.interp
def test_dw_only_from_a_larger_n_loop():
    """N spanning several n-blocks of the dW kernel (and several forward / dz-dx programs)."""
    _check(50, 4, 6, 5, torch.float32, "contiguous", True, seed=3)


@pytest.mark.interp
@pytest.mark.parametrize("N, b, c, d", [(0, 3, 4, 5), (4, 3, 4, 0), (0, 3, 4, 0)])
def test_empty(N, b, c, d):
    z, x, w, bvec, dy = _inputs(N, b, c, d, torch.float32, "contiguous", True)
    with poison_allocations():
        y = BT.bilinear_forward_triton(z, x, w, bvec)
        dz, dx, dw = BT.bilinear_backward_triton(z, x, w, dy)
    assert y.shape == (N, d)
    assert dz.shape == (N, b) and dx.shape == (N, c) and dw.shape == (d, b, c)
    for t in (dz, dx, dw):
        assert torch.equal(t, torch.zeros_like(t))


def test_validation():
    z, x, w = torch.randn(4, 3), torch.randn(4, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="weight"):
        BT.bilinear_forward_triton(z, x, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="x must be"):
        BT.bilinear_forward_triton(z, torch.randn(3, 5), w)
    with pytest.raises(ValueError, match="bias"):
        BT.bilinear_forward_triton(z, x, w, torch.randn(3))
    with pytest.raises(TypeError, match="share a dtype"):
        BT.bilinear_forward_triton(z.double().float().half(), x, w)
    with pytest.raises(ValueError, match="dy"):
        BT.bilinear_backward_triton(z, x, w, torch.randn(4, 3))


def test_resolver_configs_are_valid():
    """Every GPU config: power-of-two blocks, dot dims >= 16; on tensor cores the wgmma's M (the
    forward's and dz/dx's rows, dW's d) >= 64; every arch the resolver knows."""
    seen = list(BT.launch_configs())
    assert {k for k, *_ in seen} == {"bilinear_fwd_kernel", "bilinear_bwd_dzdx_kernel", "bilinear_bwd_dw_kernel"}
    assert {a for _, _, _, a, _ in seen} == set(BT.ARCHS)
    assert {al for *_, al in seen} == {True, False}
    for kernel, cfg, dclass, arch, aligned in seen:
        assert dclass in BT.DTYPE_CLASSES
        for v in (getattr(cfg, f) for f in cfg.__dataclass_fields__ if f.startswith("block_")):
            assert v & (v - 1) == 0 and v >= 16, cfg  # powers of two, tl.dot's dims at least 16
        if dclass in ("16bit", "tf32"):
            assert (cfg.block_d if kernel == "bilinear_bwd_dw_kernel" else cfg.block_n) >= 64, cfg
    assert BT.resolve_configs(8192, 256, 256, 256, "16bit", 9, aligned=False) != \
        BT.resolve_configs(8192, 256, 256, 256, "16bit", 9, aligned=True)


# ----------------------------------------------------------------------------------------------
# Compile tier: every bilinear kernel at every launch config, sm_80 and sm_90
# ----------------------------------------------------------------------------------------------


COMPILE_TARGETS = (80, 90)


def _label(cfg) -> str:
    """A config's compile-tier label: its tile constexprs in the kernel's order."""
    return " ".join(f"{f.upper()}={getattr(cfg, f)}" for f in cfg.__dataclass_fields__ if f.startswith("block_"))


_GEMMS = ("bilinear_fwd_kernel", "bilinear_bwd_dzdx_kernel", "bilinear_bwd_dw_kernel")


@pytest.fixture(scope="module")
def bilinear_results():
    return compile_family("bilinear", COMPILE_TARGETS, yardstick=True)


@pytest.mark.compile
def test_bilinear_compiles_without_local_memory(bilinear_results):
    from mmkernels.testing import compile_tier as C

    assert_compiled_clean(bilinear_results, _GEMMS + ("bilinear_sum_planes_kernel",), COMPILE_TARGETS)
    assert C.summary(bilinear_results)[0] == 0


@pytest.mark.compile
def test_bilinear_tensor_cores_on_both_targets(bilinear_results):
    """Every bf16 / fp16 / TF32 build of the three GEMM-shaped kernels has HGMMA (wgmma) on sm_90
    and HMMA (mma.sync) on sm_80 (sm_90's also in EXPECTATIONS); the IEEE fp32 and the fp64
    builds run on FMA units."""
    lines, missing = [], []
    for r in bilinear_results:
        if r.kernel not in _GEMMS or not r.compiled:
            continue
        want = "HGMMA" if r.target == 90 else "HMMA"
        tc = not r.variant.endswith(("ieee", "fp64"))
        lines.append(f"{r.kernel} [{r.config}] [{r.variant}] sm_{r.target}: {','.join(r.mma) or 'no MMA'}")
        if tc and want not in r.mma:
            missing.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert any(r.variant.startswith("bf16") and "HGMMA" in r.mma for r in bilinear_results)
    assert not missing, "tensor-core builds without tensor-core instructions:\n" + "\n".join(missing)


@pytest.mark.compile
def test_main_loops_reach_two_thirds_of_the_yardstick_gemm(bilinear_results):
    """At the bf16 tiles the resolver picks for N = 8192, b = c = d = 256 on sm_90, each kernel's
    main loop does at least 2/3 of the yardstick GEMM's MMA FLOPs per instruction (the compile
    tier's static measure of how GEMM-like a loop is); the figures of every tensor-core config
    are printed."""
    from mmkernels.testing import compile_tier as C

    yard = [r for r in bilinear_results if r.kernel == "yardstick_gemm" and r.target == 90]
    assert len(yard) == 1 and yard[0].main_loop, yard
    bar = 2 / 3 * C.main_loop_merit(yard[0].main_loop)
    cfgs = BT.resolve_configs(8192, 256, 256, 256, "16bit", 9, aligned=True)
    lines = [f"yardstick_gemm: {C.main_loop_merit(yard[0].main_loop):.0f} MMA FLOPs / loop instruction"]
    for r in sorted(bilinear_results, key=lambda r: (r.kernel, r.config)):
        if r.target == 90 and r.variant == "bf16" and r.main_loop:
            lines.append(f"{r.kernel} [{r.config}]: {C.main_loop_merit(r.main_loop):.0f}")
    print("\n" + "\n".join(lines))
    for kernel, cfg in (("bilinear_fwd_kernel", cfgs.fwd), ("bilinear_bwd_dzdx_kernel", cfgs.dzdx),
                        ("bilinear_bwd_dw_kernel", cfgs.dw)):
        hits = [r for r in bilinear_results if r.kernel == kernel and r.target == 90 and r.variant == "bf16"
                and r.config.startswith(_label(cfg) + " ")]
        assert len(hits) == 1, (kernel, cfg, [r.config for r in bilinear_results if r.kernel == kernel])
        merit = C.main_loop_merit(hits[0].main_loop)
        assert merit is not None and merit >= bar, f"{kernel} [{hits[0].config}]: {merit} < 2/3 yardstick {bar:.0f}"


_LAUNCHES = [  # (N, b, c, d, dtype, allow_tf32): aligned contiguous launches, one per dtype class
    (64, 16, 32, 128, "bfloat16", False),
    (128, 16, 128, 64, "float16", False),   # c > 64: several i-blocks (MULTI_I, fp32 dzacc)
    (64, 16, 32, 128, "float32", True),
    (64, 16, 32, 128, "float32", False),
    (64, 16, 128, 128, "float64", False),  # MULTI_I with an fp64 accumulator
]


@pytest.mark.compile
@pytest.mark.parametrize("N, b, c, d, dtype, tf32", _LAUNCHES)
def test_job_signatures_match_real_launches(monkeypatch, N, b, c, d, dtype, tf32):
    """The launchers' real launches (kernels replaced by recorders, CPU tensors, GPU configs),
    specialised by Triton's own binder, are what the compile tier compiles: same argument types
    (strides of 1 as constexpr 1), constexprs and warps, at a config launch_configs() yields."""
    from mmkernels._triton import bilinear as K

    calls = record_launches(monkeypatch, K, ("bilinear_fwd_kernel", "bilinear_bwd_dzdx_kernel", "bilinear_bwd_dw_kernel"))
    monkeypatch.setattr(BT, "dot_f32", lambda t: False)  # as on CUDA (CPU bf16 sets it)
    dt = getattr(torch, dtype)
    z, x, w, bvec, dy = (torch.randn(N, b).to(dt), torch.randn(N, c).to(dt), torch.randn(d, b, c).to(dt),
                         torch.randn(d).to(dt), torch.randn(N, d).to(dt))
    dclass = BT.dtype_class(dt, tf32)
    cfgs = BT.resolve_configs(N, b, c, d, dclass)
    previous = torch.backends.cuda.matmul.allow_tf32  # a property: not monkeypatch-able
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        BT.bilinear_forward_triton(z, x, w, bvec, config=cfgs.fwd)
        BT.bilinear_backward_triton(z, x, w, dy, configs=cfgs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert [n for n, _, _ in calls] == ["bilinear_fwd_kernel", "bilinear_bwd_dzdx_kernel",
                                        "bilinear_bwd_dw_kernel"]
    configs = set(BT.launch_configs())
    monkeypatch.undo()  # the real kernels back: the compile tier records the family's own launches
    for (name, real, kw), cfg in zip(calls, (cfgs.fwd, cfgs.dzdx, cfgs.dw)):
        assert (name, cfg, dclass, 9, True) in configs  # (CPU tensors: sm_90's tiles)
        assert kw["PRECISION"] == ("tf32" if dclass == "tf32" else "ieee")
        assert (kw["num_warps"], kw["num_stages"]) == (cfg.num_warps, cfg.num_stages)
        assert_launch_is_compiled("bilinear", name, real, kw)


@pytest.mark.interp
@pytest.mark.parametrize("dclass, dtype, aligned", [("16bit", torch.float16, True), ("tf32", torch.float32, True),
                                                    ("ieee", torch.float32, True), ("fp64", torch.float64, True),
                                                    ("16bit", torch.bfloat16, False), ("tf32", torch.float32, False)])
def test_gpu_configs_under_the_interpreter(dclass, dtype, aligned):
    """The resolver's GPU tiles (not the interpreter's 16-wide ones) give the same results: one
    small shape per dtype class, c past the dz/dx kernel's i-block so that dz has a partial per
    i-block (its planes summed after); the tiles for operands that are not 16-byte aligned too."""
    N, b, c, d = 9, 2, 131, 70
    z, x, w, bvec, dy = _inputs(N, b, c, d, dtype, "strided", True, seed=5)
    cfgs = BT.resolve_configs(N, b, c, d, dclass, 9, aligned=aligned)
    assert cfgs.dzdx.block_i < c
    ry, rdz, rdx, rdw = _reference(z, x, w, bvec, dy)
    my, mdz, mdx, mdw = _magnitudes(z, x, w, dy)
    with poison_allocations():
        y = BT.bilinear_forward_triton(z, x, w, bvec, config=cfgs.fwd)
        dz, dx, dw = BT.bilinear_backward_triton(z, x, w, dy, configs=cfgs)
    for name, got, want, mag in (("y", y, ry, my + bvec.abs().double()), ("dz", dz, rdz, mdz),
                                 ("dx", dx, rdx, mdx), ("dw", dw, rdw, mdw)):
        assert_close(got, want, backend=BACKEND, magnitude=mag, what=name)


def test_splits_fill_whole_waves():
    """Split reductions where the output tiles leave SMs idle, as many ways as fit in one wave."""
    assert BT.splits(64, 256, 1, 132) == (2, 128)       # N = 8192 forward: 128 programs, not 192
    assert BT.splits(2, 256, 1, 132) == (64, 4)         # N = 64: 128 programs (the cap)
    assert BT.splits(200, 256, 1, 132) == (1, 256)      # already past a wave
    assert BT.splits(4, 1000, 256, 132) == (4, 256)     # rows in whole steps: at most 4 splits
    assert BT.splits(8, 3, 1, 132) == (3, 1)            # no more splits than steps


def test_operands_aligned():
    a = torch.empty(4, 32)
    assert BT.operands_aligned(a, torch.empty(2, 3, 32))
    assert not BT.operands_aligned(torch.empty(4, 33))            # size not a multiple of 16
    assert not BT.operands_aligned(torch.empty(32, 4).t())        # no unit stride along the last dim
    assert not BT.operands_aligned(torch.empty(4 * 32 + 1)[1:].view(4, 32))  # odd start
    assert not BT.operands_aligned(a, triangular=True)


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_explicit_splits_match_reference_and_rerun_bitwise(dtype):
    """h split three ways (forward, dz/dx), n three ways (dW), d in two j-chunks: the partial
    planes summed in order give the reference and the same bits on every run."""
    N, b, c, d = 40, 7, 20, 21
    z, x, w, bvec, dy = _inputs(N, b, c, d, dtype, "contiguous", True, seed=7)
    ry, rdz, rdx, rdw = _reference(z, x, w, bvec, dy)
    my, mdz, mdx, mdw = _magnitudes(z, x, w, dy)
    runs = []
    for _ in range(2):
        with poison_allocations():
            y = BT.bilinear_forward_triton(z, x, w, bvec, h_splits=3)
            grads = BT.bilinear_backward_triton(z, x, w, dy, h_splits=3, n_splits=3)
        runs.append((y,) + grads)
    for name, got, want, mag in zip(("y", "dz", "dx", "dw"), runs[0], (ry, rdz, rdx, rdw),
                                    (my + bvec.abs().double(), mdz, mdx, mdw)):
        assert_close(got, want, backend=BACKEND, magnitude=mag, what=name)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def _packed(full: torch.Tensor) -> torch.Tensor:
    """(d, c, c) -> the packed upper triangle (d, c(c+1)/2) in torch.triu_indices order."""
    r, s = torch.triu_indices(full.shape[1], full.shape[2])
    return full[:, r, s]


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3], ids=["unsplit", "split"])
def test_triangular_weight(dtype, splits):
    """The quadratic layer's packed weight (z = x): y, the two halves of the input gradient and
    the packed dW against the bilinear reference on the weight's full (d, c, c) form."""
    N, c, d = 21, 19, 6
    g = torch.Generator().manual_seed(8)
    x = torch.randn(N, c, generator=g).to(DEVICE, dtype)
    full = torch.triu(torch.randn(d, c, c, generator=g)).to(DEVICE, dtype)
    wp, dy, bvec = _packed(full), torch.randn(N, d, generator=g).to(DEVICE, dtype), torch.randn(d).to(DEVICE, dtype)
    ry, rdz, rdx, rdw = _reference(x, x, full, bvec, dy)
    my, mdz, mdx, mdw = _magnitudes(x, x, full, dy)
    with poison_allocations():
        y = BT.bilinear_forward_triton(x, x, wp, bvec, triangular=True, h_splits=splits)
        dz, dx, dwp = BT.bilinear_backward_triton(x, x, wp, dy, triangular=True, h_splits=splits, n_splits=splits)
    assert dwp.shape == wp.shape
    for name, got, want, mag in (("y", y, ry, my + bvec.abs().double()), ("dz", dz, rdz, mdz),
                                 ("dx", dx, rdx, mdx), ("dw", dwp, _packed(rdw), _packed(mdw))):
        assert_close(got, want, backend=BACKEND, magnitude=mag, what=name)


@pytest.mark.interp
@pytest.mark.parametrize("precision, expected", [("highest", "ieee"), ("high", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(monkeypatch, precision, expected):
    """fp32 dots are TF32 exactly when torch's matmul precision allows it (its tolerance-table
    entry ``triton-tf32``: the interpreter computes them in fp32, a GPU with 10-bit operands)."""
    from mmkernels._triton import bilinear as K

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        z, x, w, bvec, dy = _inputs(9, 3, 5, 4, torch.float32, "contiguous", True, seed=9)
        y = BT.bilinear_forward_triton(z, x, w, bvec)
        assert_close(y, bilinear_ref(z, x, w, bvec), backend="triton" if expected == "ieee" else "triton-tf32",
                     magnitude=_magnitudes(z, x, w, dy)[0] + bvec.abs().double(), what="y")
        calls = record_launches(monkeypatch, K, ("bilinear_fwd_kernel", "bilinear_bwd_dzdx_kernel",
                                                 "bilinear_bwd_dw_kernel"))
        BT.bilinear_forward_triton(z, x, w, bvec)
        BT.bilinear_backward_triton(z, x, w, dy)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert [kw["PRECISION"] for _, _, kw in calls] == [expected] * 3
