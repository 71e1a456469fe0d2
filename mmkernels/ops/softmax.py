"""Softmax family: softmax, log-softmax and softmin, forward and fused backward.

Order in this file: config resolver -> launchers -> torch.library ops -> autograd.Function ->
public functionals. Kernels live in ``triton_kernels/softmax.py`` (``mmkernels._triton.softmax``).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS as _FLOATS
from mmkernels.ops._checks import check_dim as _check_dim
from mmkernels.ops._checks import check_float_dtype as _check_float_dtype
from mmkernels.ops._checks import check_tensor as _check_tensor
from mmkernels.ops._layout import (
    INT32_LIMIT,
    ReductionPlan,
    collapsed_strides,
    max_offset,
    plan_reduction,
)
from mmkernels.ops._util import acc_dtype, cdiv, math_dtype, next_pow2, sm_count

_Tensor = torch.Tensor  # the short CPU way's exact-type check, bound once


class Kind(enum.IntEnum):
    SOFTMAX = 0
    LOG_SOFTMAX = 1
    SOFTMIN = 2


# ----------------------------------------------------------------------------------------------
# Config resolver (heuristic; configs are data, one resolver for the family)
# ----------------------------------------------------------------------------------------------

#: Longest reduced dim handled by the one-pass kernels (whole row on chip); longer rows take the
#: online path (two reads of x forward; two reads of y and dy backward).
MAX_FUSED_N = 16384
#: Largest tile (elements) a one-pass program holds on chip.
MAX_TILE = 16384
#: Tile size the small-row configs aim for (several rows per program).
TARGET_TILE = 4096
#: Tile of the online / looped kernels (elements per loop step).
LOOP_TILE = 4096
#: Lanes along a contiguous non-reduced dim (``I``) when the reduced dim is strided.
COLUMN_BLOCK_I = (64, 32, 16)


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    """Launch configuration of one softmax-family kernel."""

    block_i: int
    block_n: int
    num_warps: int
    online: bool  # True: looped kernels (rows longer than the on-chip limit)

    @property
    def tile(self) -> int:
        return self.block_i * self.block_n


def _warps(tile: int, f64: bool = False) -> int:
    # ~16 fp32 (8 fp64) values per thread, between 1 and 16 warps
    return max(1, min(16, tile * (2 if f64 else 1) // 512))


def resolve_config(N: int, I: int, columns: bool, f64: bool = False) -> SoftmaxConfig:
    """Pick the tile for a reduction of length ``N`` over ``I`` independent lanes.

    ``columns`` is True when the non-reduced lanes (``I``) are the contiguous axis in memory and
    the reduced dim is strided; False for ordinary rows (reduced dim contiguous). ``f64``: the
    math runs in float64 (twice the registers per element), so the tile sizes are halved — the
    compile tier showed fp64 spilling at 16384-element backward tiles and 2048-element forward tiles.
    """
    N, I = max(int(N), 1), max(int(I), 1)
    shrink = 2 if f64 else 1
    max_tile, max_fused_n, target_tile = MAX_TILE // shrink, MAX_FUSED_N // shrink, TARGET_TILE // shrink
    if not columns:
        if N <= max_fused_n:
            # the row count does not shrink the tile: fewer rows than it holds means one program
            # for the whole tensor either way, and one config per row length means one JIT
            # compile per row length, not one per (row length, row count)
            bn = next_pow2(N)
            bi = max(1, target_tile // bn)
            return SoftmaxConfig(bi, bn, _warps(bi * bn, f64), online=False)
        return SoftmaxConfig(1, LOOP_TILE, _warps(LOOP_TILE, f64), online=True)
    bn = next_pow2(N)
    for bi in COLUMN_BLOCK_I:
        bi = min(bi, next_pow2(I))
        if bi * bn <= max_tile:
            bi = max(bi, min(next_pow2(I), target_tile // bn))  # short reductions: more lanes per program
            return SoftmaxConfig(bi, bn, _warps(bi * bn, f64), online=False)
    bi = min(COLUMN_BLOCK_I[0], next_pow2(I))
    return SoftmaxConfig(bi, max(1, LOOP_TILE // bi), _warps(LOOP_TILE, f64), online=True)


def launch_configs():
    """Every ``(config, layout, f64)`` :func:`resolve_config` can return, for the compile tier;
    ``layout`` is ``"rows"`` or ``"columns"``. The resolver only distinguishes lengths by their
    power-of-two ceiling and the fused limits, so scanning powers of two (and one past each limit)
    finds them all."""
    lengths = sorted({1 << k for k in range(0, 22)}
                     | {3, 17, 1000, MAX_FUSED_N // 2 + 1, MAX_FUSED_N + 1, 3 * MAX_FUSED_N})
    seen = set()
    for f64 in (False, True):
        for columns in (False, True):
            for n in lengths:
                for i in lengths:
                    if columns and (n < 2 or i < 2):  # size-1 dims are dropped: no such launch
                        continue
                    key = (resolve_config(n, i, columns, f64), "columns" if columns else "rows", f64)
                    if key not in seen:
                        seen.add(key)
                        yield key


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _in_layout(t: torch.Tensor, ref: torch.Tensor, plan: ReductionPlan) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``t`` with its collapsed strides; copied into ``ref``'s layout only when its non-reduced dims
    do not collapse to one stride per group (e.g. a slice taken across two merged dims)."""
    strides = collapsed_strides(t, plan)
    if strides is None:
        t = torch.empty_like(ref, dtype=t.dtype).copy_(t)
        strides = collapsed_strides(t, plan)
    return t, strides


