"""Workspaces kept for reuse: a call's scratch buffers, already split into the views its kernels
take, handed to the next call of the same layout instead of allocated and split again.

On the host a small MoE layer's forward spends more time making tensor objects — an allocation,
then some twenty views of it, about 0.3 µs each — than launching kernels. A workspace of the same
layout from an earlier call has those views already. It is reused only when no tensor of it can
still be read:

- a call that keeps nothing takes a workspace with :func:`acquire` and gives it back with
  :func:`release` once its kernels are enqueued (on a GPU the next user's kernels run after them in
  stream order);
- a call whose outputs need it later (an autograd node's saved tensors) hands a :class:`Lease` to
  what keeps them (the node's ``ctx``): the workspace comes back when the lease is collected, i.e.
  when the node is, never while a backward can still read it.

Reuse is per device and stream (a buffer freed on one stream is not handed to another, as torch's
caching allocator does), never during CUDA graph capture (a captured graph keeps its own memory),
and only for workspaces of at most :data:`MAX_BYTES`: at large sizes the kernels' time dwarfs an
allocation, and memory held idle would not be. At most :data:`KEEP` idle workspaces are kept per
layout. Reused memory is as uninitialised as a new allocation's: kernels write before they read.

A leased workspace stays with its node for the node's life, also where saved-tensor hooks would
have let its saved tensors go earlier (activation checkpointing, offloading): at most
:data:`MAX_BYTES` per node, the size of a decode step's buffers (Qwen3-30B-A3B at 64 tokens in
bf16: 2.8 MB).
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional

import torch

#: The largest workspace (bytes) that is kept for reuse.
MAX_BYTES = 4 << 20
#: Idle workspaces kept per layout (and device, and stream); more are left to the allocator.
KEEP = 8

_idle: Dict[Hashable, List[Any]] = {}


def reuse_key(layout: Hashable, like: torch.Tensor, nbytes: int) -> Optional[Hashable]:
    """The key under which a workspace of ``layout`` (``nbytes`` in all) for a call on ``like``'s
    device may be reused now, or None when it may not (too large, CUDA graph capture, a device
    other than the CPU or a CUDA GPU)."""
    if nbytes > MAX_BYTES:
        return None
    if like.is_cpu:
        return layout
    if like.is_cuda and not torch.cuda.is_current_stream_capturing():
        index = like.get_device()
        return layout, index, _current_stream(index)
    return None


def _current_stream(index: int) -> int:
    """The current CUDA stream's handle on GPU ``index``, read as Triton's launcher reads it."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def acquire(key: Optional[Hashable]) -> Optional[Any]:
    """An idle workspace kept under ``key``, or None (none idle, or ``key`` None)."""
    idle = _idle.get(key) if key is not None else None
    if idle:
        try:
            return idle.pop()
        except IndexError:  # another thread took the last one
            pass
    return None


def release(key: Optional[Hashable], workspace: Any) -> None:
    """Keeps ``workspace`` idle under ``key`` for the next :func:`acquire` (none when ``key`` is None
    or :data:`KEEP` are idle already). The caller must no longer read or write it."""
    if key is None:
        return
    idle = _idle.get(key)
    if idle is None:
        idle = _idle.setdefault(key, [])
    if len(idle) < KEEP:
        idle.append(workspace)


class Lease:
    """Holds a workspace for whoever keeps this object (an autograd node's ``ctx``) and releases it
    (:func:`release`) when this object is collected."""

    __slots__ = ("key", "workspace")

    def __init__(self, key: Optional[Hashable], workspace: Any):
        self.key, self.workspace = key, workspace

    def __del__(self):
        try:
            release(self.key, self.workspace)
        except Exception:  # noqa: BLE001 - at interpreter exit the module's globals may be gone
            pass


def clear() -> None:
    """Drops every idle workspace (tests; or to hand their memory back to the allocator)."""
    _idle.clear()
