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

The quadratic layer's op (:func:`quadratic`: ``z = x``, the weight packed as its upper triangle
``(d, c(c+1)/2)``) runs the same Triton kernels with ``triangular=True``, which read the packed
weight as it is; its CPU path multiplies row chunks of the packed products by it. Neither forms
the ``(d, c, c)`` weight.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional, Tuple

import torch

from mmkernels import _backend, _cpp
from mmkernels.ops._checks import FLOATS, check_same, check_tensor
from mmkernels.ops._layout import INT32_LIMIT, max_offset
from mmkernels.ops._util import (acc_dtype, cdiv, dot_f32, gpu_arch, graph_grads, math_dtype, next_pow2, sm_count,
                                 tf32_allowed)

# ----------------------------------------------------------------------------------------------
# Config resolver (heuristic; configs are data)
# ----------------------------------------------------------------------------------------------

#: dtype classes the resolver distinguishes: 16-bit storage (tensor cores), fp32 with TF32 dots
#: (tensor cores), fp32 with IEEE dots (FMA units: smaller tiles), float64 (fp64 math throughout).
DTYPE_CLASSES = ("16bit", "tf32", "ieee", "fp64")


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """``bilinear_fwd_kernel``: output tile [block_n, block_d]; the x tile's width block_i (the
    dot's reduction per h step)."""

    block_n: int
    block_d: int
    block_i: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class DzdxConfig:
    """``bilinear_bwd_dzdx_kernel``: the G tile [block_n, block_i]; the dy tile's width block_j
    (the dot's whole reduction per h: wider d is split into j-chunks)."""

    block_n: int
    block_i: int
    block_j: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class DwConfig:
    """``bilinear_bwd_dw_kernel``: the dW tile [block_d, block_i] of one h; the n step block_n."""

    block_d: int
    block_i: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class BilinearConfigs:
    fwd: FwdConfig
    dzdx: DzdxConfig
    dw: DwConfig


#: The single config under Triton's interpreter (tiny tiles keep it fast; dot dims >= 16).
INTERPRETER_CONFIGS = BilinearConfigs(fwd=FwdConfig(16, 16, 16, 1, 1), dzdx=DzdxConfig(16, 16, 16, 1, 1),
                                      dw=DwConfig(16, 16, 16, 1, 1))

#: Compute capability majors the resolver has tiles for (sm_80: A100's 164 KB of shared memory;
#: sm_90: H100's 228 KB); others get sm_80's.
ARCHS = (8, 9)