def _index_space(plan: ReductionPlan, *strides3):
    """(N, I, lanes-are-columns, per-tensor (so, sn, si), O) for the kernels; folds O into I for rows."""
    O, N, I = plan.O, plan.N, plan.I
    columns = bool(plan.inner) and N > 1
    if not plan.inner:  # rows: one program takes several rows; the rows become the I axis
        strides3 = tuple((0, sn, so) for so, sn, _ in strides3)
        O, I = 1, O
    return O, N, I, columns, strides3


def _needs_int64(cfg: SoftmaxConfig, tensors, strides3) -> bool:
    for t, (so, sn, si) in zip(tensors, strides3):
        if max_offset(t) + cfg.block_i * abs(si) + cfg.block_n * abs(sn) >= INT32_LIMIT:
            return True
    return False


def row_align(columns: bool, tensors, strides3) -> int:
    """The kernels' ``ALIGN``: for rows whose stride is not a multiple of 16 bytes (an odd length),
    16 bytes in elements of the narrowest dtype, so that each row's body is loaded and stored in
    aligned 128-bit vectors between a short head and tail; 1 (no split) for columns, for rows
    already aligned by their stride, and when the tensors' rows differ in stride."""
    if columns or any(sn != 1 for _, sn, _ in strides3) or len({si for _, _, si in strides3}) != 1:
        return 1
    align = 16 // min(t.element_size() for t in tensors)
    return 1 if strides3[0][2] % align == 0 else align


#: Most programs one row's work is split over (their partials are combined in one tile).
MAX_SPLITS = 64


def row_splits(cfg: SoftmaxConfig, columns: bool, N: int, I: int, sms: int, f64: bool = False) -> int:
    """Programs per row block for few long rows: the looped configs on rows, when the row blocks
    are fewer than ``sms`` (one wave), are split along the row until about two waves of programs
    run (at most MAX_SPLITS, each at least one loop tile); 1 otherwise, and for float64 math (the
    split output kernel spills at the float64 looped tile: those rows keep the looped kernels)."""
    blocks = cdiv(I, cfg.block_i)
    if columns or f64 or not cfg.online or blocks >= sms:
        return 1
    return max(1, min(MAX_SPLITS, cdiv(2 * sms, blocks), cdiv(N, cfg.block_n)))


def _split_launch(splits: int, N: int, cfg: SoftmaxConfig) -> Tuple[int, int]:
    """(splits, slice): slices of whole loop tiles covering N (fewer splits when they round up)."""
    slice_ = cdiv(cdiv(N, splits), cfg.block_n) * cfg.block_n
    return cdiv(N, slice_), slice_


def _sms(t: torch.Tensor) -> int:
    """SMs a launch should fill: the GPU's; an H100's for the compile tier's meta tensors and the
    interpreter's CPU tensors (so that their few-row launches take the split kernels as on a GPU)."""
    return sm_count(t, 9)


