"""Small helpers every launcher uses, written once: sizes (:func:`next_pow2`, :func:`cdiv`) and the
math dtype (:func:`math_dtype` in torch, :func:`acc_dtype` as the kernels' ``ACC`` constexpr)."""
from __future__ import annotations

import torch


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


def acc_dtype(*dtypes: torch.dtype):
    """:func:`math_dtype` as Triton's dtype: the ``ACC`` constexpr the kernels accumulate in."""
    import triton.language as tl

    return tl.float64 if math_dtype(*dtypes) == torch.float64 else tl.float32
