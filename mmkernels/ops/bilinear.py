"""Sigma-pi / bilinear family: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·W[j,h,i] (+ b[j])``.

The same op as ``torch.nn.functional.bilinear(z, x, W, b)`` (the sigma-pi contraction ``W = z×U, y = x×W`` of docs/modules.md, with
``U[h,i,j] = W[j,h,i]``). Order in this file: config resolver -> Triton launchers -> CPU path ->
dispatch -> torch.library ops -> autograd.Function -> public functional. The kernels are in
``triton_kernels/bilinear.py`` (``mmkernels._triton.bilinear``; its docstring gives the tiling and
the ownership of dz / dx). No launcher copies an input: every kernel takes strides.

On CPU the C++ kernels of ``csrc/bilinear.cpp`` run when built (blocked: never the outer
product, a few hundred KB of products per thread; see that file's header); else the vectorised-
torch path below, which never holds more than :data:`CPU_CHUNK_ELEMS` elements of the ``N × b·c``
outer product (or of ``G = dy·W``) at once. Neither's peak memory grows with ``N·b·c``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS, check_same, check_tensor
from mmkernels.ops._layout import INT32_LIMIT, max_offset
from mmkernels.ops._util import acc_dtype, cdiv, math_dtype, next_pow2

# ----------------------------------------------------------------------------------------------
# Config resolver (heuristic; configs are data)
# ----------------------------------------------------------------------------------------------

#: dtype classes the resolver distinguishes: 16-bit storage (tensor cores), fp32 with TF32 dots
#: (tensor cores), fp32 with IEEE dots (FMA units: smaller tiles), float64 (fp64 math throughout).
DTYPE_CLASSES = ("16bit", "tf32", "ieee", "fp64")


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """``bilinear_fwd_kernel``: output tile [block_n, block_d], flat-K step block_k."""

    block_n: int
    block_d: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class DzdxConfig:
    """``bilinear_bwd_dzdx_kernel``: n-block, G tile [block_n, block_h·block_i], d step block_j."""

    block_n: int
    block_h: int
    block_i: int
    block_j: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class DwConfig:
    """``bilinear_bwd_dw_kernel``: dWᵀ tile [block_k, block_d], n step block_n."""

    block_k: int
    block_d: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BilinearConfigs:
    fwd: FwdConfig
    dzdx: DzdxConfig
    dw: DwConfig


#: Widest i-block of the dz/dx kernel's G tile (its width): c above it takes several i-blocks.
MAX_BLOCK_I = 64

#: The single config under Triton's interpreter (no autotuning there; tiny tiles keep it fast).
INTERPRETER_CONFIGS = BilinearConfigs(
    fwd=FwdConfig(16, 16, 16, 1, 1),
    dzdx=DzdxConfig(16, 0, 16, 16, 1, 1),  # block_h / block_i resolved from b, c (see below)
    dw=DwConfig(16, 16, 16, 1, 1),
)


def dtype_class(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if dtype == torch.float64:
        return "fp64"
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def _hi_split(c: int, tile_k: int) -> Tuple[int, int]:
    """(block_h, block_i) of the dz/dx kernel's G tile of ``tile_k`` columns (>= 16, tl.dot's
    minimum): the i-block covers c when it can (then dz needs no carried partial sums), the
    h-block takes the rest. The tile width is fixed (not shrunk for small b) to keep the number of
    compiled variants small: a tiny b·c wastes masked columns, not time that matters."""
    bi = min(next_pow2(c), tile_k)
    return tile_k // bi, bi


def resolve_configs(N: int, b: int, c: int, d: int, dclass: str,
                    interpret: bool = False) -> BilinearConfigs:
    """Heuristic tiles for the three kernels (no autotuning yet)."""
    if interpret:
        bh, bi = _hi_split(c, 16)
        return dataclasses.replace(INTERPRETER_CONFIGS,
                                   dzdx=dataclasses.replace(INTERPRETER_CONFIGS.dzdx, block_h=bh, block_i=bi))
    if dclass not in DTYPE_CLASSES:
        raise ValueError(f"dtype class must be one of {DTYPE_CLASSES}, got {dclass!r}")
    big_n, big_d = N > 64, d > 64
    if dclass == "fp64":  # fp64 FMA: half the tiles of the fp32 IEEE ones (twice the registers)
        fwd = FwdConfig(32, 64, 16, 4, 1)
        bh, bi = _hi_split(c, MAX_BLOCK_I)
        dzdx = DzdxConfig(16, bh, bi, 16, 4, 2)
        dw = DwConfig(32, 64, 16, 4, 1)
        return BilinearConfigs(fwd, dzdx, dw)
    if dclass == "ieee":  # FMA units: 64x64 output tiles, 4 warps
        fwd = FwdConfig(64, 64, 32, 4, 2)
        bh, bi = _hi_split(c, MAX_BLOCK_I)
        dzdx = DzdxConfig(32, bh, bi, 16, 4, 1)  # FMA dot operands live in registers
        dw = DwConfig(64, 64, 32, 4, 2)
        return BilinearConfigs(fwd, dzdx, dw)
    # BLOCK_K 32 for 16-bit: at 64 the unaligned / strided-weight builds spill (compile tier);
    # a 128-row tile only with a 128-wide one (128x64 at 4 warps spills unaligned)
    bk = 32 if dclass == "16bit" else 16  # tf32 at 64x128x32 spills unaligned
    bd = 128 if big_d else 64
    bn = 128 if big_n and bd == 128 else 64
    fwd = FwdConfig(bn, bd, bk, 8 if bn * bd >= 128 * 128 else 4, 3)
    bh, bi = _hi_split(c, MAX_BLOCK_I)
    # 8 warps: at 4 the G tile, its reductions and the pipelined loads spill (compile tier)
    dzdx = DzdxConfig(64, bh, bi, 64, 8, 2) if dclass == "16bit" else DzdxConfig(64, bh, bi, 16, 8, 3)
    dw = DwConfig(128, bd, 64 if dclass == "16bit" else 32, 8 if bd >= 128 else 4, 3)
    return BilinearConfigs(fwd, dzdx, dw)


def launch_configs() -> Iterator[Tuple[str, object, str]]:
    """Every ``(kernel name, config, dtype class)`` that :func:`resolve_configs` can return on a
    GPU, for the compile tier. The resolver only looks at ``N > 64``, ``d > 64`` and the power of
    two of ``c`` up to 64, so scanning those finds them all."""
    sizes = (1, 2, 4, 8, 16, 32, 64, 65)
    seen = set()
    for dclass in DTYPE_CLASSES:
        for N in (1, 65):
            for d in (1, 65):
                for b in sizes:
                    for c in sizes:
                        cfgs = resolve_configs(N, b, c, d, dclass)
                        for name, cfg in (("bilinear_fwd_kernel", cfgs.fwd),
                                          ("bilinear_bwd_dzdx_kernel", cfgs.dzdx),
                                          ("bilinear_bwd_dw_kernel", cfgs.dw)):
                            key = (name, cfg, dclass)
                            if key not in seen:
                                seen.add(key)
                                yield key


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: TF32 for fp32 only where torch allows it for matmuls."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _interpret(t: torch.Tensor) -> bool:
    """CPU tensors reach the Triton launchers only under Triton's interpreter (meta tensors, as the
    compile tier records launches, get the GPU's configs)."""
    return t.device.type == "cpu"


