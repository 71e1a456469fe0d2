"""The gating family: gated fusion ``g = σ([a, b]·Wᵀ + c)``, ``g·a + (1 - g)·b``
(:func:`mmkernels.gated_fusion`), and its fused blend alone (``ops.gating.GatedBlendFunction``).

Cases: ops ``gated_fusion`` (shape ``(R, D)``; inputs a, b, weight (D, 2D), bias (D,), dout) and
``gated_blend`` (shape ``(R, D)``; inputs pre, a, b, dout). Bench: forward + backward against cat +
linear + sigmoid + blend (the blend: ``lerp(b, a, sigmoid(pre))``). Compile tier: the blend
kernels in fp32, bf16, fp16, fp64, with a strided pathway and with int64 offsets.
"""
from __future__ import annotations

from typing import List

import torch

from mmkernels import reference as ref
from mmkernels.family import Case, Family, Inputs, Target, Variant, case_builder, fwd_bwd_variant, randn, rows_of
from mmkernels.ops import gating as G

_case = case_builder("gating")


def cases() -> List[Case]:
    out = [_case("gated_fusion", (8192, 512), torch.float32, {"bench"}),
           _case("gated_blend", (8192, 512), torch.float32, {"bench"})]
    for dt in (torch.float32, torch.bfloat16):
        out += [_case("gated_fusion", (65536, 1024), dt, {"gpu"}), _case("gated_blend", (65536, 1024), dt, {"gpu"})]
    out += [_case("gated_fusion", (10, 24), torch.float32, {"dry-run"}),
            _case("gated_blend", (10, 24), torch.float16, {"dry-run"})]
    return out


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    R, D = case.shape
    if case.op == "gated_blend":
        return {n: randn((R, D), case.dtype, device, gen, 2.0 if n == "pre" else 1.0) for n in ("pre", "a", "b", "dout")}
    return {"a": randn((R, D), case.dtype, device, gen), "b": randn((R, D), case.dtype, device, gen),
            "weight": randn((D, 2 * D), case.dtype, device, gen, (2 * D) ** -0.5),
            "bias": randn((D,), case.dtype, device, gen), "dout": randn((R, D), case.dtype, device, gen)}


def eager_gated_fusion(i: Inputs) -> torch.Tensor:
    """cat + linear + sigmoid + blend, as users write it."""
    g = torch.sigmoid(torch.nn.functional.linear(torch.cat([i["a"], i["b"]], dim=-1), i["weight"], i["bias"]))
    return g * i["a"] + (1 - g) * i["b"]


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward + backward. Gated fusion: outputs out, da, db, d weight, d bias; useful FLOPs the
    gate's GEMMs (3 x 4·R·D²). The blend alone: out, dpre, da, db; minimum traffic 11 tensors
    (forward pre, a, b, out; backward dout, pre, a, b, da, db, dpre) — the fusion's bytes too."""
    import mmkernels

    R, D = case.shape
    esize = torch.empty((), dtype=case.dtype).element_size()
    if case.op == "gated_fusion":
        wrt = ("a", "b", "weight", "bias")
        return [fwd_bwd_variant(
            case, ours=lambda i: mmkernels.gated_fusion(i["a"], i["b"], i["weight"], i["bias"]),
            eager=eager_gated_fusion, reference=lambda i: ref.gated_fusion_ref(i["a"], i["b"], i["weight"], i["bias"]),
            wrt=wrt, upstream="dout", names=wrt + ("dout",), outputs=("out", "da", "db", "dweight", "dbias"),
            bytes_moved=11 * R * D * esize, flops=3 * 2 * R * (2 * D) * D, compile_baseline=compile_baseline)]
    lerp = lambda i: torch.lerp(i["b"], i["a"], torch.sigmoid(i["pre"]))  # noqa: E731
    return [fwd_bwd_variant(case, ours=lambda i: G.GatedBlendFunction.apply(i["pre"], i["a"], i["b"]), eager=lerp,
                            reference=lerp,  # σ and a lerp: the eager ops in float64 are the reference
                            wrt=("pre", "a", "b"), upstream="dout", names=("pre", "a", "b", "dout"),
                            outputs=("out", "dpre", "da", "db"), bytes_moved=11 * R * D * esize,
                            compile_baseline=compile_baseline)]


def targets() -> List[Target]:
    return [Target("gated fusion blend fwd+bwd >= 80% of copy bandwidth (65536 x 1024, GPU)", "frac_copy", 0.80,
                   rows_of("gating", op="gated_blend", shape=(65536, 1024)))]


def launches(rec, target: int) -> None:
    """The blend's forward and backward on meta tensors (one config); see the module docstring."""
    def launch(R, D, variant, dtype=torch.float32, strided=False):
        a = torch.empty((R, D), dtype=dtype, device="meta")
        b = torch.empty((D, R), dtype=dtype, device="meta").t() if strided else torch.empty_like(a)
        pre = torch.empty_like(a)
        with rec.variant(variant, config=f"BLOCK={G.BLOCK}"):
            out = G.triton_forward(pre, a, b)
            G.triton_backward(torch.empty_like(out), pre, a, b)

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        launch(4096, 1024, str(dtype)[6:], dtype)
    launch(4096, 1024, "fp32 strided b", strided=True)
    launch(1 << 20, 4096, "fp32 int64 offsets")


FAMILY = Family(name="gating", summary="gated fusion and its fused gate blend",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                cpp_ops=("gated_blend_forward", "gated_blend_backward"))
