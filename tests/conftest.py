"""Test set-up.

On a machine without CUDA, Triton's interpreter is switched on before mmkernels is imported, so
the ``triton`` backend runs the real kernels on CPU tensors (the interpreter tier). With CUDA the
same tests run the kernels natively.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmkernels  # noqa: E402
from mmkernels._backend import interpreter_active  # noqa: E402

pytest_plugins = ["mmkernels.testing.fixtures"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends():
    """(backend name, device) pairs every op test runs on."""
    out = [pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.cputier)]
    marks = [pytest.mark.interp]
    if not (torch.cuda.is_available() or interpreter_active()):
        marks.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET was set to something other than 1"))
    out.append(pytest.param("triton", DEVICE, id="triton", marks=marks))
    return out


@pytest.fixture(autouse=True)
def _reset_backend():
    mmkernels.set_backend(None)
    yield
    mmkernels.set_backend(None)
