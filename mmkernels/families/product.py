"""The product family: product units ``o_k = Σ_j v_kj Π_i x_i^{w_ji}`` in log space
(:func:`mmkernels.product_unit`), sigma-pi units over given conjuncts (:func:`mmkernels.sigma_pi_unit`)
and the pi-sigma network (:func:`mmkernels.pi_sigma`).

Cases: ops ``product_unit`` (shape ``(N, I, J, K)``), ``sigma_pi_unit`` (``(N, n, Q, m, K)``: Q
random conjuncts of up to m factors) and ``pi_sigma`` (``(N, n, K, S)``). Bench: forward +
backward against the same formula in torch ops / a loop over the conjuncts / an einsum and a
product. Compile tier: the product-unit kernels (forward terms, weight gradient; one tile
config) with fp32, bf16, fp16 and fp64 inputs and a transposed x.
"""
from __future__ import annotations

import math
from typing import List

import torch

from mmkernels import reference as ref
from mmkernels.family import Case, Family, Inputs, Variant, case_builder, fwd_bwd_variant, randn
from mmkernels.ops import product as P

_case = case_builder("product")


def cases() -> List[Case]:
    f32 = torch.float32
    return [
        _case("product_unit", (4096, 64, 64, 32), f32, {"bench"}),        # N, I, J, K
        _case("sigma_pi_unit", (4096, 64, 256, 3, 16), f32, {"bench"}),   # N, n, Q, m, K
        _case("pi_sigma", (8192, 256, 16, 4), f32, {"bench"}),            # N, n, K, S
        _case("product_unit", (65536, 256, 256, 256), f32, {"gpu"}),
        _case("sigma_pi_unit", (65536, 256, 1024, 3, 64), f32, {"gpu"}),
        _case("pi_sigma", (65536, 1024, 64, 4), torch.bfloat16, {"gpu"}),
        _case("product_unit", (40, 9, 7, 3), f32, {"dry-run"}),
        _case("sigma_pi_unit", (10, 6, 5, 3, 2), f32, {"dry-run"}),
        _case("pi_sigma", (10, 6, 3, 2), f32, {"dry-run"}),
    ]


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    if case.op == "product_unit":
        N, I, J, K = case.shape
        mag = torch.rand((N, I), generator=gen, dtype=torch.float64, device=gen.device) * 1.5 + 0.5
        sign = torch.where(torch.rand((N, I), generator=gen, device=gen.device) < 0.3, -1.0, 1.0).to(mag.dtype)
        return {"x": (mag * sign).to(device=device, dtype=case.dtype),
                "weight": randn((J, I), case.dtype, device, gen, 0.3 * I ** -0.5),
                "out_weight": randn((K, J), case.dtype, device, gen, J ** -0.5),
                "dout": randn((N, K), case.dtype, device, gen)}
    if case.op == "sigma_pi_unit":
        N, n, Q, m, K = case.shape
        conj = torch.randint(0, n, (Q, m), generator=gen, device=gen.device)
        conj[::3, -1] = -1  # every third conjunct one factor shorter
        return {"z": randn((N, n), case.dtype, device, gen), "conjuncts": conj.to(device),
                "weight": randn((K, Q), case.dtype, device, gen, Q ** -0.5), "bias": randn((K,), case.dtype, device, gen),
                "dout": randn((N, K), case.dtype, device, gen)}
    N, n, K, S = case.shape
    return {"z": randn((N, n), case.dtype, device, gen), "weight": randn((K, S, n), case.dtype, device, gen, n ** -0.5),
            "bias": randn((K, S), case.dtype, device, gen), "dout": randn((N, K), case.dtype, device, gen)}


def eager_product_unit(x, weight, out_weight):
    """Product units in log space with torch ops (what the CPU path computes)."""
    lg = torch.log(x.abs().clamp_min(2.0 ** -100))
    neg = (x < 0).to(x.dtype)
    return (torch.exp(lg @ weight.T) * torch.cos(math.pi * (neg @ weight.T))) @ out_weight.T