def triton_forward(x: torch.Tensor, dim: int, kind: Kind, out_dtype: torch.dtype,
                    force_int64: bool = False, config: Optional[SoftmaxConfig] = None,
                    splits: Optional[int] = None) -> torch.Tensor:
    """Launch the forward kernels; ``config`` overrides the resolver, ``splits`` the programs per
    row block of the looped configs (:func:`row_splits`; tests, config exploration)."""
    import triton.language as tl

    from mmkernels._triton import softmax as K

    y = torch.empty_like(x, dtype=out_dtype)
    plan = plan_reduction(y, dim)
    x, sx = _in_layout(x, y, plan)
    sy = collapsed_strides(y, plan)
    O, N, I, columns, (sx, sy) = _index_space(plan, sx, sy)
    acc = acc_dtype(x.dtype, out_dtype)
    cfg = config or resolve_config(N, I, columns, f64=acc == tl.float64)
    align = row_align(columns, (x, y), (sx, sy))
    int64 = force_int64 or _needs_int64(cfg, (x, y), (sx, sy))
    strides = dict(sx_o=sx[0], sx_n=sx[1], sx_i=sx[2], sy_o=sy[0], sy_n=sy[1], sy_i=sy[2])
    flags = dict(LOG=kind == Kind.LOG_SOFTMAX, NEG=kind == Kind.SOFTMIN, ACC=acc, ALIGN=align, USE_INT64=int64)
    splits = row_splits(cfg, columns, N, I, _sms(x), acc == tl.float64) if splits is None else splits
    if splits > 1:
        splits, slice_ = _split_launch(splits, N, cfg)
        part = torch.empty((I, splits, 2), dtype=math_dtype(x.dtype, out_dtype), device=x.device)
        grid = (cdiv(I, cfg.block_i) * splits,)
        K.softmax_split_partials_kernel[grid](
            a_ptr=x, b_ptr=x, part_ptr=part, N=N, I=I, SLICE=slice_, SPLITS=splits,
            sa_o=sx[0], sa_n=sx[1], sa_i=sx[2], sb_o=sx[0], sb_n=sx[1], sb_i=sx[2],
            BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, MODE=0, NEG=flags["NEG"], ACC=acc, ALIGN=align,
            USE_INT64=int64, num_warps=cfg.num_warps,
        )
        K.softmax_split_fwd_out_kernel[grid](
            x_ptr=x, y_ptr=y, part_ptr=part, N=N, I=I, SLICE=slice_, SPLITS=splits, **strides,
            BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, SPLITS_PAD=next_pow2(splits), **flags,
            num_warps=cfg.num_warps,
        )
        return y
    kernel = K.softmax_fwd_online_kernel if cfg.online else K.softmax_fwd_fused_kernel
    grid = (O * cdiv(I, cfg.block_i),)
    kernel[grid](x_ptr=x, y_ptr=y, N=N, I=I, **strides, BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, **flags,
                 num_warps=cfg.num_warps)
    return y


