"""Softmax family: forward and backward against the float64 references, on the CPU path and the
Triton path (interpreter on CPU, native on CUDA); properties, special values, bad input, layouts,
int64 offsets, torch.compile, gradcheck and the nn modules."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mmkernels
from mmkernels import testing as mt
from mmkernels._backend import interpreter_active
from mmkernels.ops import softmax as ops
from mmkernels.families import softmax as softmax_family
from mmkernels.ops._layout import collapsed_strides, plan_reduction
from tests.conftest import DEVICE, backends
from mmkernels.reference import FORWARD, softmax_backward_magnitude, softmax_backward_ref

FUNCS = {"softmax": mmkernels.softmax, "log_softmax": mmkernels.log_softmax, "softmin": mmkernels.softmin}
TORCH = {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "softmin": F.softmin}


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("case", mt.cases("softmax", tag="interp"), ids=lambda c: c.id)
def test_forward_backward(case, backend, device, poison_outputs):
    """y and dx against the float64 reference, in one test; the incoming gradient is not mutated."""
    # bf16 runs under the interpreter too: the kernels only load bf16 and convert (math is fp32),
    # which the interpreter gets right; bf16 *arithmetic* there is what DESIGN.md warns about.
    dim = case.params["dim"]
    inputs = mt.make_inputs(case, device, seed=zlib.crc32(case.id.encode()))  # str hash() changes per process
    x, dy = inputs["x"].requires_grad_(), inputs["dy"]
    dy_before = dy.detach().clone()

    with mmkernels.use_backend(backend):
        y = FUNCS[case.op](x, dim)
        y.backward(dy)

    assert y.dtype == case.dtype and y.shape == x.shape
    y_ref = FORWARD[case.op](x, dim)
    mt.assert_close(y, y_ref, backend=backend, what=f"{case.op} forward")
    # the backward sees the forward's (rounded) output: reference it from that y, so a float16 y's
    # rounding, amplified by the cancellation in y * (dy - Σ y·dy), is not charged to the backward
    dx_ref = softmax_backward_ref(y, dy, dim, case.op)
    assert x.grad.dtype == case.dtype and x.grad.shape == x.shape
    mt.assert_close(x.grad, dx_ref, backend=backend, what=f"{case.op} backward",
                    magnitude=softmax_backward_magnitude(y, dy, dim, case.op))
    assert torch.equal(dy, dy_before), "the incoming gradient was mutated"


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("kind", list(FUNCS))
def test_softmax_backward_functional(kind, backend, device, poison_outputs):
    """The functional backward with an expanded (zero-stride) gradient and a float16 input dtype."""
    x = torch.randn(5, 37, device=device, dtype=torch.float64)
    y = FORWARD[kind](x, 1).to(device=device, dtype=torch.float32)
    dy = torch.randn(1, 37, device=device).expand(5, 37)
    with mmkernels.use_backend(backend):
        dx = mmkernels.softmax_backward(dy, y, dim=1, kind=kind, input_dtype=torch.float16)
    assert dx.dtype == torch.float16
    mt.assert_close(dx, softmax_backward_ref(y, dy, 1, kind), backend=backend,
                    magnitude=softmax_backward_magnitude(y, dy, 1, kind))
    assert dy.stride() == (0, 1)


def test_row_lengths_cover_the_online_path():
    assert ops.MAX_FUSED_N + 1 in softmax_family.ROW_LENGTHS
    assert ops.resolve_config(ops.MAX_FUSED_N, 2, columns=False).online is False
    assert ops.resolve_config(ops.MAX_FUSED_N + 1, 2, columns=False).online is True
    assert ops.resolve_config(1100, 20, columns=True).online is True


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_million_column_row(backend, device, request):
    """One row of 2**20 + 1 columns through the online forward and the looped backward.

    The forward's normalizer is one float32 sum of 2**20 terms. csrc/ and the Triton kernel sum it
    in blocks and meet the dtype's bound; ATen's fallback (``cpu-torch``) adds each of a few vector
    lanes sequentially, so its rounding grows like sqrt(2**20 / 8) * 2**-24 ~ 2e-5 and scales every
    element of the row alike (rms error == max error; one CI draw read 4.1e-6 against the table's
    rms bound of 3e-6). That path is held to 2e-5 on both measures.
    """
    x = torch.randn(1, (1 << 20) + 1, device=device).requires_grad_()
    dy = torch.randn_like(x)
    with mmkernels.use_backend(backend):
        y = mmkernels.softmax(x, -1)
        y.backward(dy)
    aten_sum = mt.Tolerance(max_rel=2e-5, rms_rel=2e-5) if "cpu-torch" in request.node.callspec.id else None
    mt.assert_close(y, FORWARD["softmax"](x, -1), backend=backend, tol=aten_sum)
    mt.assert_close(x.grad, softmax_backward_ref(y, dy, -1, "softmax"), backend=backend,
                    magnitude=softmax_backward_magnitude(y, dy, -1, "softmax"))


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
def test_properties(backend, device, shape, data):
    """Rows sum to 1, softmax(x + c) == softmax(x), exp(log_softmax) == softmax, softmin(x) == softmax(-x)."""
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(shape, generator=gen) * 4).to(device)
    shift = torch.randn([1 if i == dim % len(shape) else s for i, s in enumerate(shape)], generator=gen).to(device) * 50
    with mmkernels.use_backend(backend):
        y = mmkernels.softmax(x, dim)
        y_shift = mmkernels.softmax(x + shift, dim)
        log_y = mmkernels.log_softmax(x, dim)
        y_min = mmkernels.softmin(x, dim)
        y_neg = mmkernels.softmax(-x, dim)
    mt.assert_close(y.sum(dim), torch.ones_like(y.sum(dim), dtype=torch.float64), backend=backend)
    # (x + shift) is rounded to fp32 before the op sees it: compare with the exact softmax of that
    # rounded input (shifts of ~50 move an fp32 input by up to ~4e-6: more than fp32's tolerance)
    mt.assert_close(y_shift, torch.softmax((x + shift).double(), dim), backend=backend)
    mt.assert_close(log_y.exp(), y, backend=backend)
    mt.assert_close(y_min, y_neg, backend=backend)


# ------------------------------------------------------------------------------------------------
# special values: NaN / ±inf propagate exactly as torch does
# ------------------------------------------------------------------------------------------------

def _special_rows(n: int) -> torch.Tensor:
    x = torch.randn(6, n)
    x[0, n // 2] = float("nan")
    x[1, :] = float("-inf")          # fully -inf row: NaN, like torch
    x[2, n // 3] = float("inf")
    x[3, : n // 2] = float("-inf")   # partly -inf: zeros there
    x[4, -1] = float("-inf")
    x[5, 0] = float("inf"); x[5, 1 % n] = float("inf")
    return x


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("n", [7, 1025, ops.MAX_FUSED_N + 3], ids=["fused", "fused-1025", "online"])
@pytest.mark.parametrize("kind", list(FUNCS))
def test_special_values_like_torch(kind, n, backend, device, poison_outputs):
    x = _special_rows(n).to(device)
    with mmkernels.use_backend(backend):
        y = FUNCS[kind](x, -1)
    expected = TORCH[kind](x, -1)
    rep = mt.error_report(y, expected)
    assert rep.special_mismatch == 0, rep.describe()
    mt.assert_close(y, expected, backend=backend, what="finite part")


@pytest.mark.parametrize("n", [1, 7, 1029, 9000], ids=lambda n: f"n{n}")
def test_cpu_forward_kernel_bfloat16_special_values(n):
    """csrc/softmax.cpp's bfloat16 forward (float math, one rounding to nearest even): values and
    the NaN / ±inf pattern of ATen's on the special rows, every kind; one thread or two give the
    same bits."""
    from mmkernels import _cpp

    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "softmax_forward"):
        pytest.fail(f"the C++ CPU kernels did not load: {_cpp.status(build=False)}")
    x = _special_rows(n).to(torch.bfloat16)
    threads = torch.get_num_threads()
    for k, kind in enumerate(("softmax", "log_softmax", "softmin")):
        y = cpp.softmax_forward(x, k)
        torch.set_num_threads(1)
        try:
            again = cpp.softmax_forward(x, k)
        finally:
            torch.set_num_threads(threads)
        assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), again.view(torch.int16))
        want = TORCH[kind](x, -1)
        rep = mt.error_report(y, want)
        assert rep.special_mismatch == 0, rep.describe()
        finite = want.isfinite()
        torch.testing.assert_close(y[finite].float(), want[finite].float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 1029, 9000], ids=lambda n: f"n{n}")
def test_cpu_backward_kernel_streamed_and_special_values(n, dtype):
    """csrc/softmax.cpp's backward: dx through non-temporal stores (blocks of 4096, rows starting
    off a 16-byte line at odd n) bitwise equal to plain stores, and as ATen's backward — values
    and NaN / ±inf pattern — on the special rows (a log-softmax argument with a positive entry too,
    whose exp is exp_np's as every other up to 88); reruns bitwise equal."""
    from mmkernels import _cpp

    cpp = _cpp.ops()
    if cpp is None or not hasattr(cpp, "softmax_backward"):
        pytest.fail(f"the C++ CPU kernels did not load: {_cpp.status(build=False)}")
    x = _special_rows(n).to(dtype)
    dy = torch.randn(6, n, dtype=dtype)
    dy[2, 0] = float("inf")
    for k, kind in enumerate(("softmax", "log_softmax", "softmin")):
        y = TORCH[kind](x, -1)
        if kind == "log_softmax":
            y[4, 0] = 3.0  # not a log-softmax output, but a legal argument
        streamed, plain = cpp.softmax_backward(y, dy, k, 1), cpp.softmax_backward(y, dy, k, 0)
        assert torch.equal(streamed.nan_to_num(), plain.nan_to_num()) and torch.equal(streamed.isnan(), plain.isnan())
        assert torch.equal(cpp.softmax_backward(y, dy, k, -1).nan_to_num(), plain.nan_to_num())
        if kind == "log_softmax":
            want = torch._log_softmax_backward_data(dy, y, -1, dtype)
        else:
            want = torch._softmax_backward_data(dy, y, -1, dtype)
            want = want.neg() if kind == "softmin" else want
        rep = mt.error_report(plain, want)
        assert rep.special_mismatch == 0, rep.describe()
        finite = want.isfinite()
        # bfloat16: float math on both sides, one rounding of dx each (ATen's may differ by an ulp)
        rtol, atol = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13), torch.bfloat16: (8e-3, 1e-5)}[dtype]
        if kind == "log_softmax":
            # dx = dy - e^y·Σdy: the two sides sum dy in different orders, and e^y (20 at y = 3)
            # scales that rounding, whose size is Σ|dy|'s: within rtol of dy and e^y·Σ|dy|
            terms = dy.double().abs() + y.double().exp() * dy.double().abs().sum(-1, keepdim=True)
            gap = (plain.double() - want.double()).abs()
            excess = (gap - atol - rtol * terms)[finite]
            assert (excess <= 0).all(), f"{kind}: gap over rtol of its terms by {excess.max().item():.3e}"
        else:
            torch.testing.assert_close(plain[finite], want[finite], rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# dtype=, 0-dim, empty, layouts without copies, int64 offsets
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("kind", list(FUNCS))
def test_dtype_argument(kind, backend, device, poison_outputs):
    x = (torch.randn(4, 50, dtype=torch.float64) * 3).to(device, torch.float16).requires_grad_()
    with mmkernels.use_backend(backend):
        y = FUNCS[kind](x, -1, dtype=torch.float32)
        assert y.dtype == torch.float32
        y.backward(torch.ones_like(y))
        yi = FUNCS[kind](torch.arange(12, device=device).reshape(3, 4), 1, dtype=torch.float64)
    assert x.grad.dtype == torch.float16
    mt.assert_close(y, FORWARD[kind](x, -1), backend=backend, dtype=torch.float32,
                    tol=mt.tolerance(backend, torch.float16), what="fp16 input computed to fp32")
    mt.assert_close(yi, FORWARD[kind](torch.arange(12.0).reshape(3, 4), 1), backend=backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
def test_scalar_and_empty(backend, device):
    with mmkernels.use_backend(backend):
        s = torch.tensor(2.5, device=device, requires_grad=True)
        y = mmkernels.softmax(s, 0)
        y.backward()
        assert y.shape == () and y.item() == 1.0 and s.grad.item() == 0.0
        assert mmkernels.log_softmax(torch.tensor(-3.0, device=device), -1).item() == 0.0
        e = torch.empty(0, 7, device=device, requires_grad=True)
        ye = mmkernels.softmax(e, 1)
        ye.sum().backward()
        assert ye.shape == (0, 7) and e.grad.shape == (0, 7)


@pytest.mark.parametrize("shape,dim,make", [
    ((8, 16), -1, lambda t: t.t()),
    ((8, 16), 0, lambda t: t.t()),
    ((4, 6, 10), 1, lambda t: t),
    ((4, 6, 10), 0, lambda t: t.permute(2, 0, 1)),
    ((2, 3, 4, 5), 2, lambda t: t.transpose(1, 3)),
    ((2, 3, 20), 1, lambda t: t[..., ::2]),
    ((1, 6), -1, lambda t: t.expand(5, 6)),
])
def test_strided_inputs_read_in_place(shape, dim, make):
    """Transposed, permuted, sliced and expanded inputs collapse to (O, N, I) strides: no copy."""
    x = make(torch.randn(shape))
    plan = plan_reduction(torch.empty_like(x), dim)
    assert collapsed_strides(x, plan) is not None


@pytest.mark.interp
@pytest.mark.parametrize("kind", list(ops.Kind))
@pytest.mark.parametrize("shape,dim", [((3, 70), -1), ((3, 70, 5), 1), ((2, ops.MAX_FUSED_N + 5), -1)])
def test_int64_offsets(kind, shape, dim, poison_outputs):
    """The int64 index path (taken when a tensor can pass 2**31 elements) gives the same results."""
    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs CUDA or the interpreter")
    x = torch.randn(shape, device=DEVICE)
    dy = torch.randn(shape, device=DEVICE)
    name = ops.Kind(kind).name.lower()
    y = ops.triton_forward(x, dim % x.dim(), kind, x.dtype, force_int64=True)
    dx = ops.triton_backward(y, dy, dim % x.dim(), kind, x.dtype, force_int64=True)
    mt.assert_close(y, FORWARD[name](x, dim), backend="triton")
    mt.assert_close(dx, softmax_backward_ref(y, dy, dim, name), backend="triton",
                    magnitude=softmax_backward_magnitude(y, dy, dim, name))


# ------------------------------------------------------------------------------------------------
# autograd, torch.compile, nn modules
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("kind", list(FUNCS))
def test_gradcheck_float64(kind, backend, device):
    x = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    xt = torch.randn(4, 5, 3, dtype=torch.float64, device=device).transpose(0, 2).requires_grad_()
    with mmkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: FUNCS[kind](t, -1), (x,))
        assert torch.autograd.gradcheck(lambda t: FUNCS[kind](t, 1), (xt,))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """The ops are torch.library custom ops with fake kernels: fullgraph compile, forward and backward."""
    backend = "triton" if (torch.cuda.is_available() or interpreter_active()) else "cpu"

    def f(x):
        return (mmkernels.log_softmax(x * 2, -1) + mmkernels.softmax(x, 0)).sum()

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with mmkernels.use_backend(backend):
        out = compiled(x)
        out.backward()
        ref = f(x2)
        ref.backward()
    mt.assert_close(out, ref.detach(), backend=backend)
    mt.assert_close(x.grad, x2.grad, backend=backend)


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@pytest.mark.parametrize("ours,theirs", [(mmkernels.nn.Softmax, torch.nn.Softmax),
                                         (mmkernels.nn.LogSoftmax, torch.nn.LogSoftmax),
                                         (mmkernels.nn.Softmin, torch.nn.Softmin)])
def test_nn_modules_drop_in(ours, theirs, backend, device):
    m, t = ours(dim=1), theirs(dim=1)
    assert isinstance(m, theirs) and repr(m) == repr(t) and m.state_dict() == t.state_dict() == {}
    x = torch.randn(3, 6, 4, device=device)
    with mmkernels.use_backend(backend):
        y = m(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y_legacy = ours()(x)
    mt.assert_close(y, t(x).double(), backend=backend)
    mt.assert_close(y_legacy, theirs(dim=0)(x).double(), backend=backend)


# ------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, never a crash
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda: mmkernels.softmax(torch.randn(3, 4), 2), ValueError, "dim=2 is out of range"),
    (lambda: mmkernels.softmax(torch.randn(3, 4), -3), ValueError, "dim=-3"),
    (lambda: mmkernels.softmax(torch.randn(()), 1), ValueError, "dim=1"),
    (lambda: mmkernels.softmax(torch.randn(3), 0.5), TypeError, "dim must be an int"),
    (lambda: mmkernels.softmax(torch.arange(4), 0), TypeError, "input must be a floating-point"),
    (lambda: mmkernels.log_softmax(torch.randn(4), 0, dtype=torch.int32), TypeError, "dtype must be one of"),
    (lambda: mmkernels.softmin([1.0, 2.0], 0), TypeError, "input must be a torch.Tensor"),
    (lambda: mmkernels.softmax(torch.randn(2, 3, dtype=torch.complex64), 1), TypeError, "input must be"),
    (lambda: mmkernels.softmax_backward(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "grad_output must have"),
    (lambda: mmkernels.softmax_backward(torch.randn(3, 4), torch.randn(3, 4), kind="relu"), ValueError, "kind"),
    (lambda: mmkernels.softmax_backward(torch.randn(3, 4, device="meta"), torch.randn(3, 4)), ValueError,
     "grad_output must be on a CPU or CUDA device"),
    (lambda: mmkernels.set_backend("gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a CPU/CUDA mismatch")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="same device"):
        mmkernels.softmax_backward(torch.randn(3, 4, device="cuda"), torch.randn(3, 4))


def test_triton_backend_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKERNELS_BACKEND"] = "triton"
    code = ("import torch, mmkernels\n"
            "try:\n    mmkernels.softmax(torch.randn(3, 4), -1)\n"
            "except mmkernels.BackendError as e:\n    print('BackendError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_backend_env_var_is_read_at_call_time(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("MMKERNELS_BACKEND", "cpu")
    assert mmkernels.get_backend() == "cpu"
    mmkernels.softmax(x)
    monkeypatch.setenv("MMKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MMKERNELS_BACKEND"):
        mmkernels.softmax(x)
    mmkernels.set_backend("cpu")  # set_backend wins over the variable
    assert mmkernels.get_backend() == "cpu"


def test_cpu_short_way_only_for_plain_untraced_cpu_calls():
    """The softmax functionals' short CPU way: plain CPU tensors recording no graph, nothing
    watching (_backend.cpu_path_now), a backend that runs the CPU path, the C++ ops when loaded and
    selected (_cpp.loaded); every other call the checked way, which gives the same result (and the
    errors: a bad dim, a bad kind, a gradient of another shape, which the C++ op refuses first)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmkernels import _backend, _cpp

    assert _backend.cpu_path_now()
    with mmkernels.use_backend("triton"):
        assert not _backend.cpu_path_now()

    class Watching(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watching():
        assert not _backend.cpu_path_now()
    if _cpp.load():
        assert _cpp.loaded is not None
        with _cpp.use_cpu_impl("torch"):
            assert _cpp.loaded is None
        assert _cpp.loaded is not None
    x = torch.randn(4, 6)
    y = mmkernels.softmax(x, dim=0)
    mt.assert_same_bits(y, ops.softmax(x.clone().requires_grad_(True), dim=0).detach(), "short vs checked")
    dy = torch.randn(4, 6)
    dx = mmkernels.softmax_backward(dy, y, 0)
    mt.assert_same_bits(dx, ops.softmax_backward(dy, y.clone().requires_grad_(True), 0).detach(), "short vs checked")
    with pytest.raises(ValueError):
        mmkernels.softmax(x, dim=2)
    with pytest.raises(ValueError):
        mmkernels.softmax_backward(dy, y, 0, kind="softmaxx")
    for impl in ("auto", "torch"):
        with _cpp.use_cpu_impl(impl), pytest.raises(ValueError, match="grad_output must have output's shape"):
            mmkernels.softmax_backward(torch.randn(4, 5), y, -1)


@st.composite
def _strided_tensors(draw):
    """A float32 tensor of 1-4 dims in a random memory layout: permuted storage, a stepped slice,
    an expanded (zero-stride) dim; and a dim to reduce over."""
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    perm = draw(st.permutations(range(ndim)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    storage_shape = [shape[p] for p in perm]
    step_dim = draw(st.integers(0, ndim - 1))
    step = draw(st.integers(1, 3))
    storage_shape[step_dim] *= step
    base = torch.randn(storage_shape, generator=gen) * 3
    base = base.narrow(step_dim, 0, storage_shape[step_dim])[(slice(None),) * step_dim + (slice(None, None, step),)]
    inv = [perm.index(d) for d in range(ndim)]
    x = base.permute(inv)
    expand_dim = draw(st.sampled_from([None] + list(range(ndim))))
    if expand_dim is not None:
        x = x.narrow(expand_dim, 0, 1).expand(x.shape)
    return x, draw(st.integers(-ndim, ndim - 1))


@pytest.mark.parametrize("backend,device", backends(cpu_torch=True))
@settings(max_examples=60, deadline=None)
@given(data=_strided_tensors(), kind=st.sampled_from(list(FUNCS)), grad_layout=st.sampled_from(["same", "t", "expanded"]))
def test_random_layouts(backend, device, data, kind, grad_layout):
    """Forward and backward on random strided layouts of input and gradient match the reference."""
    x, dim = data
    x = x.to(device).requires_grad_()
    dy = torch.randn(x.shape).to(device)
    if grad_layout == "t" and dy.dim() > 1:
        dy = dy.transpose(0, -1).contiguous().transpose(0, -1)
    elif grad_layout == "expanded" and dy.dim() > 1:
        keep = dim % dy.dim()
        other = next(d for d in range(dy.dim()) if d != keep)
        dy = dy.narrow(other, 0, 1).expand(dy.shape)
    with mt.poison_allocations(), mmkernels.use_backend(backend):
        y = FUNCS[kind](x, dim)
        y.backward(dy)
    mt.assert_close(y, FORWARD[kind](x, dim), backend=backend, what=f"{kind} forward")
    mt.assert_close(x.grad, softmax_backward_ref(y, dy, dim, kind), backend=backend, what=f"{kind} backward",
                    magnitude=softmax_backward_magnitude(y, dy, dim, kind))


def test_tracers_and_fake_tensors_see_the_custom_ops():
    """Eager calls skip the torch.library dispatch; FakeTensor and make_fx still go through the ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        y = mmkernels.log_softmax(torch.randn(3, 5), 0)
        dx = mmkernels.softmax_backward(torch.randn(3, 5), torch.randn(3, 5), 1)
    assert type(y).__name__ == "FakeTensor" and y.shape == (3, 5) and dx.shape == (3, 5)
    gm = make_fx(lambda t: mmkernels.softmax(t, -1))(torch.randn(2, 4))
    assert "mmkernels.softmax_fwd" in gm.code


_ONLINE = ops.SoftmaxConfig(1, 64, 1, online=True)


@pytest.mark.interp
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("n,config,offset", [(1, None, 1), (3, None, 3), (13, None, 0), (13, None, 1), (1001, None, 3),
                                             (203, _ONLINE, 1), (203, _ONLINE, 2)],
                         ids=["n1", "n3", "n13-offset0", "n13-offset1", "n1001-offset3", "online-offset1",
                              "online-offset2"])
@pytest.mark.parametrize("kind", list(ops.Kind))
def test_odd_rows_split_into_head_aligned_body_and_tail(kind, offset, n, config, dtype, out_dtype, poison_outputs):
    """Rows whose stride is no multiple of 16 bytes go through the kernels' head / aligned body /
    tail split (ALIGN > 1): forward and backward equal the float64 reference for every row start
    modulo 16 bytes (7 rows of odd length, storage offsets 0, 1, 3), a head longer than the row
    (n = 1, 3), mixed storage and output dtypes, the one-pass and the looped kernels (the split
    kernels' odd rows: test_few_long_rows_split_along_the_row)."""
    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs CUDA or the interpreter")
    gen = torch.Generator().manual_seed(n * 7 + offset)
    flat = torch.randn(7 * n + offset, generator=gen, dtype=torch.float64).mul_(4).to(device=DEVICE, dtype=dtype)
    x = flat[offset:].view(7, n)
    y = ops.triton_forward(x, 1, kind, out_dtype, config=config, splits=1)  # the looped kernels, not split
    dy = torch.randn(7, n, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=out_dtype)
    dx = ops.triton_backward(y, dy, 1, kind, dtype, config=config, splits=1)
    rows = ((0, 1, n), (0, 1, n))  # (o, n, i) strides of x and y as the launchers see rows
    assert ops.row_align(False, (x, y), rows) == 16 // min(x.element_size(), y.element_size())
    ref = FORWARD[kind.name.lower()](x, 1)
    mt.assert_close(y, ref, backend="triton", dtype=out_dtype, what=f"{kind.name} forward")
    want = softmax_backward_ref(y, dy, 1, kind.name.lower())
    mt.assert_close(dx, want, backend="triton", dtype=dtype,
                    magnitude=softmax_backward_magnitude(y, dy, 1, kind.name.lower()), what=f"{kind.name} backward")


@pytest.mark.interp
@pytest.mark.parametrize("n,dtype,splits", [(701, torch.float32, 7), (700, torch.bfloat16, 3),
                                            (701, torch.float16, 2)], ids=["odd-fp32-7", "aligned-bf16-3", "odd-fp16-2"])
@pytest.mark.parametrize("kind", list(ops.Kind))
def test_few_long_rows_split_along_the_row(kind, n, dtype, splits, poison_outputs):
    """Rows split over several programs (partials, then a combine in every program): forward and
    backward equal the float64 reference, with a row of -inf (NaN, as torch) and a row holding
    +inf; the split count is rounded to whole loop tiles (7 requested -> 6 slices of 128)."""
    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs CUDA or the interpreter")
    cfg = ops.SoftmaxConfig(1, 128, 1, online=True)
    gen = torch.Generator().manual_seed(n + splits)
    x = torch.randn(5, n, generator=gen, dtype=torch.float64).mul_(4).to(device=DEVICE, dtype=dtype)
    x[1] = float("-inf")
    x[3, n // 2] = float("inf")
    y = ops.triton_forward(x, 1, kind, dtype, config=cfg, splits=splits)
    dy = torch.randn(5, n, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    dx = ops.triton_backward(y, dy, 1, kind, dtype, config=cfg, splits=splits)
    name = kind.name.lower()
    mt.assert_close(y, FORWARD[name](x, 1), backend="triton", what=f"{name} forward")
    mt.assert_close(dx, softmax_backward_ref(y, dy, 1, name), backend="triton",
                    magnitude=softmax_backward_magnitude(y, dy, 1, name), what=f"{name} backward")
    assert ops.row_splits(cfg, False, n, 5, 132) > 1 and ops.row_splits(cfg, False, n, 200, 132) == 1


def test_split_resolver_fills_the_machine_for_few_long_rows():
    cfg = ops.resolve_config(1 << 20, 64, False)
    assert cfg.online and ops.row_splits(cfg, False, 1 << 20, 64, 132) == 5  # 320 programs: two waves
    assert ops.row_splits(cfg, False, 1 << 20, 8192, 132) == 1
    assert ops.row_splits(ops.resolve_config(4096, 64, False), False, 4096, 64, 132) == 1  # one-pass rows
    assert ops.row_splits(ops.resolve_config(1 << 20, 64, False, True), False, 1 << 20, 64, 132, f64=True) == 1