def _dot_f32(t: torch.Tensor) -> bool:
    """fp32 dot operands: only for bf16 under Triton's interpreter (its bf16 tl.dot is wrong)."""
    return t.dtype == torch.bfloat16 and _interpret(t)


def _needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """Some element offset of a tensor can pass 2**31 (the offsets of unmasked lanes never exceed
    a tensor's largest one; masked lanes' addresses are never dereferenced)."""
    return any(t is not None and max_offset(t) >= INT32_LIMIT for t in tensors)


def _check(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dy: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None) -> Tuple[int, int, int, int]:
    if z.dim() != 2:
        raise ValueError(f"z must be (N, b), got shape {tuple(z.shape)}")
    if x.dim() != 2 or x.shape[0] != z.shape[0]:
        raise ValueError(f"x must be (N, c) with N = {z.shape[0]}, got shape {tuple(x.shape)}")
    N, b = z.shape
    c = x.shape[1]
    if weight.dim() != 3 or weight.shape[1] != b or weight.shape[2] != c:
        raise ValueError(f"weight must be (d, b, c) = (d, {b}, {c}), got shape {tuple(weight.shape)}")
    d = weight.shape[0]
    if b * c >= INT32_LIMIT:
        raise ValueError(f"b * c = {b * c} must be below 2**31 (the kernels index b·c in int32)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d):
        raise ValueError(f"bias must be (d,) = ({d},), got shape {tuple(bias.shape)}")
    if dy is not None and tuple(dy.shape) != (N, d):
        raise ValueError(f"dy must be (N, d) = ({N}, {d}), got shape {tuple(dy.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("dy", dy)):
        if t is not None and t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    for name, t in (("z", z), ("x", x), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not (z.dtype == x.dtype == weight.dtype):
        raise TypeError(f"z, x and weight must share a dtype, got {z.dtype}, {x.dtype}, {weight.dtype}")
    return N, b, c, d


def bilinear_forward_triton(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None,
                            config: Optional[FwdConfig] = None) -> torch.Tensor:
    """``y`` (N, d) in ``z.dtype``: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·weight[j,h,i] (+ bias[j])``;
    float32 / float16 / bfloat16 with fp32 accumulation, float64 in fp64.

    z (N, b), x (N, c), weight (d, b, c), bias (d,) or None; any strides. ``config`` overrides
    the resolver (tests, config exploration)."""
    N, b, c, d = _check(z, x, weight, bias=bias)
    y = torch.empty((N, d), dtype=z.dtype, device=z.device)
    if N == 0 or d == 0:
        return y
    if b == 0 or c == 0:
        return y.copy_(bias.to(y.dtype).expand(N, d)) if bias is not None else y.zero_()
    from mmkernels._triton import bilinear as K

    cfg = config or resolve_configs(N, b, c, d, dtype_class(z.dtype), _interpret(z)).fwd
    w_flat = weight.stride(1) == c * weight.stride(2) or b == 1
    s_wh = weight.stride(1) if b > 1 else c * weight.stride(2)
    grid = (cdiv(N, cfg.block_n) * cdiv(d, cfg.block_d),)
    K.bilinear_fwd_kernel[grid](
        z_ptr=z, x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, y_ptr=y,
        N=N, B=b, C=c, D=d,
        s_zn=z.stride(0), s_zh=z.stride(1),
        s_xn=x.stride(0), s_xi=x.stride(1),
        s_wj=weight.stride(0), s_wh=s_wh, s_wi=weight.stride(2),
        s_b=bias.stride(0) if bias is not None else 0,
        s_yn=y.stride(0), s_yj=y.stride(1),
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, W_FLAT=w_flat,
        PRECISION=_precision(z.dtype), DOT_F32=_dot_f32(z), ACC=acc_dtype(z.dtype),
        USE_INT64=_needs_int64(z, x, weight, bias, y),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def bilinear_backward_triton(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                             need_dz: bool = True, need_dx: bool = True, need_dw: bool = True,
                             configs: Optional[BilinearConfigs] = None
                             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dz, dx, dw)`` of ``y = bilinear(z, x, weight, bias)`` for the output gradient ``dy``
    (N, d); each None when not asked for. dz (N, b) in z.dtype, dx (N, c) in x.dtype, dw (d, b, c)
    contiguous in weight.dtype. The bias gradient is the caller's (``dy.sum(0)``). dy in another
    float dtype is converted to z's (one copy)."""
    N, b, c, d = _check(z, x, weight, dy=dy)
    if dy.dtype != z.dtype:
        dy = dy.to(z.dtype)
    dz = torch.empty((N, b), dtype=z.dtype, device=z.device) if need_dz else None
    dx = torch.empty((N, c), dtype=x.dtype, device=x.device) if need_dx else None
    dw = torch.empty((d, b, c), dtype=weight.dtype, device=weight.device) if need_dw else None
    cfgs = configs or resolve_configs(N, b, c, d, dtype_class(z.dtype), _interpret(z))
    prec = _precision(z.dtype)
    from mmkernels._triton import bilinear as K

    empty_k = N == 0 or b == 0 or c == 0
    if (need_dz or need_dx) and not empty_k:
        if d == 0:
            for t in (dz, dx):
                if t is not None:
                    t.zero_()
        else:
            cfg = cfgs.dzdx
            multi_i = cdiv(c, cfg.block_i) > 1
            dzacc = None
            if need_dz and multi_i:
                md = math_dtype(z.dtype)
                dzacc = dz if dz.dtype == md else torch.empty((N, b), dtype=md, device=z.device)
            dz_arg = dz if dz is not None else z  # never touched when not needed (constexpr)
            dx_arg = dx if dx is not None else x
            acc_arg = dzacc if dzacc is not None else dz_arg
            K.bilinear_bwd_dzdx_kernel[(cdiv(N, cfg.block_n),)](
                z_ptr=z, x_ptr=x, w_ptr=weight, dy_ptr=dy, dz_ptr=dz_arg, dzacc_ptr=acc_arg, dx_ptr=dx_arg,
                N=N, B=b, C=c, D=d,
                s_zn=z.stride(0), s_zh=z.stride(1),
                s_xn=x.stride(0), s_xi=x.stride(1),
                s_wj=weight.stride(0), s_wh=weight.stride(1), s_wi=weight.stride(2),
                s_dyn=dy.stride(0), s_dyj=dy.stride(1),
                s_dzn=dz_arg.stride(0), s_dzh=dz_arg.stride(1),
                s_an=acc_arg.stride(0), s_ah=acc_arg.stride(1),
                s_dxn=dx_arg.stride(0), s_dxi=dx_arg.stride(1),
                BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_I=cfg.block_i, BLOCK_J=cfg.block_j,
                NEED_DZ=need_dz, NEED_DX=need_dx, MULTI_I=multi_i,
                PRECISION=prec, DOT_F32=_dot_f32(z), ACC=acc_dtype(z.dtype),
                USE_INT64=_needs_int64(z, x, weight, dy, dz_arg, acc_arg, dx_arg),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    elif need_dz or need_dx:
        for t in (dz, dx):
            if t is not None:
                t.zero_()

    if need_dw and dw.numel():
        if N == 0:
            dw.zero_()
        else:
            cfg = cfgs.dw
            grid = (cdiv(b * c, cfg.block_k) * cdiv(d, cfg.block_d),)
            K.bilinear_bwd_dw_kernel[grid](
                z_ptr=z, x_ptr=x, dy_ptr=dy, dw_ptr=dw,
                N=N, B=b, C=c, D=d,
                s_zn=z.stride(0), s_zh=z.stride(1),
                s_xn=x.stride(0), s_xi=x.stride(1),
                s_dyn=dy.stride(0), s_dyj=dy.stride(1),
                s_dwj=b * c, s_dwk=1,
                BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n,
                PRECISION=prec, DOT_F32=_dot_f32(z), ACC=acc_dtype(z.dtype),
                USE_INT64=_needs_int64(z, x, dy, dw),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return dz, dx, dw


# ----------------------------------------------------------------------------------------------
# CPU path (chunked over rows; never the N×b·c operand)
# ----------------------------------------------------------------------------------------------

#: Elements of the per-chunk outer product (and of G) the CPU path materialises at once.
CPU_CHUNK_ELEMS = 1 << 22


def _chunk_rows(b: int, c: int) -> int:
    return max(1, CPU_CHUNK_ELEMS // max(1, b * c))


def _cpu_forward(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    N, b = z.shape
    c, d = x.shape[1], w.shape[0]
    y = torch.empty(N, d, dtype=z.dtype, device=z.device)
    w2 = w.reshape(d, b * c)  # a view for a contiguous weight; else one copy of the (small) weight
    rows = _chunk_rows(b, c)
    for s in range(0, N, rows):
        zc, xc = z[s:s + rows], x[s:s + rows]
        a = (zc[:, :, None] * xc[:, None, :]).reshape(zc.shape[0], b * c)
        torch.mm(a, w2.t(), out=y[s:s + rows])
        del a  # before the next chunk's is built: one chunk live at a time
    if bias is not None:
        y += bias
    return y


def _cpu_backward(z, x, w, dy, need_dz: bool, need_dx: bool, need_dw: bool):
    N, b = z.shape
    c, d = x.shape[1], w.shape[0]
    w2 = w.reshape(d, b * c)
    dz = torch.empty_like(z) if need_dz else None
    dx = torch.empty_like(x) if need_dx else None
    dw2 = torch.zeros(d, b * c, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
                      device=w.device) if need_dw else None
    rows = _chunk_rows(b, c)
    for s in range(0, N, rows):
        zc, xc, dyc = z[s:s + rows], x[s:s + rows], dy[s:s + rows]
        n = zc.shape[0]
        if need_dz or need_dx:
            g = torch.mm(dyc, w2).view(n, b, c)  # G[n, h, i] = Σ_j dy[n, j] W[j, h, i]
            if need_dz:
                torch.bmm(g, xc[:, :, None], out=dz[s:s + rows, :, None])
            if need_dx:
                torch.bmm(zc[:, None, :], g, out=dx[s:s + rows, None, :])
            del g
        if need_dw:
            a = (zc[:, :, None] * xc[:, None, :]).reshape(n, b * c)
            dw2.addmm_(dyc.t().to(dw2.dtype), a.to(dw2.dtype))
            del a
    dw = dw2.view(d, b, c).to(w.dtype) if need_dw else None
    return dz, dx, dw


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def _cpp_bilinear():
    """``torch.ops.mmkernels_cpu`` when the C++ sigma-pi (csrc/bilinear.cpp) is selected and built."""
    cpp = _cpp.ops()
    return cpp if cpp is not None and hasattr(cpp, "bilinear_forward") else None


def _cd(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` in the C++ path's compute dtype (16-bit storage is cast to float32)."""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


def _forward(z, x, w, bias):
    if z.shape[0] == 0 or w.shape[0] == 0:
        y = torch.zeros(z.shape[0], w.shape[0], dtype=z.dtype, device=z.device)
        return y + bias if bias is not None else y
    if _backend.resolve(z.device) is _backend.Impl.TRITON:
        return bilinear_forward_triton(z, x, w, bias)
    cpp = _cpp_bilinear()
    if cpp is not None:
        return cpp.bilinear_forward(_cd(z), _cd(x), _cd(w), _cd(bias)).to(z.dtype)
    return _cpu_forward(z, x, w, bias)


def _backward(z, x, w, dy, need_dz, need_dx, need_dw):
    if z.shape[0] == 0 or w.shape[0] == 0 or w.shape[1] == 0 or w.shape[2] == 0:
        return (torch.zeros_like(z) if need_dz else None, torch.zeros_like(x) if need_dx else None,
                torch.zeros_like(w) if need_dw else None)
    if _backend.resolve(z.device) is _backend.Impl.TRITON:
        return bilinear_backward_triton(z, x, w, dy, need_dz=need_dz, need_dx=need_dx, need_dw=need_dw)
    cpp = _cpp_bilinear()
    if cpp is not None:
        dz, dx, dw = cpp.bilinear_backward(_cd(z), _cd(x), _cd(w), _cd(dy), need_dz, need_dx, need_dw)
        return (None if dz is None else dz.to(z.dtype), None if dx is None else dx.to(x.dtype),
                None if dw is None else dw.to(w.dtype))
    return _cpu_backward(z, x, w, dy, need_dz, need_dx, need_dw)


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mmkernels::bilinear_fwd", mutates_args=())
def bilinear_fwd_op(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y (N, d) from z (N, b), x (N, c), w (d, b, c), bias (d,) or None."""
    return _forward(z, x, w, bias)


@bilinear_fwd_op.register_fake
def _(z, x, w, bias):
    return z.new_empty(z.shape[0], w.shape[0])


@torch.library.custom_op("mmkernels::bilinear_bwd", mutates_args=())
def bilinear_bwd_op(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor,
                    need_dz: bool, need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dx, dw); a gradient not asked for comes back as an empty tensor."""
    dz, dx, dw = _backward(z, x, w, dy, need_dz, need_dx, need_dw)
    none = z.new_empty(0)
    return (none if dz is None else dz, none if dx is None else dx, none if dw is None else dw)


@bilinear_bwd_op.register_fake
def _(z, x, w, dy, need_dz, need_dx, need_dw):
    none = z.new_empty(0)
    return (torch.empty_like(z) if need_dz else none, torch.empty_like(x) if need_dx else none,
            torch.empty_like(w) if need_dw else none)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class BilinearFunction(torch.autograd.Function):
    """Forward saves z, x and w (never the outer product); backward computes only the gradients
    autograd asks for; the bias gradient is the column sum of dy."""

    @staticmethod
    def forward(ctx, z, x, w, bias):
        if _backend.direct_call_ok(z, x, w, *(() if bias is None else (bias,))):
            y = _forward(z, x, w, bias)
        else:
            y = bilinear_fwd_op(z, x, w, bias)
        ctx.save_for_backward(z, x, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        z, x, w = ctx.saved_tensors
        need_dz, need_dx, need_dw, need_db = ctx.needs_input_grad
        if need_dz or need_dx or need_dw:
            if _backend.direct_call_ok(z, x, w, dy):
                dz, dx, dw = _backward(z, x, w, dy, need_dz, need_dx, need_dw)
            else:
                dz, dx, dw = bilinear_bwd_op(z, x, w, dy, need_dz, need_dx, need_dw)
                dz, dx, dw = (dz if need_dz else None, dx if need_dx else None, dw if need_dw else None)
        else:
            dz = dx = dw = None
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        return dz, dx, dw, db


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------


def bilinear(input1: torch.Tensor, input2: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Sigma-pi / bilinear contraction, like ``torch.nn.functional.bilinear``:
    ``y[..., j] = Σ_h Σ_i input1[..., h] · input2[..., i] · weight[j, h, i] + bias[j]``.

    Args:
        input1: ``(*, b)`` — ``z``, the modulating input.
        input2: ``(*, c)`` with the same batch shape ``*`` (any rank, empty batches too) — ``x``.
        weight: ``(d, b, c)`` — ``U`` with ``U[h, i, j] = weight[j, h, i]``.
        bias: ``(d,)`` or None.

    All tensors share one dtype (float16, bfloat16, float32, float64) and one device. Math
    accumulates in float32 (float64 for float64); on CUDA, float32 products follow
    ``torch.backends.cuda.matmul.allow_tf32``.

    Returns:
        ``(*, d)`` in the inputs' dtype.

    The ``N × b·c`` outer product is never materialised: the Triton kernels build its tiles in
    registers; on CPU the C++ kernels (csrc/bilinear.cpp) block over rows and ``h`` with at most
    ~128K elements of products per thread, the fallback works on row chunks of at most
    ``CPU_CHUNK_ELEMS`` elements. Batch
    dims are flattened with ``reshape`` (a copy only if they cannot be viewed as one dim).

    Example:
        >>> z, x = torch.randn(32, 8), torch.randn(32, 5)
        >>> w, b = torch.randn(3, 8, 5), torch.randn(3)
        >>> mmkernels.bilinear(z, x, w, b).shape
        torch.Size([32, 3])
    """
    check_tensor("input1", input1)
    check_tensor("input2", input2)
    check_tensor("weight", weight)
    tensors, names = [input1, input2, weight], ["input1", "input2", "weight"]
    if bias is not None:
        check_tensor("bias", bias)
        tensors.append(bias)
        names.append("bias")
    if input1.dtype not in FLOATS:
        raise TypeError(f"input1 must be float16, bfloat16, float32 or float64, got {input1.dtype}")
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape (d, b, c), got {tuple(weight.shape)}")
    d, b, c = weight.shape
    if input1.dim() < 1 or input1.shape[-1] != b:
        raise ValueError(f"input1 must have shape (*, {b}) to match weight (d, b, c) = {tuple(weight.shape)}, "
                         f"got {tuple(input1.shape)}")
    if input2.dim() < 1 or input2.shape[-1] != c:
        raise ValueError(f"input2 must have shape (*, {c}) to match weight (d, b, c) = {tuple(weight.shape)}, "
                         f"got {tuple(input2.shape)}")
    if input1.shape[:-1] != input2.shape[:-1]:
        raise ValueError(f"input1 and input2 must have the same batch shape, got {tuple(input1.shape[:-1])} "
                         f"and {tuple(input2.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
    batch = input1.shape[:-1]
    z, x = input1.reshape(-1, b), input2.reshape(-1, c)
    return BilinearFunction.apply(z, x, weight, bias).reshape(*batch, d)
