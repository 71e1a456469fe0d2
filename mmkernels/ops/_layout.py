"""Shared layout helpers for the launchers: collapse a tensor around one reduced dim.

A tensor ``t`` of any rank is seen as ``(O, N, I)``: ``N`` is ``t.shape[dim]``, ``O`` the dims whose
stride (in the reference layout) is larger than the reduced dim's, ``I`` those with a smaller one.
Each group collapses to a single stride when its dims are contiguous with one another; the kernels
then take three strides per tensor and never need a transpose-and-copy.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """How the dims of one shape group into ``(O, N, I)`` around ``dim``."""

    shape: Tuple[int, ...]
    dim: int
    outer: Tuple[int, ...]  # dims collapsed into O, outermost first
    inner: Tuple[int, ...]  # dims collapsed into I, outermost first

    @property
    def N(self) -> int:
        return self.shape[self.dim]

    @property
    def O(self) -> int:  # noqa: E743 - the index-space name
        return _prod(self.shape[d] for d in self.outer)

    @property
    def I(self) -> int:  # noqa: E743
        return _prod(self.shape[d] for d in self.inner)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def plan_reduction(ref: torch.Tensor, dim: int) -> ReductionPlan:
    """Group the dims of ``ref`` (a dense tensor) around ``dim`` by its stride order."""
    shape, strides = tuple(ref.shape), ref.stride()
    others = [d for d in range(ref.dim()) if d != dim and shape[d] != 1]
    others.sort(key=lambda d: (-strides[d], d))
    if shape[dim] == 1:  # nothing to reduce: every other dim is an independent lane
        return ReductionPlan(shape, dim, (), tuple(others))
    s_dim = strides[dim]
    outer = tuple(d for d in others if strides[d] > s_dim)
    inner = tuple(d for d in others if strides[d] <= s_dim)
    return ReductionPlan(shape, dim, outer, inner)


def _group_stride(t: torch.Tensor, dims: Sequence[int]) -> Optional[int]:
    """The single stride of ``dims`` collapsed into one index, or None if they do not collapse."""
    if not dims:
        return 0
    st, sz = t.stride(), t.shape
    for a, b in zip(dims[:-1], dims[1:]):
        if st[a] != st[b] * sz[b]:
            return None
    return st[dims[-1]]


def collapsed_strides(t: torch.Tensor, plan: ReductionPlan) -> Optional[Tuple[int, int, int]]:
    """``(stride_o, stride_n, stride_i)`` of ``t`` under ``plan``, or None when a group does not
    collapse to one stride (then the caller must copy ``t`` into the reference layout)."""
    so = _group_stride(t, plan.outer)
    si = _group_stride(t, plan.inner)
    if so is None or si is None:
        return None
    return so, t.stride(plan.dim), si


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset reachable from ``t``'s data pointer."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def split_float(name: str, value: float) -> dict:
    """``value`` as two float32 kernel arguments ``{name}_hi`` + ``{name}_lo`` (Triton passes Python
    floats as float32; a float64 kernel adds the two and gets ~48 bits of ``value``)."""
    import struct

    hi = struct.unpack("f", struct.pack("f", value))[0]
    return {f"{name}_hi": hi, f"{name}_lo": value - hi}

