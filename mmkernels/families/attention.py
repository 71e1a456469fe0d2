"""The attention family: the attention module / soft switch ``s = Σ_j softmax(z/τ)_j x_j``
(:func:`mmkernels.attention_module`) and the hard switch ``x[argmax z]`` (:func:`mmkernels.hard_switch`).

Cases: ops ``attention`` and ``hard_switch``, shape ``(R, J, D)``; inputs z (R, J), x (R, J, D) and
an incoming gradient ds (R, D). Bench: forward + backward against softmax + einsum (a ``gather``
for the hard switch). Compile tier: every config of :func:`mmkernels.ops.attention.launch_configs`
in fp32 with a mask; at J = 8, D = 512 and at J = MAX_J also bf16, fp16, fp64, no mask and int64
offsets.
"""
from __future__ import annotations

from typing import List

import torch

from mmkernels import reference as ref
from mmkernels.family import Case, Family, Inputs, Target, Variant, case_builder, fwd_bwd_variant, randn, rows_of
from mmkernels.ops import attention as A

_case = case_builder("attention")


def cases() -> List[Case]:
    out = [_case("attention", (4096, 8, 256), torch.float32, {"bench"}),
           _case("hard_switch", (4096, 8, 256), torch.float32, {"bench"})]
    for dt in (torch.float32, torch.bfloat16):
        out += [_case("attention", (65536, 8, 512), dt, {"gpu"}), _case("hard_switch", (65536, 8, 512), dt, {"gpu"})]
    out += [_case("attention", (8, 5, 33), torch.float32, {"dry-run"}),
            _case("hard_switch", (8, 5, 33), torch.float32, {"dry-run"})]
    return out


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    R, J, D = case.shape
    return {"z": randn((R, J), case.dtype, device, gen, 2.0 if case.op == "attention" else 1.0),
            "x": randn((R, J, D), case.dtype, device, gen), "ds": randn((R, D), case.dtype, device, gen)}


def eager_attention(i: Inputs) -> torch.Tensor:
    """softmax + einsum, as users write it (math in float32, float64 for float64)."""
    p = torch.softmax(i["z"].float() if i["z"].dtype != torch.float64 else i["z"], dim=-1)
    return torch.einsum("rj,rjd->rd", p, i["x"].to(p.dtype)).to(i["x"].dtype)


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward + backward: the attention module (s, dz, dx); the hard switch (s, dx) vs ``gather``.
    Minimum traffic: forward reads z, x and writes s; backward reads z, x, s, ds, writes dz, dx."""
    import mmkernels

    R, J, D = case.shape
    esize = torch.empty((), dtype=case.dtype).element_size()
    if case.op == "attention":
        return [fwd_bwd_variant(
            case, ours=lambda i: mmkernels.attention_module(i["z"], i["x"]), eager=eager_attention,
            reference=lambda i: ref.attention_module_ref(i["z"], i["x"]), wrt=("z", "x"), upstream="ds",
            names=("z", "x", "ds"), outputs=("s", "dz", "dx"),
            bytes_moved=(2 * R * J + 2 * R * J * D + 3 * R * D + R * J * D + R * J) * esize,
            compile_baseline=compile_baseline)]

    def gather(i: Inputs) -> torch.Tensor:
        return i["x"].gather(1, i["z"].argmax(1)[:, None, None].expand(-1, 1, D)).squeeze(1)

    # the reference is the gather itself: a selection is exact in any dtype (hard_switch_ref, a
    # row-by-row loop, is the tests')
    return [fwd_bwd_variant(case, ours=lambda i: mmkernels.hard_switch(i["z"], i["x"]), eager=gather,
                            reference=gather, wrt=("x",), upstream="ds",
                            names=("z", "x", "ds"), outputs=("s", "dx"),
                            bytes_moved=(R * J + 2 * R * D + R * J * D + R * D) * esize,
                            compile_baseline=compile_baseline)]


def targets() -> List[Target]:
    return [Target("attention module fwd+bwd >= 80% of copy bandwidth (65536 x 8 x 512, GPU)", "frac_copy", 0.80,
                   rows_of("attention", op="attention", shape=(65536, 8, 512)))]


def launches(rec, target: int) -> None:
    """Forward and backward on meta tensors; see the module docstring for the coverage."""
    def launch(R, J, D, variant, dtype=torch.float32, masked=True):
        z = torch.empty((R, J), dtype=dtype, device="meta")
        x = torch.empty((R, J, D), dtype=dtype, device="meta")
        mask = torch.empty((R, J), dtype=torch.bool, device="meta") if masked else None
        cfg = A.resolve_config(J, D)
        with rec.variant(variant, config=f"BLOCK_J={cfg.block_j} BLOCK_D={cfg.block_d}"):
            s, lse = A.triton_forward(z, x, mask, 0.5)
            A.triton_backward(z, x, mask, s, lse, torch.empty_like(s), 0.5)

    for cfg in A.launch_configs():
        launch(64, cfg.block_j, cfg.block_d, "fp32 mask")
    for J, D in ((8, 512), (A.MAX_J, 64)):
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            launch(64, J, D, str(dtype)[6:], dtype)
        launch(64, J, D, "fp32 no mask", masked=False)
        launch((1 << 31) // (J * D) + 1, J, D, "fp32 int64 offsets")


FAMILY = Family(name="attention", summary="the attention module / soft switch and the hard switch",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                cpp_ops=("attention_forward", "attention_backward"))
