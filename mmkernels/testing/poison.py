"""Fill every output the package allocates with NaN, so unwritten elements show up in tests.

Patches ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty``; only allocations whose
caller is a module of ``mmkernels`` (not ``mmkernels.testing``) are poisoned. Integer tensors are
filled with their dtype's minimum.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch


def _from_package(depth: int = 2) -> bool:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name.startswith("mmkernels") and not name.startswith("mmkernels.testing")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0 or t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return t
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


@contextlib.contextmanager
def poison_allocations() -> Iterator[None]:
    """Within the block, tensors that ``mmkernels`` allocates start as NaN (or the int minimum)."""
    orig_empty, orig_like, orig_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        return _poison(t) if _from_package() else t

    def empty_like(*args, **kwargs):
        t = orig_like(*args, **kwargs)
        return _poison(t) if _from_package() else t

    def new_empty(self, *args, **kwargs):
        t = orig_new(self, *args, **kwargs)
        return _poison(t) if _from_package() else t

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = orig_empty, orig_like, orig_new
