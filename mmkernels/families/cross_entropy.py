"""The cross-entropy family: ``F.cross_entropy`` with class indices, fused (:func:`mmkernels.cross_entropy`),
and the output layer's loss without its logits (:func:`mmkernels.linear_cross_entropy`).

Cases: op ``cross_entropy``, shape ``(N, C)``, param ``label_smoothing``; inputs ``logits`` and
``target`` with every 16th row ignored (``-100``). Bench: forward + backward against
``F.cross_entropy``; bytes: the logits read twice and their gradient written. Op
``linear_cross_entropy``, shape ``(tokens, hidden, vocab)``: inputs ``input``, ``linear_weight``,
``target``; forward + backward against ``F.cross_entropy(F.linear(...))`` (and
``F.linear_cross_entropy`` with its chunking options), FLOPs those of the three GEMMs. Compile tier: every
config of :func:`mmkernels.ops.cross_entropy.launch_configs` in fp32 with label smoothing; at
C = 32000 also bf16, fp16, fp64, no smoothing, smoothing 1, every loss term and int64 offsets;
the logits-free forward's GEMM (:func:`mmkernels.ops.linear_cross_entropy.triton_stats`) in bf16,
fp16, fp32 with TF32 and IEEE dots, with every term, few tokens at odd sizes and int64 offsets.
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch

from mmkernels import reference as ref
from mmkernels.family import (Case, CheckSample, Family, Inputs, Target, Variant, case_builder, fwd_bwd_variant,
                              randn, rows_of)
from mmkernels.ops import cross_entropy as CE
from mmkernels.ops import linear_cross_entropy as LCE

_case = case_builder("cross_entropy")


def cases() -> List[Case]:
    return [
        _case("cross_entropy", (1024, 32000), torch.float32, {"bench"}, label_smoothing=0.1),
        _case("cross_entropy", (8192, 32000), torch.bfloat16, {"gpu"}, label_smoothing=0.1),
        _case("cross_entropy", (8192, 32000), torch.float32, {"gpu"}, label_smoothing=0.1),
        _case("cross_entropy", (16, 300), torch.float32, {"dry-run"}, label_smoothing=0.1),
        _case("linear_cross_entropy", (512, 256, 32000), torch.float32, {"bench"}, label_smoothing=0.1),
        _case("linear_cross_entropy", (16384, 4096, 128256), torch.bfloat16, {"gpu"}),
        _case("linear_cross_entropy", (64, 32, 300), torch.float32, {"dry-run"}, label_smoothing=0.1),
    ]


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    if case.op == "linear_cross_entropy":
        T, H, V = case.shape
        target = torch.randint(0, V, (T,), generator=gen, device=gen.device)
        target[::16] = -100
        return {"input": randn((T, H), case.dtype, device, gen), "target": target.to(device),
                "linear_weight": randn((V, H), case.dtype, device, gen, 2.0 / H ** 0.5)}
    N, C = case.shape
    target = torch.randint(0, C, (N,), generator=gen, device=gen.device)
    target[::16] = -100
    return {"logits": randn((N, C), case.dtype, device, gen, 2.0), "target": target.to(device)}


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward + backward (loss and d logits) vs ``F.cross_entropy``."""
    import mmkernels

    if case.op == "linear_cross_entropy":
        return [_linear_variant(case, compile_baseline)]
    N, C = case.shape
    eps = float(case.params.get("label_smoothing", 0.0))
    esize = torch.empty((), dtype=case.dtype).element_size()
    return [fwd_bwd_variant(
        case, ours=lambda i: mmkernels.cross_entropy(i["logits"], i["target"].long(), label_smoothing=eps),
        eager=lambda i: torch.nn.functional.cross_entropy(i["logits"], i["target"].long(), label_smoothing=eps),
        reference=lambda i: ref.cross_entropy_ref(i["logits"], i["target"].long(), label_smoothing=eps),
        wrt=("logits",), upstream=None, names=("logits", "target"), outputs=("loss", "dlogits"),
        bytes_moved=3 * N * C * esize, compile_baseline=compile_baseline)]


def _linear_variant(case: Case, compile_baseline: bool) -> Variant:
    """Forward + backward (loss, d input, d weight) vs the unfused ``F.linear`` + ``F.cross_entropy``."""
    import mmkernels

    T, H, V = case.shape
    eps = float(case.params.get("label_smoothing", 0.0))
    esize = torch.empty((), dtype=case.dtype).element_size()
    F = torch.nn.functional
    variant = fwd_bwd_variant(
        case, ours=lambda i: mmkernels.linear_cross_entropy(i["input"], i["linear_weight"], i["target"].long(),
                                                            label_smoothing=eps),
        eager=lambda i: F.cross_entropy(F.linear(i["input"], i["linear_weight"]), i["target"].long(),
                                        label_smoothing=eps),
        reference=lambda i: ref.linear_cross_entropy_ref(i["input"], i["linear_weight"], i["target"],
                                                         label_smoothing=eps)[0],
        wrt=("input", "linear_weight"), upstream=None, names=("input", "linear_weight", "target"),
        outputs=("loss", "dinput", "dlinear_weight"), bytes_moved=3 * (T * H + V * H) * esize,
        flops=6 * T * H * V, compile_baseline=compile_baseline)
    if T * V <= REFERENCE_LOGITS_MAX:
        return variant
    why = (f"{T} x {V} logits: the float64 reference of the loss and d W is {6 * T * H * V / 1e12:.0f} TFLOP "
           f"on the CPU; the same code is compared in full on the smaller cases")
    return dataclasses.replace(variant, check_samples=lambda inputs, max_elems, gen: [_row_sample(inputs, eps, gen)],
                               unchecked={"loss": why, "dlinear_weight": why})


