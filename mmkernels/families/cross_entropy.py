"""The cross-entropy family: ``F.cross_entropy`` with class indices, fused (:func:`mmkernels.cross_entropy`).

Cases: op ``cross_entropy``, shape ``(N, C)``, param ``label_smoothing``; inputs ``logits`` and
``target`` with every 16th row ignored (``-100``). Bench: forward + backward against
``F.cross_entropy``; bytes: the logits read twice and their gradient written. Compile tier: every
config of :func:`mmkernels.ops.cross_entropy.launch_configs` in fp32 with label smoothing; at
C = 32000 also bf16, fp16, fp64, no smoothing, smoothing 1 and int64 offsets.
"""
from __future__ import annotations

from typing import List

import torch

from mmkernels import reference as ref
from mmkernels.family import Case, Family, Inputs, Target, Variant, case_builder, fwd_bwd_variant, randn, rows_of
from mmkernels.ops import cross_entropy as CE

_case = case_builder("cross_entropy")


def cases() -> List[Case]:
    return [
        _case("cross_entropy", (1024, 32000), torch.float32, {"bench"}, label_smoothing=0.1),
        _case("cross_entropy", (8192, 32000), torch.bfloat16, {"gpu"}, label_smoothing=0.1),
        _case("cross_entropy", (8192, 32000), torch.float32, {"gpu"}, label_smoothing=0.1),
        _case("cross_entropy", (16, 300), torch.float32, {"dry-run"}, label_smoothing=0.1),
    ]


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    N, C = case.shape
    target = torch.randint(0, C, (N,), generator=gen, device=gen.device)
    target[::16] = -100
    return {"logits": randn((N, C), case.dtype, device, gen, 2.0), "target": target.to(device)}


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward + backward (loss and d logits) vs ``F.cross_entropy``."""
    import mmkernels

    N, C = case.shape
    eps = float(case.params.get("label_smoothing", 0.0))
    esize = torch.empty((), dtype=case.dtype).element_size()
    return [fwd_bwd_variant(
        case, ours=lambda i: mmkernels.cross_entropy(i["logits"], i["target"].long(), label_smoothing=eps),
        eager=lambda i: torch.nn.functional.cross_entropy(i["logits"], i["target"].long(), label_smoothing=eps),
        reference=lambda i: ref.cross_entropy_ref(i["logits"], i["target"].long(), label_smoothing=eps),
        wrt=("logits",), upstream=None, names=("logits", "target"), outputs=("loss", "dlogits"),
        bytes_moved=3 * N * C * esize, compile_baseline=compile_baseline)]


def targets() -> List[Target]:
    return [Target("cross-entropy fwd+bwd >= 2x F.cross_entropy (8192 x 32000 bf16, GPU)", "ratio", 2.0,
                   rows_of("cross_entropy", op="cross_entropy", shape=(8192, 32000), dtype="bfloat16"))]


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


FAMILY = Family(name="cross_entropy", summary="fused cross-entropy with class indices (no probabilities in memory)",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches)
