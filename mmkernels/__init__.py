"""mmkernels: fused Triton kernels for the multiplicative modules of neural networks.

Public API (functional): :func:`softmax`, :func:`log_softmax`, :func:`softmin`,
:func:`softmax_backward`, :func:`bilinear`; modules in :mod:`mmkernels.nn`; backend choice with :func:`set_backend`.
"""
from mmkernels._backend import BackendError, get_backend, set_backend, use_backend
from mmkernels.ops.bilinear import bilinear
from mmkernels.ops.softmax import log_softmax, softmax, softmax_backward, softmin
from mmkernels import nn  # noqa: E402  (after the ops it wraps)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "get_backend",
    "set_backend",
    "use_backend",
    "bilinear",
    "softmax",
    "log_softmax",
    "softmin",
    "softmax_backward",
    "nn",
]
