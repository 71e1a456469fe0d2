"""Backend dispatch: the one place that decides which implementation runs.

| tensors | backend `auto` (default) | `triton`                                   | `cpu`        |
|---------|--------------------------|--------------------------------------------|--------------|
| CUDA    | Triton kernels           | Triton kernels                             | error        |
| CPU     | CPU path                 | Triton interpreter (needs TRITON_INTERPRET=1 before import) | CPU path |

The choice is read at call time: ``mmkernels.set_backend(name)`` wins over the environment
variable ``MMKERNELS_BACKEND``; ``set_backend(None)`` goes back to the variable.
"""
from __future__ import annotations

import contextlib
import functools
import enum
import os
import types
from typing import Iterator, List, Optional, Union

import torch

BACKENDS = ("auto", "triton", "cpu")
ENV_VAR = "MMKERNELS_BACKEND"

_override: Optional[str] = None


class Impl(enum.Enum):
    """What actually runs for one call."""

    TRITON = "triton"  # Triton kernels on CUDA tensors, or under the interpreter on CPU tensors
    CPU = "cpu"  # the CPU path (C++ extension where built, else vectorised torch)


class BackendError(RuntimeError):
    """The requested backend cannot run these tensors (e.g. `triton` on CPU without the interpreter)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Select the backend for later calls: ``"auto"``, ``"triton"``, ``"cpu"``, or ``None`` to use
    the ``MMKERNELS_BACKEND`` environment variable again."""
    global _override
    _override = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend in force now (``set_backend`` first, then ``MMKERNELS_BACKEND``, else ``auto``)."""
    if _override is not None:
        return _override
    if _ENV_KEY is None:
        return _env_backend(os.environ.get(ENV_VAR, "auto"))
    raw = _ENV_DATA.get(_ENV_KEY)
    return "auto" if raw is None else _env_backend(os.environ.decodevalue(raw))


#: ``os.environ``'s own dict and our variable's key in it (CPython keeps the mapping's contents
#: there, in step with every change made through ``os.environ``): one dict read, where
#: ``os.environ.get`` of an unset variable raises and catches two KeyErrors. That costs little in
#: a tight loop but 20 µs a call cold — after a kernel that streamed its tensors through the
#: caches — against 1 µs for the dict read (``bench/cold_call.py``'s setting: a 19 µs op, +20
#: and +1 µs). Where the mapping has no such dict (another Python), ``os.environ.get``.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = (os.environ.encodekey(ENV_VAR) if isinstance(_ENV_DATA, dict) and hasattr(os.environ, "encodekey")
            else None)


@functools.lru_cache(maxsize=16)
def _env_backend(raw: str) -> str:
    """The backend that ``MMKERNELS_BACKEND=raw`` names (read at every call, parsed once per value)."""
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def kernel_names(module) -> List[str]:
    """The public ``@triton.jit`` kernels of a kernel module (helpers start with ``_``), jitted or
    interpreted (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return sorted(n for n, v in vars(module).items()
                  if isinstance(v, (JITFunction, InterpretedFunction)) and not n.startswith("_"))


@functools.lru_cache(maxsize=None)
def interpreter_active() -> bool:
    """True when Triton's interpreter was on at import time of the kernels (TRITON_INTERPRET=1);
    decided once, at the first call (it cannot change afterwards)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from mmkernels._triton import softmax as _k
    except ImportError:
        return False
    # the decision is made when @triton.jit runs, i.e. at import of the kernel modules
    return any(isinstance(v, InterpretedFunction) for v in vars(_k).values())


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(where: Union[torch.device, torch.Tensor]) -> Impl:
    """Decide which implementation runs for tensors on a device under the current backend:
    ``where`` is that device or a tensor on it (read from the tensor's ``is_cuda`` / ``is_cpu``: no
    ``torch.device`` and no string made, half a microsecond of every op call)."""
    backend = get_backend()
    if type(where) is torch.device:
        kind = where.type  # a new str per read
    else:
        kind = "cuda" if where.is_cuda else "cpu" if where.is_cpu else where.device.type
    if kind == "cuda":
        if backend == "cpu":
            raise BackendError(
                "backend 'cpu' cannot run CUDA tensors; use set_backend('auto') or move the tensors to CPU"
            )
        if not triton_available():
            raise BackendError("CUDA tensors need triton, which is not installed")
        return Impl.TRITON
    if kind == "cpu":
        if backend != "triton":
            return Impl.CPU
        if not triton_available():
            raise BackendError("backend 'triton' needs triton, which is not installed")
        if not interpreter_active():
            raise BackendError(
                "backend 'triton' on CPU tensors runs the kernels in Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before mmkernels is imported"
            )
        return Impl.TRITON
    raise BackendError(f"mmkernels supports CPU and CUDA tensors, got device "
                       f"{where if type(where) is torch.device else where.device}")


#: What :func:`_nothing_watching` asks, bound once (each attribute lookup counts on a cold call).
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
#: Where ``torch.compiler.is_compiling`` reads its session flag (a torch without one: its
#: ``is_compiling``, bound above, is the whole test).
_compiler = torch.compiler if hasattr(torch.compiler, "_is_compiling_flag") else types.SimpleNamespace(
    _is_compiling_flag=False)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def _nothing_watching() -> bool:
    """No torch.compile / export tracing, no dispatch or torch-function mode active.

    The tracing test is ``torch.compiler.is_compiling()`` without its TorchScript test (no
    mmkernels op is scripted): Dynamo folds ``is_dynamo_compiling()`` to True in what it traces,
    and the flag is set for the rest of a compile or export session. A Python frame fewer
    (``is_compiling`` calls ``torch.jit.is_scripting``): a cold call, after a kernel that streamed
    its tensors through the caches, paid ~7 µs for the two (``bench/cold_call.py``)."""
    return not (_is_dynamo_compiling() or _compiler._is_compiling_flag or _dispatch_modes() or _function_modes())


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """True when nothing can be watching this call — no torch.compile / export tracing, no
    dispatch or torch-function mode, no tensor subclass (FakeTensor, FunctionalTensor, ...). Then
    an op's autograd wrapper may call its implementation directly and skip the torch.library
    dispatch (about 13 µs a call on CPU); otherwise it must go through the custom op, so tracers
    see one op with its fake kernel."""
    if not _nothing_watching():
        return False
    for t in tensors:  # a loop, not all(<generator>): this runs on every call of every op
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True


def cpu_path_now() -> bool:
    """Nothing watching (as :func:`direct_call_ok`) and the backend in force runs the CPU path for
    CPU tensors (not ``triton``): what a public function's short CPU way asks beyond its tensors
    (plain CPU ``torch.Tensor`` s recording no graph), which it checks inline."""
    if not _nothing_watching():
        return False
    if _override is None and _ENV_KEY is not None and _ENV_DATA.get(_ENV_KEY) is None:  # the default, auto
        return True
    return get_backend() != "triton"
