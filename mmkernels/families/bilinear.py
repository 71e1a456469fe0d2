"""The sigma-pi / bilinear family: ``y[..., j] = Σ_h Σ_i z[..., h]·x[..., i]·w[j, h, i] (+ bias[j])``
(``F.bilinear``; ``nn.Quadratic`` and ``nn.HyperLinear`` run on it).

Cases: op ``bilinear``; the shape is the batch shape; params ``b``, ``c``, ``d``, ``bias``; inputs
z (*, b), x (*, c), w (d, b, c), bias (d,) when ``bias``, and an incoming gradient dy (*, d).
Bench: forward and forward + backward against ``F.bilinear`` (also an einsum and a plain GEMM of
the same FLOPs); useful FLOPs ``2·N·b·c·d`` forward, 3x that forward + backward. Compile tier:
each kernel at every config of :func:`mmkernels.ops.bilinear.launch_configs` and dtype class, split
and not, the quadratic layer's packed weight.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch

from mmkernels import reference as ref
from mmkernels.family import (Case, CheckSample, Family, Inputs, Outputs, Target, Variant, case_builder,
                              compiled, laid_out, randn, sample_index)
from mmkernels.ops import bilinear as B

_case = case_builder("bilinear")


def cases() -> List[Case]:
    f32 = torch.float32
    edge = {"interp", "edge"}
    out: List[Case] = []

    def add(batch, b, c, d, dtype, tags, bias=True, **layouts):
        out.append(_case("bilinear", batch, dtype, tags, layouts, b=b, c=c, d=d, bias=bias))

    for batch in ((), (0,), (1,), (7,), (2, 3)):
        for bcd in ((1, 1, 1), (3, 5, 7), (17, 13, 11), (16, 32, 8)):
            for bias in (True, False):
                add(batch, *bcd, f32, edge, bias=bias)
    for dt in (torch.float16, torch.bfloat16):
        add((7,), 17, 13, 11, dt, edge)
        add((33,), 16, 32, 8, dt, edge)
    add((5,), 64, 65, 3, f32, edge)  # b·c >= 4096: long fp32 sums
    add((6,), 9, 10, 5, f32, edge, z="sliced", x="transposed", w="transposed")
    add((2, 3), 9, 10, 5, f32, edge, bias=False, z="transposed", x="sliced")
    # the main job on CPU (F.bilinear's CPU backward is slow: sizes that keep the job short)
    add((2048,), 64, 64, 32, f32, {"bench"})
    add((256,), 128, 128, 64, f32, {"bench"})
    # the GPU suite: the acceptance sizes (bf16, b = c = d = 256, N = 8192 and N = 64) and fp32
    add((8192,), 256, 256, 256, torch.bfloat16, {"gpu"})
    add((64,), 256, 256, 256, torch.bfloat16, {"gpu"})
    add((8192,), 256, 256, 64, f32, {"gpu"})
    # the GPU suite's dry run: more rows than the 4096-element check bound allows (the row sample)
    add((40,), 12, 10, 6, f32, {"dry-run"})
    return out


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    b, c, d = (int(case.params[k]) for k in ("b", "c", "d"))
    batch = tuple(case.shape)
    lay = case.layouts
    out = {
        "z": laid_out(randn(batch + (b,), case.dtype, device, gen), lay.get("z", "contiguous")),
        "x": laid_out(randn(batch + (c,), case.dtype, device, gen), lay.get("x", "contiguous")),
        "w": laid_out(randn((d, b, c), case.dtype, device, gen, (b * c) ** -0.5), lay.get("w", "contiguous")),
        "dy": randn(batch + (d,), case.dtype, device, gen),
    }
    if case.params.get("bias", True):
        out["bias"] = randn((d,), case.dtype, device, gen)
    return out


# ----------------------------------------------------------------------------------------------
# Bench spec
# ----------------------------------------------------------------------------------------------

def _fwd_bwd(fwd: Callable[[Inputs], torch.Tensor], leaves: Sequence[str]) -> Callable[[Inputs], Outputs]:
    """Forward, then the gradients of ``leaves`` for the incoming ``dy``: (y, *grads)."""
    def call(i: Inputs) -> Outputs:
        y = fwd(i)
        grads = torch.autograd.grad(y, [i[k] for k in leaves], i["dy"])
        return (y.detach(), *grads)
    return call


def _gemm(n: int, b: int, c: int, d: int, backward: bool) -> Callable[[Inputs], Outputs]:
    """Plain ``torch.mm`` of the bilinear FLOPs on the ``(N, b·c)`` outer product and the
    ``(d, b·c)`` weight (forward ``A @ Wᵀ``; backward also ``dy @ W`` and ``dyᵀ @ A``, a linear
    layer's); its operands are built at the first call of each buffer set (the timing's warm-up)."""
    def call(i: Inputs) -> Outputs:
        ops = i.get("_gemm")
        if ops is None:  # the warm-up call of this buffer set: not timed
            with torch.no_grad():
                z, x = i["z"].detach().reshape(n, b), i["x"].detach().reshape(n, c)
                a = (z[:, :, None] * x[:, None, :]).reshape(n, b * c)
                w2 = i["w"].detach().reshape(d, b * c).contiguous()
                dy = i["dy"].reshape(n, d).contiguous() if backward else None
            ops = i["_gemm"] = (a, w2, dy)
        a, w2, dy = ops
        y = torch.mm(a, w2.t())
        return (y, torch.mm(dy, w2), torch.mm(dy.t(), a)) if backward else y
    return call


def _check_samples(n: int, b: int, c: int, d: int, backward: bool, has_bias: bool):
    """y, dz, dx on a sample of whole rows (``k·max(b·c, d·c, d·b)`` elements of the reference's
    3-D products; first and last row always in); dw and db, sums over every row, on a sample of
    output features j (``N·k·max(b, c)`` elements; at least 8, first and last always in)."""
    def samples(inputs: Inputs, max_elems: int, gen: torch.Generator) -> List[CheckSample]:
        z, x = inputs["z"].detach().reshape(n, b), inputs["x"].detach().reshape(n, c)
        w = inputs["w"].detach()
        bias = inputs["bias"].detach() if has_bias else None
        _, rows = sample_index((n, max(b * c, d * c, d * b)), (1,), max_elems, gen)
        width = {"y": d, "dz": b, "dx": c}

        def sel(t: torch.Tensor, idx, dim: int = 0) -> torch.Tensor:
            return t if idx is None else t.index_select(dim, idx.to(t.device))

        def take_rows(name: str, t: torch.Tensor) -> torch.Tensor:
            return sel(t.reshape(n, width[name]), rows)

        r_in = {"z": sel(z, rows), "x": sel(x, rows), "w": w}
        if bias is not None:
            r_in["bias"] = bias
        if not backward:
            return [CheckSample(r_in, ("y",), take_rows,
                                lambda r: ref.bilinear_ref(r["z"], r["x"], r["w"], r.get("bias")))]
        dy = inputs["dy"].reshape(n, d)
        r_in["dy"] = sel(dy, rows)

        def ref_rows(r: Inputs) -> Outputs:
            dz, dx = ref.bilinear_grads_ref(r["z"], r["x"], r["w"], r["dy"])[:2]
            return ref.bilinear_ref(r["z"], r["x"], r["w"], r.get("bias")), dz, dx

        per_j = n * max(b, c)
        _, cols = sample_index((d, per_j), (1,), max(max_elems, 8 * per_j), gen)
        c_in = {"z": z, "x": x, "w": sel(w, cols), "dy": sel(dy, cols, 1)}
        parts = ("dw", "db") if has_bias else ("dw",)

        def ref_cols(r: Inputs) -> Outputs:
            return ref.bilinear_grads_ref(r["z"], r["x"], r["w"], r["dy"])[2:2 + len(parts)]

        return [CheckSample(r_in, ("y", "dz", "dx"), take_rows, ref_rows),
                CheckSample(c_in, parts, lambda name, t: sel(t, cols), ref_cols)]

    return samples


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """``fwd`` (y) and ``fwd+bwd`` (the forward, then all four gradients by
    ``torch.autograd.grad``; each output checked on its own scale). Baselines: ``eager`` =
    ``F.bilinear`` (ratios refer to it), ``einsum``, ``gemm`` (:func:`_gemm`). Bytes: each input
    read once, each output written once."""
    import mmkernels

    F = torch.nn.functional
    b, c, d = (int(case.params[k]) for k in ("b", "c", "d"))
    has_bias = bool(case.params.get("bias", True))
    n = math.prod(case.shape)
    names = ("z", "x", "w", "bias") if has_bias else ("z", "x", "w")
    esize = torch.empty((), dtype=case.dtype).element_size()
    elems = n * (b + c) + d * b * c + (d if has_bias else 0)  # z, x, w, bias
    fwd_flops = 2 * n * b * c * d
    shape_text = f"{'x'.join(map(str, case.shape)) or 'scalar'} ({b}x{c}->{d}){'' if has_bias else ' nobias'}"

    def fwd_of(fn):
        return lambda i: fn(i["z"], i["x"], i["w"], i.get("bias"))

    def einsum(z, x, w, bias=None):
        y = torch.einsum("...h,...i,jhi->...j", z, x, w)
        return y if bias is None else y + bias

    ours_fwd, eager_fwd, einsum_fwd = fwd_of(mmkernels.bilinear), fwd_of(F.bilinear), fwd_of(einsum)
    common = dict(case=case, passes=None, reduced_dims=(), shape_text=shape_text)

    fwd_base = {"eager": eager_fwd, "einsum": einsum_fwd, "gemm": _gemm(n, b, c, d, False)}
    fwd = Variant(direction="fwd", ours=ours_fwd, baselines=fwd_base,
                  reference=lambda i: ref.bilinear_ref(i["z"], i["x"], i["w"], i.get("bias")),
                  prepare=lambda raw: {k: raw[k] for k in names}, bytes_moved=(elems + n * d) * esize,
                  outputs=("y",), flops=fwd_flops, check_samples=_check_samples(n, b, c, d, False, has_bias),
                  **common)

    def prepare_fb(raw: Inputs) -> Inputs:
        out = {k: raw[k].detach().requires_grad_() for k in names}
        out["dy"] = raw["dy"]
        return out

    def reference_fb(i: Inputs) -> Outputs:
        dz, dx, dw, db = ref.bilinear_grads_ref(i["z"], i["x"], i["w"], i["dy"])
        y = ref.bilinear_ref(i["z"], i["x"], i["w"], i.get("bias"))
        return (y, dz, dx, dw, db) if has_bias else (y, dz, dx, dw)

    fb_base = {"eager": _fwd_bwd(eager_fwd, names), "einsum": _fwd_bwd(einsum_fwd, names),
               "gemm": _gemm(n, b, c, d, True)}
    fwd_bwd = Variant(direction="fwd+bwd", ours=_fwd_bwd(ours_fwd, names), baselines=fb_base,
                      reference=reference_fb, prepare=prepare_fb,
                      bytes_moved=2 * (elems + n * d) * esize,  # read z, x, w, bias, dy; write y, dz, dx, dw, db
                      outputs=("y", "dz", "dx", "dw", "db") if has_bias else ("y", "dz", "dx", "dw"),
                      flops=3 * fwd_flops, check_samples=_check_samples(n, b, c, d, True, has_bias), **common)
    if compile_baseline:
        fwd_base["compile"] = compiled(lambda *ts: F.bilinear(*ts), names)
        fb_base["compile"] = _fwd_bwd(compiled(lambda *ts: F.bilinear(*ts), names), names)
    return [fwd, fwd_bwd]


def targets() -> List[Target]:
    """GPU, bf16, b = c = d = 256; N = 8192 and N = 64. ratio = F.bilinear time / ours; frac_mm =
    (useful FLOPs / time) / measured bf16 mm rate."""

    def rows(direction: str, n: int):
        def applies(r: Mapping[str, Any]) -> bool:
            p = r.get("params") or {}
            return (r.get("family") == "bilinear" and r.get("direction") == direction
                    and list(r.get("shape", ())) == [n] and r.get("dtype") == "bfloat16"
                    and (p.get("b"), p.get("c"), p.get("d")) == (256, 256, 256))
        return applies

    big, small = "(N=8192, b=c=d=256, bf16)", "(N=64, b=c=d=256, bf16)"
    return [
        Target(f"bilinear fwd >= 70% of the bf16 mm rate {big}", "frac_mm", 0.70, rows("fwd", 8192)),
        Target(f"bilinear fwd >= 10x F.bilinear {big}", "ratio", 10.0, rows("fwd", 8192)),
        Target(f"bilinear fwd+bwd >= 55% of the bf16 mm rate {big}", "frac_mm", 0.55, rows("fwd+bwd", 8192)),
        Target(f"bilinear fwd+bwd >= 10x F.bilinear {big}", "ratio", 10.0, rows("fwd+bwd", 8192)),
        Target(f"bilinear fwd faster than F.bilinear {small}", "ratio", 1.0, rows("fwd", 64)),
        Target(f"bilinear fwd+bwd faster than F.bilinear {small}", "ratio", 1.0, rows("fwd+bwd", 64)),
    ]


# ----------------------------------------------------------------------------------------------
# Compile-tier launches
# ----------------------------------------------------------------------------------------------

_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _meta(shape, dtype: torch.dtype, aligned: bool) -> torch.Tensor:
    """A meta tensor: contiguous, or one element past an aligned storage start (odd pointers)."""
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty(math.prod(shape) + 1, dtype=dtype, device="meta")[1:].view(shape)


@contextlib.contextmanager
def _tf32(on: bool):
    """torch's fp32 matmul precision ("high": TF32 allowed) for the block."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if on else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _launch(kernel: str, cfg, dtype: torch.dtype, target: int, aligned: bool = True, int64: bool = False,
            strided_w: bool = False, need=(True, True), split: bool = False, triangular: bool = False) -> None:
    """One launch of ``kernel`` at ``cfg`` through the op's launchers, on meta tensors whose sizes
    and strides are multiples of 16 and c, d of every tile (``aligned``) or odd; ``split``: the reduction split in two
    (partial planes summed by ``bilinear_sum_planes_kernel``), else not split; ``triangular``: the
    quadratic layer's packed weight (b = c)."""
    b = 32 if aligned else 17
    c = 256 if aligned else 19  # aligned: multiples of every tile (unmasked column loads, EVEN)
    d = 256 if aligned else 13
    if triangular:
        b = c
    n = (1 << 31) // b + 16 if int64 else 256 if aligned else 37  # int64: z passes 2**31 elements
    z, x = _meta((n, b), dtype, aligned), _meta((n, c), dtype, aligned)
    if triangular:
        w = _meta((d, c * (c + 1) // 2), dtype, aligned)
    elif strided_w:  # no unit stride and not contiguous over (h, i)
        w = torch.empty((d, 2 * b, 2 * c), dtype=dtype, device="meta")[:, ::2, ::2]
    else:
        w = _meta((d, b, c), dtype, aligned)
    arch = target // 10
    if kernel == "bilinear_fwd_kernel":
        B.bilinear_forward_triton(z, x, w, _meta((d,), dtype, aligned), config=cfg, h_splits=2 if split else 1,
                                  triangular=triangular, arch=arch)
        return
    dy = _meta((n, d), dtype, aligned)
    base = B.resolve_configs(n, b, c, d, B.dtype_class(dtype), arch, aligned and not triangular and not strided_w)
    if kernel == "bilinear_bwd_dzdx_kernel":
        B.bilinear_backward_triton(z, x, w, dy, need_dz=need[0], need_dx=need[1], need_dw=False,
                                   configs=dataclasses.replace(base, dzdx=cfg), h_splits=2 if split else 1,
                                   triangular=triangular, arch=arch)
    else:
        B.bilinear_backward_triton(z, x, w, dy, need_dz=False, need_dx=False, need_dw=True,
                                   configs=dataclasses.replace(base, dw=cfg), n_splits=2 if split else 1,
                                   triangular=triangular, arch=arch)


def launches(rec, target: int) -> None:
    """Every ``(kernel, config, dtype class)`` of :func:`mmkernels.ops.bilinear.launch_configs`
    for the target's arch, on the operands it is resolved for: 16-bit configs in bf16 (fp16 too
    at the largest), ``tf32`` configs in fp32 with TF32 dots, ``ieee`` in fp32 with IEEE dots and
    ``fp64`` in float64 (FMA units: no tensor-core requirement). Configs for aligned operands run
    on aligned ones (at the largest also with int64 offsets, the reduction split into partial
    planes summed by ``bilinear_sum_planes_kernel``, and dz only / dx only); configs for the
    others on odd sizes and pointers (at the largest also split with int64 offsets, the quadratic
    layer's packed weight, split or not, and a weight strided along every dim)."""
    alignments: Dict[Any, set] = {}
    for kernel, cfg, dclass, arch, aligned in B.launch_configs():
        if arch == target // 10:
            alignments.setdefault((kernel, cfg, dclass), set()).add(aligned)

    def size(cfg):
        return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))

    largest: Dict[Any, Any] = {}
    for (kernel, cfg, dclass), flags in alignments.items():
        for aligned in flags:
            key = (kernel, dclass, aligned)
            if key not in largest or size(cfg) > size(largest[key]):
                largest[key] = cfg
    for (kernel, cfg, dclass), flags in alignments.items():
        first = {"16bit": "bf16", "fp64": "fp64"}.get(dclass, "fp32")
        variants = []
        if True in flags:
            variants.append((first, {}))
            if cfg == largest[(kernel, dclass, True)]:
                if dclass == "16bit":
                    variants.append(("fp16", {}))  # fp16 builds the same code: at the largest config only
                variants += [(f"{first} int64", dict(int64=True)), (f"{first} split", dict(split=True)),
                             (f"{first} split int64", dict(split=True, int64=True))]
                if kernel == "bilinear_bwd_dzdx_kernel":
                    variants += [(f"{first} dz only", dict(need=(True, False))),
                                 (f"{first} dx only", dict(need=(False, True)))]
        if False in flags:
            variants.append((f"{first} unaligned", dict(aligned=False)))
            if cfg == largest[(kernel, dclass, False)]:
                variants += [(f"{first} unaligned split int64", dict(aligned=False, split=True, int64=True)),
                             (f"{first} triangular", dict(triangular=True)),
                             (f"{first} triangular split", dict(triangular=True, split=True))]
                if kernel != "bilinear_bwd_dw_kernel":
                    variants.append((f"{first} strided w", dict(strided_w=True)))
        expect = {"mma": None} if dclass in ("ieee", "fp64") else None
        for label, kw in variants:
            with _tf32(dclass == "tf32"), rec.variant(label if dclass == "16bit" else f"{label} {dclass}",
                                                     expect=expect):
                _launch(kernel, cfg, _STORAGE[label.split()[0]], target, **kw)


FAMILY = Family(name="bilinear", summary="sigma-pi / bilinear contractions (F.bilinear, Quadratic, HyperLinear)",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                cpp_ops=("bilinear_forward", "bilinear_backward"))