def triton_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: Kind, in_dtype: torch.dtype,
                     force_int64: bool = False, config: Optional[SoftmaxConfig] = None,
                     splits: Optional[int] = None) -> torch.Tensor:
    """Launch the backward kernels; ``config`` and ``splits`` as for :func:`triton_forward`."""
    import triton.language as tl

    from mmkernels._triton import softmax as K

    dx = torch.empty_like(y, dtype=in_dtype)
    plan = plan_reduction(dx, dim)
    y, sy = _in_layout(y, dx, plan)
    dy, sdy = _in_layout(dy, dx, plan)
    sdx = collapsed_strides(dx, plan)
    O, N, I, columns, (sy, sdy, sdx) = _index_space(plan, sy, sdy, sdx)
    acc = acc_dtype(y.dtype, dy.dtype, in_dtype)
    cfg = config or resolve_config(N, I, columns, f64=acc == tl.float64)
    align = row_align(columns, (y, dy, dx), (sy, sdy, sdx))
    int64 = force_int64 or _needs_int64(cfg, (y, dy, dx), (sy, sdy, sdx))
    strides = dict(sy_o=sy[0], sy_n=sy[1], sy_i=sy[2], sdy_o=sdy[0], sdy_n=sdy[1], sdy_i=sdy[2],
                   sdx_o=sdx[0], sdx_n=sdx[1], sdx_i=sdx[2])
    flags = dict(KIND=int(kind), ACC=acc, ALIGN=align, USE_INT64=int64)
    splits = row_splits(cfg, columns, N, I, _sms(y), acc == tl.float64) if splits is None else splits
    if splits > 1:
        splits, slice_ = _split_launch(splits, N, cfg)
        part = torch.empty((I, splits), dtype=math_dtype(y.dtype, dy.dtype, in_dtype), device=y.device)
        grid = (cdiv(I, cfg.block_i) * splits,)
        K.softmax_split_partials_kernel[grid](
            a_ptr=y, b_ptr=dy, part_ptr=part, N=N, I=I, SLICE=slice_, SPLITS=splits,
            sa_o=sy[0], sa_n=sy[1], sa_i=sy[2], sb_o=sdy[0], sb_n=sdy[1], sb_i=sdy[2],
            BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, MODE=1 if kind == Kind.LOG_SOFTMAX else 2, NEG=False,
            ACC=acc, ALIGN=align, USE_INT64=int64, num_warps=cfg.num_warps,
        )
        K.softmax_split_bwd_out_kernel[grid](
            y_ptr=y, dy_ptr=dy, dx_ptr=dx, part_ptr=part, N=N, I=I, SLICE=slice_, SPLITS=splits, **strides,
            BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, SPLITS_PAD=next_pow2(splits), **flags,
            num_warps=cfg.num_warps,
        )
        return dx
    kernel = K.softmax_bwd_looped_kernel if cfg.online else K.softmax_bwd_fused_kernel
    grid = (O * cdiv(I, cfg.block_i),)
    kernel[grid](y_ptr=y, dy_ptr=dy, dx_ptr=dx, N=N, I=I, **strides, BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n,
                 **flags, num_warps=cfg.num_warps)
    return dx


def _same_layout(result: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The CPU path's result in the layout the op promises (that of ``empty_like(like)``)."""
    if like.is_contiguous() and result.is_contiguous():  # what empty_like of a contiguous tensor is
        return result
    promised = torch.empty_like(like, dtype=dtype, device="meta").stride()  # no allocation
    if result.stride() == promised:
        return result
    return torch.empty_like(like, dtype=dtype).copy_(result)


#: The dtypes csrc/softmax.cpp takes, along the last dim and along another (its column kernels):
#: bfloat16 in float math (along a middle dim 1.5-5.4x ATen's bfloat16 forward, 1.3-1.6x its
#: backward, Zen 4 VM: bench/NOTES.md). Not float64: its exp is std::exp one element at a time, and
#: against ATen's vectorised kernels (2 threads, 4M elements) the C++ forward read 0.62-0.72x,
#: the log-softmax backward 0.69-0.73x, the softmax backward 0.90-1.08x (bench/NOTES.md); the op
#: still takes float64 when called itself.
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _cpp_takes(x: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """csrc/softmax.cpp's case: a contiguous float32 / bfloat16 tensor (along any dim), the result
    in its dtype — measured faster than ATen's there. Other dtypes and layouts measured slower in
    C++ (see that file and :data:`_CPP_DTYPES`), so they run ATen's."""
    return x.is_contiguous() and out_dtype == x.dtype and x.dtype in _CPP_DTYPES


def _cpu_forward(x: torch.Tensor, dim: int, kind: Kind, out_dtype: torch.dtype) -> torch.Tensor:
    """The C++ kernel (csrc/softmax.cpp) where :func:`_cpp_takes` (rows along the last dim, its
    column kernels along another); ATen's otherwise."""
    cpp = _cpp.ops()
    if cpp is not None and _cpp_takes(x, out_dtype):
        return cpp.softmax_forward(x, int(kind), dim)
    if kind == Kind.SOFTMAX:
        y = torch.softmax(x, dim, dtype=out_dtype)
    elif kind == Kind.LOG_SOFTMAX:
        y = torch.log_softmax(x, dim, dtype=out_dtype)
    else:
        y = torch.nn.functional.softmin(x, dim, dtype=out_dtype)
    return _same_layout(y, x, out_dtype)


def _cpu_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: Kind,
                  in_dtype: torch.dtype) -> torch.Tensor:
    """The C++ op (csrc/softmax.cpp) where :func:`_cpp_takes` (``dy`` contiguous, of ``y``'s
    dtype, ``dx`` in it); ATen's otherwise."""
    cpp = _cpp.ops()
    y_dtype = y.dtype
    if cpp is not None and _cpp_takes(y, in_dtype) and dy.dtype == y_dtype and dy.is_contiguous():
        return cpp.softmax_backward(y, dy, int(kind), -1, dim)
    # ATen's CPU kernels compute in y's dtype (no mixed half->float backward on CPU); cast after.
    # (Each call skipped here counts: after a kernel that streams its tensors through the caches,
    # a microsecond of Python in a tight loop costs several.)
    if dy.dtype != y_dtype:
        dy = dy.to(y_dtype)
    if kind == Kind.LOG_SOFTMAX:
        dx = torch._log_softmax_backward_data(dy, y, dim, y_dtype)
    elif kind == Kind.SOFTMAX:
        dx = torch._softmax_backward_data(dy, y, dim, y_dtype)
    else:
        dx = torch._softmax_backward_data(dy, y, dim, y_dtype).neg_()
    if in_dtype != y_dtype:
        dx = dx.to(in_dtype)
    return _same_layout(dx, y, in_dtype)


def _forward(x: torch.Tensor, dim: int, kind: Kind, out_dtype: torch.dtype) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, dtype=out_dtype)
    if _backend.resolve(x) is _backend.Impl.TRITON:
        return triton_forward(x, dim, kind, out_dtype)
    return _cpu_forward(x, dim, kind, out_dtype)