#: Above this many logits the float64 reference (three GEMMs on the CPU) runs on a sample of tokens.
REFERENCE_LOGITS_MAX = 1 << 26


def _row_sample(inputs: Inputs, eps: float, gen: torch.Generator) -> CheckSample:
    """d input on 256 tokens (the first, the last and random ones): with the mean reduction a row
    of d input is that token's own gradient over the count of every token kept, so the reference
    runs on the sampled tokens (sum) and divides by the whole count. The loss and d W sum over all
    tokens: at this size they are checked for finiteness only (in full on the smaller cases)."""
    T = inputs["input"].shape[0]
    idx = torch.cat([torch.tensor([0, T - 1]), torch.randperm(T, generator=gen)[:254]]).unique()
    count = float((inputs["target"] != -100).sum())
    dev_idx = idx.to(inputs["input"].device)
    sample = {"input": inputs["input"][dev_idx], "linear_weight": inputs["linear_weight"],
              "target": inputs["target"][dev_idx]}

    def reference(i):
        x = i["input"].detach().requires_grad_()
        loss, _ = ref.linear_cross_entropy_ref(x, i["linear_weight"], i["target"], reduction="sum",
                                               label_smoothing=eps)
        (dx,) = torch.autograd.grad(loss / count, (x,))
        return (dx,)

    return CheckSample(sample, ("dinput",), lambda n, t: t[dev_idx], reference)


def targets() -> List[Target]:
    big = rows_of("cross_entropy", op="linear_cross_entropy", shape=(16384, 4096, 128256), dtype="bfloat16")
    return [Target("cross-entropy fwd+bwd >= 2x F.cross_entropy (8192 x 32000 bf16, GPU)", "ratio", 2.0,
                   rows_of("cross_entropy", op="cross_entropy", shape=(8192, 32000), dtype="bfloat16")),
            Target("linear cross-entropy fwd+bwd >= 60% of the bf16 mm rate (16384 x 4096 x 128256, GPU)",
                   "frac_mm", 0.60, big),
            Target("linear cross-entropy CPU fwd+bwd time <= 1.2x the unfused composition (512 x 256 x 32000)",
                   "ratio", 1 / 1.2, rows_of("cross_entropy", op="linear_cross_entropy", shape=(512, 256, 32000)))]


def launches(rec, target: int) -> None:
    """Forward and backward on meta tensors; see the module docstring for the coverage."""
    def launch(N, C, variant, dtype=torch.float32, eps=0.1, weighted=False, z_loss=0.0, softcap=0.0, tlp=False):
        x = torch.empty((N, C), dtype=dtype, device="meta")
        t = torch.empty((N,), dtype=torch.int64, device="meta")
        w = torch.empty((C,), dtype=torch.float32, device="meta") if weighted else None
        terms = CE.LossTerms(-100, eps, z_loss, softcap)
        with rec.variant(variant, config=f"BLOCK_C={CE.resolve_config(C, dtype == torch.float64).block_c}"):
            loss, lse, _ = CE.triton_forward(x, t, terms, w, tlp)
            g = torch.empty((), dtype=lse.dtype, device="meta").reshape(1).expand(N)
            CE.triton_backward(x, t, lse, g, terms, w, torch.empty_like(x))

    for cfg in CE.launch_configs():
        launch(64, cfg.block_c, "fp32 smoothing")
    launch(64, 32000, "fp32 smoothing")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        launch(64, 32000, str(dtype)[6:], dtype)
    launch(64, 32000, "fp32 no smoothing", eps=0.0)
    launch(64, 32000, "fp32 smoothing 1", eps=1.0)
    launch(64, 32000, "fp32 every term", weighted=True, z_loss=1e-4,
           softcap=30.0, tlp=True)
    launch(64, 32000, "bf16 every term", torch.bfloat16, weighted=True, z_loss=1e-4, softcap=30.0, tlp=True)
    launch(64, 32000, "fp64 every term", torch.float64, weighted=True, z_loss=1e-4, softcap=30.0, tlp=True)
    launch(1 << 17, 32000, "fp32 int64 offsets")

    def stats(T, H, V, variant, dtype=torch.bfloat16, tf32=True, every_term=False, int64=False):
        x = torch.empty((T, H), dtype=dtype, device="meta")
        w = torch.empty((V, H), dtype=dtype, device="meta")
        b = torch.empty((V,), dtype=dtype, device="meta") if every_term else None
        t = torch.empty((T,), dtype=torch.int64, device="meta")
        cw = torch.empty((V,), dtype=torch.float32, device="meta") if every_term else None
        terms = CE.LossTerms(-100, 0.1, 1e-4, 30.0) if every_term else CE.LossTerms()
        ieee = dtype == torch.float32 and not tf32
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            with rec.variant(variant, expect={"mma": None} if ieee else None):
                LCE.triton_stats(x, w, b, t, cw, terms, arch=target // 10)
        finally:
            torch.set_float32_matmul_precision(saved)

    stats(16384, 4096, 128256, "linear bf16")
    stats(16384, 4096, 128256, "linear bf16 every term", every_term=True)
    stats(4096, 1024, 32000, "linear fp16", torch.float16)
    stats(4096, 1024, 32000, "linear fp32 tf32", torch.float32)
    stats(4096, 1024, 32000, "linear fp32 ieee", torch.float32, tf32=False)
    stats(64, 1000, 50257, "linear bf16 few tokens odd sizes", every_term=True)
    stats(1 << 19, 4096, 128256, "linear bf16 int64 offsets")


FAMILY = Family(name="cross_entropy", summary="fused cross-entropy with class indices (no probabilities in memory)",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches)
