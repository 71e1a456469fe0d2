"""The C++ CPU kernels of ``csrc/``: built on first use, or the vectorised-torch CPU path.

``csrc/*.cpp`` register torch operators under ``torch.ops.mmkernels_cpu`` (``TORCH_LIBRARY``).
:func:`ops` builds them the first time it is asked — ``torch.utils.cpp_extension.load`` with
ninja, cached by torch in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so
later processes only load the library — and returns the namespace, or None when they cannot be
had: no compiler or ninja, no C++ sources (neither ``csrc/`` beside the package nor the installed
``mmkernels/_csrc``), a failed build, or
``MMKERNELS_CPP=0`` in the environment. Then the package warns once and every CPU op keeps its
vectorised-torch path; importing mmkernels never builds anything and never fails for this.

:func:`use_cpu_impl` picks per block (``"auto"``: C++ when available, ``"torch"``: the fallback,
``"cpp"``: C++ or an error), which is how the tests run both; :func:`status` says which is active
and why (``python -m mmkernels info``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch


def _csrc_dir() -> Path:
    """Where the sources are: ``csrc/`` beside the package directory (a checkout or editable
    install), else the installed copy ``mmkernels/_csrc`` (a wheel or sdist install: pyproject
    ships csrc/ as that package's data)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "csrc"
    return checkout if (checkout / "pool.h").is_file() else here / "_csrc"


#: The C++ sources this process builds from (see :func:`_csrc_dir`).
CSRC = _csrc_dir()
_NAME = "mmkernels_cpu"
#: The instruction-set levels of the C++ kernels by ``torch.ops.mmkernels_cpu.cpu_isa`` number
#: (csrc/vec_math.h): the vectorised loops and the router's row kernels (whose level 0 is its scalar
#: pass) run at the best the CPU has, capped by ``cpu_isa(cap)``.
CPU_ISAS = ("baseline", "AVX2", "AVX-512", "AVX-512 BF16")
_IMPLS = ("auto", "torch", "cpp")
#: Compiler flags of the build (setup.py passes the same).
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_state = {"tried": False, "ok": False, "why": "not built yet (built on first use)", "impl": "auto"}


def _sources() -> List[Path]:
    return sorted(CSRC.glob("*.cpp")) if CSRC.is_dir() else []


def _build() -> None:
    """Load the operators: the ahead-of-time library when setup.py built one, else compile
    ``csrc/`` just in time (raises on any failure)."""
    # setup.py's ahead-of-time build, unless a source changed after it
    prebuilt = sorted(Path(__file__).resolve().parent.glob("_C*.so"))
    headers = sorted(CSRC.glob("*.h")) if CSRC.is_dir() else []
    newest_src = max((p.stat().st_mtime for p in _sources() + headers), default=0.0)
    if prebuilt and prebuilt[0].stat().st_mtime >= newest_src:
        torch.ops.load_library(str(prebuilt[0]))
        _state["why"] = f"prebuilt {prebuilt[0].name}"
    else:
        _jit_build()
    if not hasattr(torch.ops, _NAME) or not hasattr(getattr(torch.ops, _NAME), "route_metadata"):
        raise RuntimeError("the library loaded but registered no mmkernels_cpu operators")


def _jit_build() -> None:
    from torch.utils.cpp_extension import load, verify_ninja_availability

    srcs = _sources()
    if not srcs:
        raise RuntimeError(f"no C++ sources at {CSRC} (an install without mmkernels/_csrc)")
    verify_ninja_availability()
    print(f"mmkernels: loading the C++ CPU kernels (built from {CSRC} with ninja on first use, then cached)...",
          file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernels would run on one thread.
    # -fno-trapping-math (as torch's own build): lets loops with float selects vectorise.
    load(name=_NAME, sources=[str(s) for s in srcs], extra_cflags=CFLAGS,
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    _state["why"] = f"built from {CSRC} with ninja"


def _gist(message: str, width: int = 300) -> str:
    """The first line saying what went wrong (a compiler ``error:``, a compiler ``not found``) when
    the message has one — a failed ninja build starts with the whole compile command — else the
    message's start."""
    errors = [line.strip() for line in message.splitlines()
              if "error:" in line or "not found" in line or "No such file" in line]
    return (errors[0] if errors else message.strip())[:width]


def load() -> bool:
    """Build / load the C++ kernels once per process; True when they are available."""
    if _state["tried"]:
        return _state["ok"]
    _state["tried"] = True
    if os.environ.get("MMKERNELS_CPP", "1") == "0":
        _state["why"] = "disabled by MMKERNELS_CPP=0"
        _sync_loaded()
        return False
    try:
        _build()
    except Exception as exc:  # noqa: BLE001 - any failure means the fallback, said once
        _state["why"] = f"build failed or no compiler: {type(exc).__name__}: {_gist(str(exc))}"
        warnings.warn(f"mmkernels: C++ CPU kernels unavailable ({_state['why']}); using the "
                      f"vectorised-torch CPU path", RuntimeWarning, stacklevel=3)
        _sync_loaded()
        return False
    _state["ok"] = True
    _sync_loaded()
    return True


class _Overloads:
    """``torch.ops.mmkernels_cpu``'s operators, each looked up once and then an attribute: the
    builtin its default ``OpOverload`` calls (``OpOverload._op``; the overload itself where a
    torch has no such attribute), the same dispatcher call a Python frame sooner. Each Python step
    counts on the CPU path, more than it costs in a tight loop: after a kernel that streams its
    tensors through the caches, the interpreter's own objects are cold (``bench/cold_call.py``: a
    small bf16 softmax backward through the overload ~6 µs slower than through its builtin, ATen's
    binding ~3 µs faster still). FakeTensor and make_fx see either alike (the overload's
    ``__call__`` only calls the builtin); Dynamo knows an ``OpOverload``, not its builtin, and
    neither has a fake kernel, so a traced call breaks the graph either way. The ops' CPU
    implementations and short ways reach them where nothing traces (behind
    :func:`mmkernels._backend.direct_call_ok` or ``cpu_path_now``); ``routing._top_k`` (through
    ``load_balancing_loss``) has no such test, and its torch way breaks a graph too (a host read
    for the tied rows)."""

    def __getattr__(self, name: str):
        overload = getattr(getattr(torch.ops, _NAME), name).default
        op = getattr(overload, "_op", overload)
        setattr(self, name, op)
        return op


_OVERLOADS = _Overloads()

#: The C++ operators when they are loaded and selected (not ``use_cpu_impl("torch")``), else
#: None: what the public functions' short CPU ways read, an attribute where :func:`ops` is a call
#: (a Python frame in front of a cold op costs several µs). Never builds: :func:`load` sets it.
loaded: Optional[_Overloads] = None


def _sync_loaded() -> None:
    global loaded
    loaded = _OVERLOADS if _state["ok"] and _state["impl"] != "torch" else None


def ops():
    """The C++ operators (``torch.ops.mmkernels_cpu``'s, see :class:`_Overloads`) when the C++
    path is selected and available, else None (``use_cpu_impl("cpp")`` without it raises)."""
    impl = _state["impl"]
    if impl == "torch":
        return None
    if _state["ok"] or load():
        return _OVERLOADS
    if impl == "cpp":
        raise RuntimeError(f"use_cpu_impl('cpp'): the C++ CPU kernels are unavailable ({_state['why']})")
    return None


@contextlib.contextmanager
def use_cpu_impl(impl: str):
    """Within the block, CPU ops run ``"cpp"`` (the C++ kernels, an error if unavailable),
    ``"torch"`` (the vectorised-torch path) or ``"auto"`` (C++ when available)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    saved = _state["impl"]
    _state["impl"] = impl
    _sync_loaded()
    try:
        yield
    finally:
        _state["impl"] = saved
        _sync_loaded()


def has_ops(names) -> bool:
    """Whether the loaded C++ library registers every operator of ``names``."""
    ns = getattr(torch.ops, _NAME) if _state["ok"] else None
    return ns is not None and all(hasattr(ns, n) for n in names)


def status(build: bool = False) -> str:
    """One line: whether the C++ kernels run and why (``build``: try the build first); which
    family uses them: :func:`mmkernels.families.cpu_paths`."""
    if build:
        load()
    if _state["ok"]:
        ns = getattr(torch.ops, _NAME)
        isa = f"{CPU_ISAS[int(ns.cpu_isa(-1))]} kernels"
        return f"C++ CPU kernels active ({_state['why']}; selection {_state['impl']!r}; {isa})"
    return f"vectorised-torch CPU path ({_state['why']})"


def cache_info() -> dict:
    """The C++ ops' tensor pool (csrc/pool.h: recycled large outputs and scratch, capped by
    ``MMKERNELS_CPU_CACHE_MB``, default 1024): bytes held, bytes free (held but unused), hits and
    misses; zeros when the C++ kernels are not loaded."""
    if not _state["ok"]:
        return {"held_bytes": 0, "free_bytes": 0, "hits": 0, "misses": 0}
    held, free, hits, misses = getattr(torch.ops, _NAME).cache_info()
    return {"held_bytes": held, "free_bytes": free, "hits": hits, "misses": misses}


def empty_cache() -> int:
    """Release the pool's unused tensors to the allocator (as ``torch.cuda.empty_cache`` does for
    CUDA); returns the bytes released."""
    return int(getattr(torch.ops, _NAME).empty_cache()) if _state["ok"] else 0


def _reset_for_tests(why: Optional[str] = None) -> None:
    """Forget the load attempt (tests simulate a missing compiler with it)."""
    _state.update(tried=False, ok=False, why=why or "not built yet (built on first use)")
    _sync_loaded()
