"""mmkernels: fused Triton kernels for the multiplicative modules of neural networks.

Public API (functional): :func:`softmax`, :func:`log_softmax`, :func:`softmin`,
:func:`softmax_backward`, :func:`bilinear`, :func:`quadratic`, :func:`cross_entropy`,
:func:`linear_cross_entropy`,
:func:`attention_module` (:func:`soft_switch`), :func:`hard_switch`, :func:`gated_fusion`,
:func:`product_unit`, :func:`sigma_pi_unit`, :func:`pi_sigma`; modules in :mod:`mmkernels.nn`; backend choice with :func:`set_backend`.
"""
from mmkernels._backend import BackendError, get_backend, set_backend, use_backend
from mmkernels.ops.attention import attention_module, hard_switch, soft_switch
from mmkernels.ops.bilinear import bilinear, quadratic
from mmkernels.ops.cross_entropy import cross_entropy
from mmkernels.ops.gating import gated_fusion
from mmkernels.ops.linear_cross_entropy import linear_cross_entropy
from mmkernels.ops.product import pi_sigma, product_unit, sigma_pi_unit
from mmkernels.ops.softmax import log_softmax, softmax, softmax_backward, softmin
from mmkernels import nn  # noqa: E402  (after the ops it wraps)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "get_backend",
    "set_backend",
    "use_backend",
    "bilinear",
    "quadratic",
    "attention_module",
    "soft_switch",
    "hard_switch",
    "cross_entropy",
    "linear_cross_entropy",
    "gated_fusion",
    "product_unit",
    "sigma_pi_unit",
    "pi_sigma",
    "softmax",
    "log_softmax",
    "softmin",
    "softmax_backward",
    "nn",
]
