"""Small helpers every launcher uses, written once: sizes (:func:`next_pow2`, :func:`cdiv`), the
math dtype (:func:`math_dtype` in torch, :func:`acc_dtype` as the kernels' ``ACC`` constexpr) and
the gradients of a torch composition with their graph (:func:`graph_grads`: a double backward)."""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import torch

#: SMs of the targets the compile tier records launches for (its meta tensors have no device).
SMS_BY_ARCH = {8: 108, 9: 132}


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): tile sizes and padded widths."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``: blocks of ``b`` covering ``a``."""
    return -(-int(a) // int(b))


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for tensors stored in ``dtypes``: float64 when any is float64,
    else float32 (16-bit storage included)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@functools.lru_cache(maxsize=None)
def acc_dtype(*dtypes: torch.dtype):
    """:func:`math_dtype` as Triton's dtype: the ``ACC`` constexpr the kernels accumulate in."""
    import triton.language as tl

    return tl.float64 if math_dtype(*dtypes) == torch.float64 else tl.float32


def graph_grads(compose: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                needs: Sequence[bool], grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of ``compose(*inputs)`` (torch ops, differentiable) for ``grad_out``, with their
    graph to ``inputs`` and ``grad_out``: an autograd Function's backward under ``create_graph``,
    where its kernels (C++ or Triton, no derivative of their own) would give a gradient whose own
    gradient is silently 0. ``needs``: the Function's ``ctx.needs_input_grad`` for ``inputs``;
    one result per input, None where not needed (zeros where the output does not depend on it)."""
    wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
    got = iter(torch.autograd.grad(compose(*inputs), wanted, grad_out, create_graph=True, allow_unused=True)
               if wanted else ())
    out = []
    for t, n in zip(inputs, needs):
        if not n or t is None:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(t) if g is None else g)
    return tuple(out)


def tf32_allowed() -> bool:
    """Whether fp32 GEMMs may use TF32: torch's matmul precision setting
    (``torch.set_float32_matmul_precision``: "high" / "medium" allow it, "highest" does not)."""
    return torch.get_float32_matmul_precision() != "highest"


def dot_f32(t: torch.Tensor) -> bool:
    """Whether a kernel's ``tl.dot`` takes fp32 operands: only for bf16 under Triton's interpreter
    (CPU tensors on the Triton path), whose bf16 ``tl.dot`` returns wrong values."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def gpu_arch(t: torch.Tensor) -> Optional[int]:
    """Compute capability major of ``t``'s GPU (8: sm_80, 9: sm_90); None off CUDA."""
    if t.device.type != "cuda":
        return None
    return _cuda_arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def sm_count(t: torch.Tensor, arch: Optional[int] = None) -> int:
    """Streaming multiprocessors of ``t``'s GPU; for tensors off CUDA (the compile tier's meta
    tensors), those of compute capability major ``arch`` (default: an H100's)."""
    if t.device.type == "cuda":
        return _cuda_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return SMS_BY_ARCH.get(arch, 132)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
