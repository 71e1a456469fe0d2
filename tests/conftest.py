"""Test set-up.

On a machine without CUDA, Triton's interpreter is switched on before mmkernels is imported, so
the ``triton`` backend runs the real kernels on CPU tensors (the interpreter tier). With CUDA the
same tests run the kernels natively.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmkernels  # noqa: E402
from mmkernels._backend import interpreter_active  # noqa: E402
from mmkernels.ops._launch import named_arguments  # noqa: E402

pytest_plugins = ["mmkernels.testing.fixtures"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends(cpu_torch: bool = False):
    """(backend name, device) pairs every op test runs on. ``cpu_torch``: the CPU backend twice —
    ``cpu`` (the C++ kernels of csrc/ where an op has them and they load) and ``cpu-torch`` (the
    vectorised-torch fallback, forced by :func:`_cpu_impl`) — for the ops with C++ kernels."""
    out = [pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.cputier)]
    if cpu_torch:
        out.append(pytest.param("cpu", "cpu", id="cpu-torch", marks=pytest.mark.cputier))
    marks = [pytest.mark.interp]
    if not (torch.cuda.is_available() or interpreter_active()):
        marks.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET was set to something other than 1"))
    out.append(pytest.param("triton", DEVICE, id="triton", marks=marks))
    return out


#: For CPU tests not parametrized by backend: the C++ kernels (``cpu``) and the vectorised-torch
#: fallback (``cpu-torch``, selected by :func:`_cpu_impl` from the id); the value is unused.
CPU_IMPLS = [pytest.param("auto", id="cpu"), pytest.param("torch", id="cpu-torch")]


def backend_matrix(cases_by_backend, cpu_torch: bool = True):
    """pytest params ``(backend, device, case)``: each of :func:`backends` (``cpu_torch``: the CPU
    backend on both implementations) with the cases listed for its backend name, and its marks."""
    out = []
    for b in backends(cpu_torch=cpu_torch):
        name, device = b.values
        for case in cases_by_backend[name]:
            out.append(pytest.param(name, device, case, id=f"{b.id}-{case.id}", marks=b.marks))
    return out


@pytest.fixture(autouse=True)
def _seeded(request):
    """torch's global generator seeded by the test's id before each test: an unseeded draw is the
    same on every run, whatever ran before it on its worker (pytest-xdist deals the tests out by
    load), so a bound that a draw breaks is broken on every run, not one in many."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _reset_backend():
    mmkernels.set_backend(None)
    yield
    mmkernels.set_backend(None)


@pytest.fixture(autouse=True)
def _cpu_impl(request):
    """Tests parametrized with :func:`backends`'s ``cpu-torch`` id run the vectorised-torch CPU
    path; every other test runs the default (the C++ kernels when they load)."""
    from mmkernels import _cpp

    callspec = getattr(request.node, "callspec", None)
    impl = "torch" if callspec is not None and "cpu-torch" in callspec.id else "auto"
    with _cpp.use_cpu_impl(impl):
        yield


_COMPILED = {}


def compile_family(family: str, targets=(80, 90), yardstick: bool = False):
    """The compile tier's results for one op family (every kernel at every launch config, for
    ``targets``; ``yardstick``: with the yardstick GEMM's), compiled once per test session."""
    import time

    from mmkernels.testing import compile_tier

    key = (family, tuple(targets), yardstick)
    if key not in _COMPILED:
        t0 = time.perf_counter()
        _COMPILED[key] = compile_tier.compile_all(families=[family], targets=targets, jobs=2, progress=False,
                                                  yardstick=yardstick)
        print(f"\ncompile tier: {len(_COMPILED[key])} {family} compiles in {time.perf_counter() - t0:.1f}s")
    return _COMPILED[key]


def describe_results(results) -> str:
    """One line per compile-tier result: what failed and its resource usage."""
    return "\n".join(f"{r.label()}: {r.error or '; '.join(r.violations)} (regs={r.registers} "
                     f"local={r.local_memory})" for r in results)


def assert_compiled_clean(results, kernels, targets):
    """Every compile-tier result compiled, with no local memory / spills and no violated
    expectation, and every kernel of ``kernels`` was built for every target of ``targets``."""
    assert results
    not_compiled = [r for r in results if not r.compiled]
    assert not not_compiled, "compile failures:\n" + describe_results(not_compiled)
    spills = [r for r in results if r.local_memory != 0 or r.spill_stores != 0]
    assert not spills, "local memory / spills:\n" + describe_results(spills)
    violated = [r for r in results if r.violations]
    assert not violated, "expectations violated:\n" + describe_results(violated)
    built = {(r.kernel, r.target) for r in results}
    missing = [(k, t) for k in kernels for t in targets if (k, t) not in built]
    assert not missing, f"never compiled: {missing}"


def record_launches(monkeypatch, module, names):
    """Replace the kernels ``names`` of ``module`` by recorders: launching one appends
    ``(name, real kernel, launch kwargs)`` to the returned list and runs nothing."""
    calls = []

    class Recorder:
        def __init__(self, name, real):
            self.name, self.real, self.arg_names = name, real, real.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.name, self.real, named_arguments(self.real, args, kw)))

    for name in names:
        monkeypatch.setattr(module, name, Recorder(name, getattr(module, name)))
    return calls


_JOBS = {}


def assert_launch_is_compiled(family: str, name: str, kernel, kwargs: dict, target: int = 90):
    """The compile tier covers this launch of ``kernel`` (a real launch by the family's launchers,
    specialised by Triton's binder): a job of the same kernel at the same config (its ``BLOCK_*``
    constexprs, warps and stages), and a job of the same kernel with the same layout
    specialisation (argument types, which strides are constexpr 1) — storage dtypes and kinds are
    compiled at every config, the other variants at each kernel's largest configs (see the
    family's ``launches``)."""
    from mmkernels.families import family as lookup
    from mmkernels.testing import compile_tier as C

    if (family, target) not in _JOBS:
        _JOBS[(family, target)] = C.family_jobs(lookup(family), (target,))
    jobs = [j for j in _JOBS[(family, target)] if j.kernel == name]
    sig, cons, _, opts = C.jit_specialization(kernel, kwargs, target)

    def config(constexprs, options):
        return ({k: v for k, v in constexprs.items() if k.startswith("BLOCK")}, options.get("num_warps"),
                options.get("num_stages"))

    def layout(signature, constexprs):
        return ({k: "*" if v.startswith("*") else v for k, v in signature.items()},
                {k: v for k, v in constexprs.items() if k.startswith("s")})

    want_cfg = config(cons, opts)
    assert any(config(j.constexprs, {**opts, **j.options}) == want_cfg for j in jobs), \
        f"no compile-tier job for {name} at {want_cfg}"
    want_layout = layout(sig, cons)
    assert any(layout(j.signature, j.constexprs) == want_layout for j in jobs), \
        f"no compile-tier job for {name} with the layout {want_layout}"
    return next(j for j in jobs if config(j.constexprs, {**opts, **j.options}) == want_cfg)
