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
and only for workspaces of at most :data:`MAX_BYTES` (a decode step's buffers: Qwen3-30B-A3B at 64
tokens in bf16 takes 2.8 MB): at large sizes the kernels' time dwarfs an allocation, and memory
held idle would not be. Idle workspaces are kept up to :data:`KEEP` per layout and
:data:`MAX_IDLE_BYTES` in all; past that a released one is left to the allocator. Reused memory is
as uninitialised as a new allocation's: kernels write before they read.

A node's saved tensors may outlive the node where saved-tensor hooks hold them (activation
checkpointing's recomputation, offloading), and the node's lease would free them early: a call
under such hooks (:func:`saved_tensor_hooks_active`) does not reuse.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

#: The largest workspace (bytes) that is kept for reuse.
MAX_BYTES = 4 << 20
#: Idle workspaces kept per layout (and device, and stream); more are left to the allocator.
KEEP = 8
#: Bytes of all idle workspaces together, at most.
MAX_IDLE_BYTES = 32 << 20

_idle: Dict[Hashable, List[Tuple[Any, int]]] = {}
_idle_bytes = 0
_lock = threading.Lock()
_ids = itertools.count()
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def layout_id(layouts: Dict[Hashable, int], layout: Hashable) -> int:
    """``layout``'s number in ``layouts`` (a new one the first time, unique across threads): a
    small int to key workspaces by, cheap to hash."""
    return layouts.setdefault(layout, next(_ids))


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (``torch.autograd.graph.saved_tensors_hooks``:
    activation checkpointing, offloading); True where torch cannot say."""
    return _top_hooks is None or _top_hooks(False) is not None


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


#: The current CUDA stream's handle on a GPU by index, read as Triton's launcher reads it.
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)


def acquire(key: Optional[Hashable]) -> Optional[Any]:
    """An idle workspace kept under ``key``, or None (none idle, or ``key`` None)."""
    global _idle_bytes
    if key is None or not _idle.get(key):
        return None
    with _lock:
        idle = _idle.get(key)
        if not idle:  # another thread took the last one
            return None
        workspace, nbytes = idle.pop()
        _idle_bytes -= nbytes
    return workspace


def release(key: Optional[Hashable], workspace: Any, nbytes: int) -> None:
    """Keeps ``workspace`` (``nbytes``) idle under ``key`` for the next :func:`acquire` — unless
    ``key`` is None, :data:`KEEP` are idle under it or :data:`MAX_IDLE_BYTES` would be passed. The
    caller must no longer read or write it."""
    global _idle_bytes
    if key is None:
        return
    with _lock:
        idle = _idle.setdefault(key, [])
        if len(idle) < KEEP and _idle_bytes + nbytes <= MAX_IDLE_BYTES:
            idle.append((workspace, nbytes))
            _idle_bytes += nbytes


class Lease:
    """Holds a workspace for whoever keeps this object (an autograd node's ``ctx``) and releases it
    (:func:`release`) when this object is collected."""

    __slots__ = ("key", "workspace", "nbytes")

    def __init__(self, key: Optional[Hashable], workspace: Any, nbytes: int):
        self.key, self.workspace, self.nbytes = key, workspace, nbytes

    def __del__(self):
        try:
            release(self.key, self.workspace, self.nbytes)
        except Exception:  # noqa: BLE001 - at interpreter exit the module's globals may be gone
            pass


def clear() -> None:
    """Drops every idle workspace (tests; or to hand their memory back to the allocator)."""
    global _idle_bytes
    with _lock:
        _idle.clear()
        _idle_bytes = 0