def _backward(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: Kind,
              in_dtype: torch.dtype) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty_like(y, dtype=in_dtype)
    if _backend.resolve(y) is _backend.Impl.TRITON:
        return triton_backward(y, dy, dim, kind, in_dtype)
    return _cpu_backward(y, dy, dim, kind, in_dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops (so that torch.compile(fullgraph=True) traces them)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::softmax_fwd", mutates_args=())
def softmax_fwd_op(x: torch.Tensor, dim: int, kind: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y = softmax / log_softmax / softmin of ``x`` along ``dim`` (``kind`` 0 / 1 / 2), in ``out_dtype``."""
    return _forward(x, dim, Kind(kind), out_dtype)


@softmax_fwd_op.register_fake
def _(x, dim, kind, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


@torch.library.custom_op("mmkernels::softmax_bwd", mutates_args=())
def softmax_bwd_op(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: int,
                   in_dtype: torch.dtype) -> torch.Tensor:
    """dx of the softmax-family op ``kind`` from its output ``y`` and incoming gradient ``dy``."""
    return _backward(y, dy, dim, Kind(kind), in_dtype)


@softmax_bwd_op.register_fake
def _(y, dy, dim, kind, in_dtype):
    return torch.empty_like(y, dtype=in_dtype)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _differentiable_backward(y: torch.Tensor, dy: torch.Tensor, dim: int, kind: Kind,
                             in_dtype: torch.dtype) -> torch.Tensor:
    """dx as torch ops of ``y`` and ``dy`` in the math dtype (float32; float64 for float64), so that
    it has a graph to both: the backward under ``create_graph`` (the kernels have no derivative of
    their own). Softmax ``y·(dy - Σ y·dy)``, softmin its negative, log-softmax ``dy - exp(y)·Σ dy``."""
    md = math_dtype(y.dtype)
    yf, gf = y.to(md), dy.to(md)
    if kind == Kind.LOG_SOFTMAX:
        dx = gf - torch.exp(yf) * gf.sum(dim, keepdim=True)
    else:
        dx = yf * (gf - (yf * gf).sum(dim, keepdim=True))
        if kind == Kind.SOFTMIN:
            dx = -dx
    return dx.to(in_dtype)


class SoftmaxFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves only ``y``; backward is one fused kernel (read y, dy; write
    dx), or torch ops under ``create_graph`` (:func:`_differentiable_backward`: a gradient of the
    gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, kind: int, out_dtype: torch.dtype) -> torch.Tensor:
        if _backend.direct_call_ok(x):
            y = _forward(x, dim, Kind(kind), out_dtype)
        else:
            y = softmax_fwd_op(x, dim, kind, out_dtype)
        ctx.save_for_backward(y)
        ctx.dim, ctx.kind, ctx.in_dtype = dim, kind, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: y has a graph to x (through this Function)
            return _differentiable_backward(y, dy, ctx.dim, Kind(ctx.kind), ctx.in_dtype), None, None, None
        if _backend.direct_call_ok(y, dy):
            dx = _backward(y, dy, ctx.dim, Kind(ctx.kind), ctx.in_dtype)
        else:
            dx = softmax_bwd_op(y, dy, ctx.dim, ctx.kind, ctx.in_dtype)
        return dx, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functionals
# ----------------------------------------------------------------------------------------------

# The public functions' short CPU way (the top of _apply and of softmax_backward): the common call
# — plain CPU tensors of a float dtype, the result in it, a dim in range, no graph, nothing
# watching (_backend.cpu_path_now) — goes straight to the C++ op (or ATen's kernel where that
# runs: _cpu_forward / _cpu_backward), without the checked way's layers; every other call (and
# every bad one: its errors) takes the checked way. Its checks inline, in the function the public
# call enters (_cpp_takes's among them): after a kernel that streamed its tensors through the
# caches, each Python frame and attribute read in front of the next one is a cache miss or several
# (bench/cold_call.py; bench/NOTES.md). The backward's shapes are not compared first where the C++
# op compares them itself: a call it refuses takes the checked way, which says what is wrong.


def _apply(input: torch.Tensor, dim: int, dtype: Optional[torch.dtype], kind: Kind) -> torch.Tensor:
    if dtype is None and type(input) is _Tensor and type(dim) is int and input.is_cpu and not input.requires_grad:
        nd, xd = input.dim(), input.dtype
        if -nd <= dim < nd and xd in _FLOATS and _backend.cpu_path_now():  # the short CPU way
            dim %= nd
            cpp = _cpp.loaded  # else _cpu_* (ATen's, or the first call: builds them)
            if cpp is not None and input.is_contiguous() and xd in _CPP_DTYPES:
                return cpp.softmax_forward(input, int(kind), dim)
            return _cpu_forward(input, dim, kind, xd)
    _check_tensor("input", input)
    d = _check_dim(dim, input.dim())
    if dtype is None:
        if input.dtype not in _FLOATS:
            raise TypeError(
                f"input must be a floating-point tensor (float16, bfloat16, float32, float64), got "
                f"{input.dtype}; pass dtype= to compute in a floating type"
            )
        out_dtype = input.dtype
    else:
        out_dtype = _check_float_dtype("dtype", dtype)
        if input.dtype not in _FLOATS:  # integer input: cast first, as torch does
            input = input.to(out_dtype)
    if input.dim() == 0:
        return SoftmaxFunction.apply(input.reshape(1), 0, int(kind), out_dtype).reshape(())
    if not input.requires_grad and _backend.direct_call_ok(input):  # no graph to record: no Function
        return _forward(input, d, kind, out_dtype)
    return SoftmaxFunction.apply(input, d, int(kind), out_dtype)


def softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""Softmax along ``dim``: ``y = exp(x - max x) / Σ exp(x - max x)``, like ``torch.softmax``.

    Args:
        input: tensor of any shape ``(*)`` (0-dim and empty included), float16 / bfloat16 /
            float32 / float64, on CPU or CUDA, with any strides (transposed, sliced, expanded).
        dim: the dim to normalise over, negative allowed.
        dtype: output dtype; the math runs in float32 (float64 for float64) whatever the storage.
            An integer ``input`` is cast to ``dtype`` first.

    Returns:
        Tensor of ``input``'s shape, dtype ``dtype or input.dtype``, laid out like
        ``torch.empty_like(input)``. A row of only ``-inf`` gives NaN, as in torch; NaN and
        ``+inf`` propagate as in torch.

    Backward is one fused kernel (reads ``y`` and the incoming gradient once, writes ``dx``).
    On CUDA the Triton kernels run; on CPU the CPU path (see :mod:`mmkernels._backend`).
    The kernels read strided tensors in place; a tensor is copied only when its non-reduced dims
    cannot be collapsed to one stride on each side of ``dim`` (e.g. a slice across merged dims).

    Example:
        >>> x = torch.randn(8, 1000)
        >>> y = mmkernels.softmax(x, dim=-1)
        >>> torch.allclose(y.sum(-1), torch.ones(8))
        True
    """
    return _apply(input, dim, dtype, Kind.SOFTMAX)


def log_softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""Log-softmax along ``dim``: ``y = x - max x - log Σ exp(x - max x)``, like ``torch.log_softmax``.

    Shapes, dtypes, layouts and special values as in :func:`softmax`.

    Example:
        >>> y = mmkernels.log_softmax(torch.randn(4, 10), dim=1)   # (4, 10)
    """
    return _apply(input, dim, dtype, Kind.LOG_SOFTMAX)


def softmin(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""Softmin along ``dim``: ``softmax(-x)``, like ``torch.nn.functional.softmin``.

    Shapes, dtypes, layouts and special values as in :func:`softmax`.

    Example:
        >>> w = mmkernels.softmin(torch.randn(2, 3, 5), dim=0)   # (2, 3, 5), sums to 1 over dim 0
    """
    return _apply(input, dim, dtype, Kind.SOFTMIN)


_KINDS = {"softmax": Kind.SOFTMAX, "log_softmax": Kind.LOG_SOFTMAX, "softmin": Kind.SOFTMIN}


def softmax_backward(grad_output: torch.Tensor, output: torch.Tensor, dim: int = -1,
                     kind: str = "softmax", input_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""Gradient of a softmax-family op from its ``output`` (no autograd graph needed).

    ``softmax``: ``dx = y * (dy - Σ y·dy)``; ``log_softmax``: ``dx = dy - exp(y) · Σ dy``;
    ``softmin``: ``dx = y * (Σ y·dy - dy)``, sums along ``dim``.

    Args:
        grad_output: ``dy``, same shape as ``output``, any strides (expanded zero-stride gradients
            are read in place and never written).
        output: ``y``, the forward result, shape ``(*)``.
        dim: the dim the forward normalised over.
        kind: ``"softmax"``, ``"log_softmax"`` or ``"softmin"``.
        input_dtype: dtype of the returned ``dx`` (the forward input's dtype); default ``output.dtype``.

    Returns:
        ``dx`` with ``output``'s shape.
    """
    y, dy = output, grad_output
    if (type(y) is _Tensor and type(dy) is _Tensor and type(dim) is int and type(kind) is str and y.is_cpu
            and dy.is_cpu and not (y.requires_grad or dy.requires_grad)):  # the short CPU way
        nd, yd = y.dim(), y.dtype
        k = _KINDS.get(kind)
        if (k is not None and -nd <= dim < nd and dy.dtype is yd and yd in _FLOATS
                and (input_dtype is None or input_dtype is yd) and _backend.cpu_path_now()):
            d = dim % nd
            cpp = _cpp.loaded  # else _cpu_* (ATen's, or the first call: builds them)
            if cpp is not None and y.is_contiguous() and dy.is_contiguous() and yd in _CPP_DTYPES:
                try:
                    return cpp.softmax_backward(y, dy, int(k), -1, d)
                except RuntimeError:
                    if y.shape == dy.shape:  # not the op's shape check (out of memory, ...): as raised
                        raise
            elif y.shape == dy.shape:
                return _cpu_backward(y, dy, d, k, yd)
    _check_tensor("grad_output", grad_output)
    _check_tensor("output", output)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    if grad_output.device != output.device:
        raise ValueError(
            f"grad_output and output must be on the same device, got {grad_output.device} and {output.device}"
        )
    if grad_output.shape != output.shape:
        raise ValueError(
            f"grad_output must have output's shape {tuple(output.shape)}, got {tuple(grad_output.shape)}"
        )
    _check_float_dtype("output.dtype", output.dtype)
    _check_float_dtype("grad_output.dtype", grad_output.dtype)
    in_dtype = output.dtype if input_dtype is None else _check_float_dtype("input_dtype", input_dtype)
    d = _check_dim(dim, output.dim())
    y, dy = (output.reshape(1), grad_output.reshape(1)) if output.dim() == 0 else (output, grad_output)
    if _backend.direct_call_ok(y, dy) and not (y.requires_grad or dy.requires_grad):
        dx = _backward(y, dy, d, _KINDS[kind], in_dtype)
    else:
        dx = softmax_bwd_op(y, dy, d, int(_KINDS[kind]), in_dtype)
    return dx.reshape(()) if output.dim() == 0 else dx