def dtype_class(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> str:
    """The resolver's class of ``dtype``; fp32 follows torch's matmul precision setting
    (``torch.set_float32_matmul_precision``: "high" / "medium" allow TF32, "highest" does not)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if dtype == torch.float64:
        return "fp64"
    if allow_tf32 is None:
        allow_tf32 = tf32_allowed()
    return "tf32" if allow_tf32 else "ieee"


def _width(n: int, cap: int, least: int = 16) -> int:
    """A tile dim for a size ``n``: its power-of-two ceiling, between ``least`` (``tl.dot``'s 16;
    64 where the dim is the wgmma's M) and ``cap``."""
    return max(least, min(cap, next_pow2(n)))


def _warps(rows: int, cols: int) -> int:
    """Tensor-core tiles: 8 warps (two warpgroups) from 64 x 32 or 128 rows up (fewer registers
    a thread: the compile tier showed 4 spilling there), else 4."""
    return 8 if (rows >= 64 and cols >= 32) or rows >= 128 else 4


def resolve_configs(N: int, b: int, c: int, d: int, dclass: str, arch: Optional[int] = 9, aligned: bool = True,
                    interpret: bool = False) -> BilinearConfigs:
    """Tiles for the three kernels on compute capability ``arch`` (8 or 9; None: 9).

    ``aligned``: every operand starts on 16 bytes, its rows are 16-byte multiples apart with unit
    stride along them, c and d are multiples of 16 and the weight is not the packed triangle
    (:func:`operands_aligned`): tiles load with 16-byte vector copies into shared memory, and the
    16-bit and TF32 kernels take GEMM tiles whose main loop is one 128 x 256 x 64 volume of MMA a
    step (TF32 half the reduction), the compile tier's yardstick GEMM's (bench/NOTES.md has the
    main-loop figures); sm_80 halves the tiles whose pipeline would not fit its shared memory.
    Otherwise every element is its own load (and address): 64-row tiles at 8 warps keep them in
    registers. The dims that are a wgmma's M (the forward's and dz/dx's rows, dW's d) stay >= 64.
    IEEE fp32 and fp64 run on FMA units: 64-wide tiles, fp64 32 (larger ones spill)."""
    if interpret:
        return INTERPRETER_CONFIGS
    if dclass not in DTYPE_CLASSES:
        raise ValueError(f"dtype class must be one of {DTYPE_CLASSES}, got {dclass!r}")
    if dclass in ("ieee", "fp64"):  # FMA dots hold whole operand rows a thread: small tiles
        t = 64 if dclass == "ieee" else 32
        return BilinearConfigs(FwdConfig(32, _width(d, t), _width(c, 16), 4, 1),
                               DzdxConfig(32, _width(c, t), _width(d, 16), 4, 2 if dclass == "ieee" else 1),
                               DwConfig(_width(d, t), _width(c, t), 16, 4, 2))
    wide = (arch or 9) >= 9
    bn = 128 if N > 64 else 64
    if not aligned:  # 16-bit and TF32 alike (TF32: half the reductions)
        k = 32 if dclass == "16bit" else 16
        fwd = FwdConfig(64, _width(d, 64), _width(c, k), 0, 2)
        dzdx = DzdxConfig(64, _width(c, 64), 16, 0, 2)
        dw = DwConfig(_width(d, 128, 64), _width(c, 64), k, 0, 2)
    elif dclass == "16bit":
        fwd = FwdConfig(bn, _width(d, 256 if bn == 128 and wide else 128), _width(c, 64), 0, 3)
        dzdx = DzdxConfig(bn, _width(c, 64), _width(d, 256 if wide else 128), 0, 2)
        dw = DwConfig(_width(d, 256 if wide else 128, 64), _width(c, 128), 64, 0, 3)
    else:  # tf32: fp32 tiles take twice the registers and shared memory
        fwd = FwdConfig(bn, _width(d, 128), _width(c, 32), 0, 3)
        dzdx = DzdxConfig(bn, _width(c, 64), _width(d, 64, 32), 0, 2)
        dw = DwConfig(_width(d, 128, 64), _width(c, 128), 32, 0, 3)
    return BilinearConfigs(dataclasses.replace(fwd, num_warps=_warps(fwd.block_n, fwd.block_d)),
                           dataclasses.replace(dzdx, num_warps=_warps(dzdx.block_n, dzdx.block_i)),
                           dataclasses.replace(dw, num_warps=_warps(dw.block_d, dw.block_i)))


def launch_configs() -> Iterator[Tuple[str, object, str, int, bool]]:
    """Every ``(kernel name, config, dtype class, arch, aligned)`` that :func:`resolve_configs`
    can return on a GPU, for the compile tier. The resolver looks at ``N > 64``, the powers of
    two of ``c`` and ``d`` up to 256, the arch and the alignment, so scanning those finds them all."""
    sizes = (1, 16, 32, 64, 128, 256, 257)
    seen = set()
    for arch in ARCHS:
        for dclass in DTYPE_CLASSES:
            for aligned in (True, False):
                for N in (1, 65):
                    for c in sizes:
                        for d in sizes:
                            cfgs = resolve_configs(N, 1, c, d, dclass, arch, aligned)
                            for name, cfg in (("bilinear_fwd_kernel", cfgs.fwd),
                                              ("bilinear_bwd_dzdx_kernel", cfgs.dzdx),
                                              ("bilinear_bwd_dw_kernel", cfgs.dw)):
                                key = (name, cfg, dclass, arch, aligned)
                                if key not in seen:
                                    seen.add(key)
                                    yield key


def splits(programs: int, reduction: int, step: int, sms: int, cap: int = 64) -> Tuple[int, int]:
    """``(splits, per_split)`` of a reduction of ``reduction`` steps (h, or rows in multiples of
    ``step``) for ``programs`` output tiles on ``sms`` SMs: 1 when the tiles fill a wave; else as
    many splits as fit in one wave (up to ``cap``, each at least ``step`` long) — one more wave,
    part-filled, would cost as much as the first. ``per_split`` is a multiple of ``step``; splits
    is the number that cover the reduction."""
    if programs >= sms or reduction <= step:
        return 1, max(reduction, 1)
    want = max(1, min(cap, sms // programs, cdiv(reduction, step)))
    per = cdiv(cdiv(reduction, want), step) * step
    return cdiv(reduction, per), per


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: TF32 for fp32 where torch's matmul precision allows it."""
    return "tf32" if dtype_class(dtype) == "tf32" else "ieee"


def _interpret(t: torch.Tensor) -> bool:
    """CPU tensors reach the Triton launchers only under Triton's interpreter (meta tensors, as the
    compile tier records launches, get the GPU's configs)."""
    return t.device.type == "cpu"


def _sms(t: torch.Tensor, arch: Optional[int]) -> int:
    """SMs a launch should fill: the GPU's; 4 under the interpreter (so that small tests split too);
    the target's for the compile tier's meta tensors."""
    return 4 if _interpret(t) else sm_count(t, arch)


def operands_aligned(*tensors: Optional[torch.Tensor], triangular: bool = False) -> bool:
    """The resolver's ``aligned``: each tensor starts on 16 bytes, has unit stride along its last
    dim and 16-byte multiples for its other strides, and its last dim is a multiple of 16 (so
    are c and d: the kernels' column masks then cover whole vectors); not the packed triangle,
    whose rows start anywhere."""
    if triangular:
        return False
    for t in tensors:
        if t is None:
            continue
        es = t.element_size()
        if t.data_ptr() % 16 or t.shape[-1] % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
            return False
        if any(s * es % 16 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
            return False
    return True


def _configs(z: torch.Tensor, N: int, b: int, c: int, d: int, arch: Optional[int], aligned: bool) -> BilinearConfigs:
    """The resolver's tiles for these sizes, ``z``'s dtype class, the GPU's arch (``arch`` for the
    compile tier's meta tensors) and the operands' alignment; the interpreter's tiles on CPU."""
    return resolve_configs(N, b, c, d, dtype_class(z.dtype), arch if arch is not None else gpu_arch(z), aligned,
                           _interpret(z))


def _needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """Some element offset of a tensor can pass 2**31 (the offsets of unmasked lanes never exceed
    a tensor's largest one; masked lanes' addresses are never dereferenced)."""
    return any(t is not None and max_offset(t) >= INT32_LIMIT for t in tensors)


def _check(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dy: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, triangular: bool = False) -> Tuple[int, int, int, int]:
    if z.dim() != 2:
        raise ValueError(f"z must be (N, b), got shape {tuple(z.shape)}")
    if x.dim() != 2 or x.shape[0] != z.shape[0]:
        raise ValueError(f"x must be (N, c) with N = {z.shape[0]}, got shape {tuple(x.shape)}")
    N, b = z.shape
    c = x.shape[1]
    if triangular:
        if b != c or weight.dim() != 2 or weight.shape[1] != c * (c + 1) // 2:
            raise ValueError(f"a packed triangular weight must be (d, c(c+1)/2) = (d, {c * (c + 1) // 2}) with "
                             f"b = c, got z (N, {b}), weight {tuple(weight.shape)}")
    elif weight.dim() != 3 or weight.shape[1] != b or weight.shape[2] != c:
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


def _w_strides(weight: torch.Tensor, triangular: bool) -> Tuple[int, int, int]:
    """(s_wj, s_wh, s_wi) of a (d, b, c) weight; a packed (d, P) one: (s_wj, 0, s_wp)."""
    if triangular:
        return weight.stride(0), 0, weight.stride(1)
    return weight.stride(0), weight.stride(1), weight.stride(2)


def _sum_planes(planes: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = Σ_s planes[s] (+ bias)``, the planes (S, R, K) summed in order (deterministic)."""
    from mmkernels._triton import bilinear as K

    S, R, Kc = planes.shape
    bk = min(128, next_pow2(Kc))
    br = max(1, min(64, 4096 // bk))
    K.bilinear_sum_planes_kernel[(cdiv(R, br), cdiv(Kc, bk))](
        planes_ptr=planes, bias_ptr=bias if bias is not None else out, out_ptr=out, R=R, K=Kc, S=S,
        s_pr=planes.stride(1), s_pk=planes.stride(2), s_ps=planes.stride(0),
        s_b=bias.stride(0) if bias is not None else 0, s_or=out.stride(0), s_ok=out.stride(1),
        BLOCK_R=br, BLOCK_K=bk, HAS_BIAS=bias is not None, ACC=acc_dtype(planes.dtype),
        USE_INT64=_needs_int64(planes, out),
    )
    return out


def bilinear_forward_triton(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, config: Optional[FwdConfig] = None,
                            h_splits: Optional[int] = None, triangular: bool = False,
                            arch: Optional[int] = None) -> torch.Tensor:
    """``y`` (N, d) in ``z.dtype``: ``y[n,j] = Σ_h Σ_i z[n,h]·x[n,i]·weight[j,h,i] (+ bias[j])``;
    float32 / float16 / bfloat16 with fp32 accumulation, float64 in fp64.

    z (N, b), x (N, c), weight (d, b, c) — or, ``triangular`` (the quadratic layer, z = x), the
    packed upper triangle (d, c(c+1)/2) in ``torch.triu_indices`` order — bias (d,) or None; any
    strides. ``config`` overrides the resolver's tiles, ``h_splits`` its split of the h loop (small
    N: the splits' partial sums in ACC planes, then summed in order with the bias); ``arch``: the
    compute capability major whose SMs the split fills (default: the tensors' GPU)."""
    N, b, c, d = _check(z, x, weight, bias=bias, triangular=triangular)
    y = torch.empty((N, d), dtype=z.dtype, device=z.device)
    if N == 0 or d == 0:
        return y
    if b == 0 or c == 0:
        return y.copy_(bias.to(y.dtype).expand(N, d)) if bias is not None else y.zero_()
    from mmkernels._triton import bilinear as K

    aligned = d % 16 == 0 and operands_aligned(x, weight, triangular=triangular)
    cfg = config or _configs(z, N, b, c, d, arch, aligned).fwd
    programs = cdiv(N, cfg.block_n) * cdiv(d, cfg.block_d)
    if h_splits is None:
        h_splits, h_per = splits(programs, b, 1, _sms(z, arch))
    else:
        h_per = cdiv(b, h_splits)
        h_splits = cdiv(b, h_per)
    out = y if h_splits == 1 else torch.empty((h_splits, N, d), dtype=math_dtype(z.dtype), device=z.device)
    s_wj, s_wh, s_wi = _w_strides(weight, triangular)
    K.bilinear_fwd_kernel[(programs, h_splits)](
        z_ptr=z, x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, y_ptr=out,
        N=N, B=b, C=c, D=d, H_SPLIT=h_per,
        s_zn=z.stride(0), s_zh=z.stride(1), s_xn=x.stride(0), s_xi=x.stride(1),
        s_wj=s_wj, s_wh=s_wh, s_wi=s_wi, s_b=bias.stride(0) if bias is not None else 0,
        s_yn=out.stride(-2), s_yj=out.stride(-1), s_ys=out.stride(0) if h_splits > 1 else 0,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_I=cfg.block_i,
        HAS_BIAS=bias is not None and h_splits == 1, TRIANGULAR=triangular,
        PRECISION=_precision(z.dtype), USE_INT64=_needs_int64(z, x, weight, bias, out), DOT_F32=dot_f32(z),
        ACC=acc_dtype(z.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y if h_splits == 1 else _sum_planes(out, y, bias)


def bilinear_backward_triton(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                             need_dz: bool = True, need_dx: bool = True, need_dw: bool = True,
                             configs: Optional[BilinearConfigs] = None, h_splits: Optional[int] = None,
                             n_splits: Optional[int] = None, triangular: bool = False,
                             arch: Optional[int] = None
                             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dz, dx, dw)`` of ``y = bilinear(z, x, weight, bias)`` for the output gradient ``dy``
    (N, d); each None when not asked for. dz (N, b) in z.dtype, dx (N, c) in x.dtype, dw like the
    weight (contiguous; ``triangular``: the packed upper triangle; dz and dx are then the two
    halves of the quadratic layer's input gradient). The bias gradient is the caller's
    (``dy.sum(0)``). dy in another float dtype is converted to z's (one copy). ``configs``,
    ``h_splits`` (dz/dx) and ``n_splits`` (dW) override the resolver; split partial sums go to ACC
    planes summed in order."""
    N, b, c, d = _check(z, x, weight, dy=dy, triangular=triangular)
    if dy.dtype != z.dtype:
        dy = dy.to(z.dtype)
    dz = torch.empty((N, b), dtype=z.dtype, device=z.device) if need_dz else None
    dx = torch.empty((N, c), dtype=x.dtype, device=x.device) if need_dx else None
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw else None
    cfgs = configs or _configs(z, N, b, c, d, arch, operands_aligned(x, weight, dy, triangular=triangular))
    prec, md = _precision(z.dtype), math_dtype(z.dtype)
    sms = _sms(z, arch)
    from mmkernels._triton import bilinear as K

    if (need_dz or need_dx) and N and b and c:
        if d == 0:
            for t in (dz, dx):
                if t is not None:
                    t.zero_()
        else:
            cfg = cfgs.dzdx
            num_ib, num_jc = cdiv(c, cfg.block_i), cdiv(d, cfg.block_j)
            programs = cdiv(N, cfg.block_n) * num_ib
            if h_splits is None:
                hs, h_per = splits(programs * num_jc, b, 1, sms)
            else:
                h_per = cdiv(b, h_splits)
                hs = cdiv(b, h_per)
            # partial sums: dz one per (j-chunk, i-block), dx one per (j-chunk, h-split); a single
            # one is the output itself. Triangular: columns h past an i-block are never written
            dz_t = dx_t = None
            if need_dz:
                planes = num_jc * num_ib
                dz_t = dz if planes == 1 else (torch.zeros if triangular else torch.empty)(
                    (planes, N, b), dtype=md, device=z.device)
            if need_dx:
                planes = num_jc * hs
                dx_t = dx if planes == 1 else torch.empty((planes, N, c), dtype=md, device=z.device)
            dz_k = dz_t if dz_t is not None else z  # (a pointer the kernel never uses)
            dx_k = dx_t if dx_t is not None else x
            s_wj, s_wh, s_wi = _w_strides(weight, triangular)
            K.bilinear_bwd_dzdx_kernel[(programs, num_jc, hs)](
                z_ptr=z, x_ptr=x, w_ptr=weight, dy_ptr=dy, dz_ptr=dz_k, dx_ptr=dx_k,
                N=N, B=b, C=c, D=d, H_SPLIT=h_per,
                s_zn=z.stride(0), s_zh=z.stride(1), s_xn=x.stride(0), s_xi=x.stride(1),
                s_wj=s_wj, s_wh=s_wh, s_wi=s_wi, s_dyn=dy.stride(0), s_dyj=dy.stride(1),
                s_dzn=dz_k.stride(-2), s_dzh=dz_k.stride(-1), s_dzs=dz_k.stride(0) if dz_k.dim() == 3 else 0,
                s_dxn=dx_k.stride(-2), s_dxi=dx_k.stride(-1), s_dxs=dx_k.stride(0) if dx_k.dim() == 3 else 0,
                BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i, BLOCK_J=cfg.block_j,
                EVEN=not triangular and c % cfg.block_i == 0 and d % cfg.block_j == 0,
                NEED_DZ=need_dz, NEED_DX=need_dx, TRIANGULAR=triangular,
                PRECISION=prec, USE_INT64=_needs_int64(z, x, weight, dy, dz_k, dx_k), DOT_F32=dot_f32(z),
                ACC=acc_dtype(z.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if dz_t is not None and dz_t.dim() == 3:
                _sum_planes(dz_t, dz)
            if dx_t is not None and dx_t.dim() == 3:
                _sum_planes(dx_t, dx)
    else:
        for t in (dz, dx):
            if t is not None:
                t.zero_()

    if need_dw and dw.numel():
        if N == 0:
            dw.zero_()
        else:
            cfg = cfgs.dw
            programs = b * cdiv(c, cfg.block_i) * cdiv(d, cfg.block_d)
            if n_splits is None:
                ns, n_per = splits(programs, N, cfg.block_n * 4, sms)
            else:
                n_per = cdiv(cdiv(N, n_splits), cfg.block_n) * cfg.block_n
                ns = cdiv(N, n_per)
            dw_t = dw if ns == 1 else torch.empty((ns,) + tuple(weight.shape), dtype=md, device=z.device)
            w2 = dw_t.reshape(ns, d, -1) if ns > 1 else dw_t.reshape(1, d, -1)
            dwj, dwp = w2.stride(1), w2.stride(2)
            K.bilinear_bwd_dw_kernel[(programs, ns)](
                z_ptr=z, x_ptr=x, dy_ptr=dy, dw_ptr=dw_t, N=N, B=b, C=c, D=d, N_SPLIT=n_per,
                s_zn=z.stride(0), s_zh=z.stride(1), s_xn=x.stride(0), s_xi=x.stride(1),
                s_dyn=dy.stride(0), s_dyj=dy.stride(1),
                s_dwj=dwj, s_dwh=0 if triangular else c * dwp, s_dwi=dwp, s_dws=w2.stride(0) if ns > 1 else 0,
                BLOCK_D=cfg.block_d, BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n, TRIANGULAR=triangular,
                PRECISION=prec, USE_INT64=_needs_int64(z, x, dy, dw_t), DOT_F32=dot_f32(z),
                ACC=acc_dtype(z.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if ns > 1:
                _sum_planes(w2, dw.reshape(d, -1))
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


@functools.lru_cache(maxsize=16)
def _triu_indices(c: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.triu_indices(c, c)`` as two index vectors (the packed weight's order)."""
    rows, cols = torch.triu_indices(c, c, device=device)
    return rows, cols


def _cpu_quadratic_forward(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y = A @ wᵀ (+ bias)`` with ``A[n, p] = x[n, r_p]·x[n, s_p]`` the packed products, built
    and consumed a row chunk at a time (half the products of the full ``c x c`` outer product;
    the weight is used as it is)."""
    N, c = x.shape
    d = w.shape[0]
    r, cc = _triu_indices(c, x.device)
    y = torch.empty(N, d, dtype=x.dtype, device=x.device)
    rows = _chunk_rows(1, r.numel())
    for s0 in range(0, N, rows):
        xc = x[s0:s0 + rows]
        torch.mm(xc[:, r] * xc[:, cc], w.t(), out=y[s0:s0 + rows])
    if bias is not None:
        y += bias
    return y


def _cpu_quadratic_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, need_dx: bool, need_dw: bool):
    """``(dx, dw)`` of :func:`_cpu_quadratic_forward`: ``dA = dy @ w`` a chunk at a time, each
    packed entry's gradient added to both its factors (``index_add_``); ``dw = dyᵀ @ A``."""
    N, c = x.shape
    r, cc = _triu_indices(c, x.device)
    dx = torch.zeros_like(x) if need_dx else None
    dw = torch.zeros(w.shape, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype,
                     device=w.device) if need_dw else None
    rows = _chunk_rows(1, r.numel())
    for s0 in range(0, N, rows):
        xc, dyc = x[s0:s0 + rows], dy[s0:s0 + rows]
        if need_dx:
            da = torch.mm(dyc, w)
            dx[s0:s0 + rows].index_add_(1, r, da * xc[:, cc]).index_add_(1, cc, da * xc[:, r])
            del da
        if need_dw:
            dw.addmm_(dyc.t().to(dw.dtype), (xc[:, r] * xc[:, cc]).to(dw.dtype))
    return dx, (dw.to(w.dtype) if need_dw else None)


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
    if _backend.resolve(z) is _backend.Impl.TRITON:
        return bilinear_forward_triton(z, x, w, bias)
    cpp = _cpp_bilinear()
    if cpp is not None:
        return cpp.bilinear_forward(_cd(z), _cd(x), _cd(w), _cd(bias)).to(z.dtype)
    return _cpu_forward(z, x, w, bias)


def _backward(z, x, w, dy, need_dz, need_dx, need_dw):
    if z.shape[0] == 0 or w.shape[0] == 0 or w.shape[1] == 0 or w.shape[2] == 0:
        return (torch.zeros_like(z) if need_dz else None, torch.zeros_like(x) if need_dx else None,
                torch.zeros_like(w) if need_dw else None)
    if _backend.resolve(z) is _backend.Impl.TRITON:
        return bilinear_backward_triton(z, x, w, dy, need_dz=need_dz, need_dx=need_dx, need_dw=need_dw)
    cpp = _cpp_bilinear()
    if cpp is not None:
        dz, dx, dw = cpp.bilinear_backward(_cd(z), _cd(x), _cd(w), _cd(dy), need_dz, need_dx, need_dw)
        return (None if dz is None else dz.to(z.dtype), None if dx is None else dx.to(x.dtype),
                None if dw is None else dw.to(w.dtype))
    return _cpu_backward(z, x, w, dy, need_dz, need_dx, need_dw)


def _quadratic_forward(x, w, bias):
    if x.shape[0] == 0 or w.shape[0] == 0:
        y = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        return y + bias if bias is not None else y
    if _backend.resolve(x) is _backend.Impl.TRITON:
        return bilinear_forward_triton(x, x, w, bias, triangular=True)
    return _cpu_quadratic_forward(x, w, bias)


def _quadratic_backward(x, w, dy, need_dx, need_dw):
    if x.shape[0] == 0 or w.shape[0] == 0 or w.shape[1] == 0:
        return torch.zeros_like(x) if need_dx else None, torch.zeros_like(w) if need_dw else None
    if _backend.resolve(x) is _backend.Impl.TRITON:
        dz, dx, dw = bilinear_backward_triton(x, x, w, dy, need_dz=need_dx, need_dx=need_dx, need_dw=need_dw,
                                              triangular=True)
        return (dz.add_(dx) if need_dx else None), dw
    return _cpu_quadratic_backward(x, w, dy, need_dx, need_dw)


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


@torch.library.custom_op("mmkernels::quadratic_fwd", mutates_args=())
def quadratic_fwd_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y (N, d) from x (N, c), the packed weight w (d, c(c+1)/2), bias (d,) or None."""
    return _quadratic_forward(x, w, bias)


@quadratic_fwd_op.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("mmkernels::quadratic_bwd", mutates_args=())
def quadratic_bwd_op(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, need_dx: bool,
                     need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); a gradient not asked for comes back as an empty tensor."""
    dx, dw = _quadratic_backward(x, w, dy, need_dx, need_dw)
    none = x.new_empty(0)
    return (none if dx is None else dx, none if dw is None else dw)


@quadratic_bwd_op.register_fake
def _(x, w, dy, need_dx, need_dw):
    none = x.new_empty(0)
    return (torch.empty_like(x) if need_dx else none, torch.empty_like(w) if need_dw else none)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _differentiable_bilinear(z, x, w):
    """``y`` without its bias as one einsum in the math dtype (differentiable in z, x and w): what
    the backward differentiates under ``create_graph`` (:func:`~mmkernels.ops._util.graph_grads`)."""
    md = math_dtype(z.dtype)
    return torch.einsum("nh,ni,jhi->nj", z.to(md), x.to(md), w.to(md)).to(z.dtype)


def _differentiable_quadratic(x, w):
    """The quadratic layer's ``y`` without its bias as torch ops in the math dtype (the packed
    products, then a GEMM): differentiable in x and w, for the backward under ``create_graph``."""
    r, cc = _triu_indices(x.shape[1], x.device)
    md = math_dtype(x.dtype)
    xm = x.to(md)
    return ((xm[:, r] * xm[:, cc]) @ w.to(md).t()).to(x.dtype)


class BilinearFunction(torch.autograd.Function):
    """Forward saves z, x and w (never the outer product); backward computes only the gradients
    autograd asks for; the bias gradient is the column sum of dy. Under ``create_graph`` the
    gradients are those of :func:`_differentiable_bilinear`, with their graph (a double backward)."""

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
        if torch.is_grad_enabled():
            dz, dx, dw = graph_grads(_differentiable_bilinear, (z, x, w), (need_dz, need_dx, need_dw), dy)
        elif need_dz or need_dx or need_dw:
            if _backend.direct_call_ok(z, x, w, dy):
                dz, dx, dw = _backward(z, x, w, dy, need_dz, need_dx, need_dw)
            else:
                dz, dx, dw = bilinear_bwd_op(z, x, w, dy, need_dz, need_dx, need_dw)
                dz, dx, dw = (dz if need_dz else None, dx if need_dx else None, dw if need_dw else None)
        else:
            dz = dx = dw = None
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        return dz, dx, dw, db


class QuadraticFunction(torch.autograd.Function):
    """The quadratic layer's op: forward saves x and the packed weight; backward computes the
    gradients asked for (the input's is the sum of its two factors' in the products); under
    ``create_graph`` those of :func:`_differentiable_quadratic`, with their graph."""

    @staticmethod
    def forward(ctx, x, w, bias):
        if _backend.direct_call_ok(x, w, *(() if bias is None else (bias,))):
            y = _quadratic_forward(x, w, bias)
        else:
            y = quadratic_fwd_op(x, w, bias)
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad
        dx = dw = None
        if torch.is_grad_enabled():
            dx, dw = graph_grads(_differentiable_quadratic, (x, w), (need_dx, need_dw), dy)
        elif need_dx or need_dw:
            if _backend.direct_call_ok(x, w, dy):
                dx, dw = _quadratic_backward(x, w, dy, need_dx, need_dw)
            else:
                dx, dw = quadratic_bwd_op(x, w, dy, need_dx, need_dw)
                dx, dw = (dx if need_dx else None, dw if need_dw else None)
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        return dx, dw, db


# ----------------------------------------------------------------------------------------------
# Public functional
# ----------------------------------------------------------------------------------------------


def _check_floats(**tensors: Optional[torch.Tensor]) -> None:
    """The public functions' arguments (None: absent): tensors of one float dtype on one device."""
    names = [k for k, t in tensors.items() if t is not None]
    given = [tensors[k] for k in names]
    for name, t in zip(names, given):
        check_tensor(name, t)
    if given[0].dtype not in FLOATS:
        raise TypeError(f"{names[0]} must be float16, bfloat16, float32 or float64, got {given[0].dtype}")
    check_same(names, given, "dtype")
    check_same(names, given, "device")


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
    _check_floats(input1=input1, input2=input2, weight=weight, bias=bias)
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


def quadratic(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The quadratic layer's op: ``y[..., j] = Σ_{i ≤ k} weight[j, p(i, k)] · input[..., i] · input[..., k]
    + bias[j]``, ``p`` the ``torch.triu_indices(c, c)`` order.

    Args:
        input: ``(*, c)``, any batch shape.
        weight: ``(d, c(c+1)/2)`` — the packed upper triangle (never scattered into ``(d, c, c)``).
        bias: ``(d,)`` or None.

    Returns:
        ``(*, d)`` in the inputs' dtype. On Triton the bilinear kernels read the packed weight
    directly (``triangular``: entries below the diagonal are skipped, not stored); on CPU the
    packed products are built a row chunk at a time and multiplied by the weight as it is.
    """
    _check_floats(input=input, weight=weight, bias=bias)
    if input.dim() < 1:
        raise ValueError(f"input must have shape (*, c), got {tuple(input.shape)}")
    c = input.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != c * (c + 1) // 2:
        raise ValueError(f"weight must have shape (d, c(c+1)/2) = (d, {c * (c + 1) // 2}) for c = {c}, "
                         f"got {tuple(weight.shape)}")
    d = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape ({d},), got {tuple(bias.shape)}")
    batch = input.shape[:-1]
    return QuadraticFunction.apply(input.reshape(-1, c), weight, bias).reshape(*batch, d)