def loop_sigma_pi(z, conjuncts, weight, bias):
    """Sigma-pi units with a Python loop over the conjuncts."""
    feats = []
    for q in conjuncts.tolist():
        f = torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
        for i in q:
            if i >= 0:
                f = f * z[..., i]
        feats.append(f)
    return torch.stack(feats, dim=-1) @ weight.T + bias


def eager_pi_sigma(z, weight, bias):
    return (torch.einsum("nd,ksd->nks", z, weight) + bias).prod(dim=-1)


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """Forward + backward of each op against the composition users write."""
    import mmkernels

    esize = torch.empty((), dtype=case.dtype).element_size()
    common = dict(upstream="dout", compile_baseline=compile_baseline)
    if case.op == "product_unit":
        N, I, J, K = case.shape
        wrt = ("x", "weight", "out_weight")
        return [fwd_bwd_variant(case, ours=lambda i: mmkernels.product_unit(*(i[n] for n in wrt)),
                                eager=lambda i: eager_product_unit(*(i[n] for n in wrt)),
                                reference=lambda i: ref.product_unit_ref(*(i[n] for n in wrt)), wrt=wrt,
                                names=wrt + ("dout",), outputs=("out", "dx", "dweight", "dout_weight"),
                                bytes_moved=(2 * N * I + N * K) * esize, flops=3 * 2 * N * (2 * I * J + J * K),
                                **common)]
    if case.op == "sigma_pi_unit":
        N, n, Q, m, K = case.shape
        args = lambda i: (i["z"], i["conjuncts"].long(), i["weight"], i["bias"])  # noqa: E731
        return [fwd_bwd_variant(case, ours=lambda i: mmkernels.sigma_pi_unit(*args(i)),
                                eager=lambda i: loop_sigma_pi(*args(i)), reference=lambda i: ref.sigma_pi_unit_ref(*args(i)),
                                wrt=("z", "weight", "bias"), names=("z", "conjuncts", "weight", "bias", "dout"),
                                outputs=("out", "dz", "dweight", "dbias"), bytes_moved=(2 * N * n + N * K) * esize,
                                flops=3 * 2 * N * Q * K, **common)]
    N, n, K, S = case.shape
    wrt = ("z", "weight", "bias")
    return [fwd_bwd_variant(case, ours=lambda i: mmkernels.pi_sigma(*(i[n] for n in wrt), activation=None),
                            eager=lambda i: eager_pi_sigma(*(i[n] for n in wrt)),
                            reference=lambda i: ref.pi_sigma_ref(*(i[n] for n in wrt)), wrt=wrt,
                            names=wrt + ("dout",), outputs=("out", "dz", "dweight", "dbias"),
                            bytes_moved=(2 * N * n + N * K) * esize, flops=3 * 2 * N * n * K * S, **common)]


def launches(rec, target: int) -> None:
    """The product-unit kernels on meta tensors; see the module docstring."""
    cfg = P.resolve_config(1, 1, 1)

    def launch(variant, dtype=torch.float32, transposed=False):
        x = torch.empty((256, 512), dtype=dtype, device="meta").t() if transposed else \
            torch.empty((512, 256), dtype=dtype, device="meta")
        w = torch.empty((128, 256), dtype=dtype, device="meta")
        with rec.variant(variant, config=f"BLOCK={cfg.block_m}x{cfg.block_n}x{cfg.block_k}"):
            a, b = P.triton_terms(x, w)
            P.triton_dweight(x, a, b, w.dtype)

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        launch(str(dtype)[6:], dtype)
    launch("fp32 transposed x", transposed=True)


FAMILY = Family(name="product", summary="product units (log space), sigma-pi units and the pi-sigma network",
                cases=cases, inputs=inputs, variants=variants, launches=launches,
                cpp_ops=("product_exp_cis_", "product_dx_", "product_over_last", "product_over_last_backward"))
