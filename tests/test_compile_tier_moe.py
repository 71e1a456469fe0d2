"""MoE kernels in the compile tier — routing and experts, sm_80 and sm_90, no local memory at any
launch config, tensor-core instructions (HGMMA on sm_90) in every bf16 / fp16 expert GEMM — and the
launch count of one routing (three kernels, no host synchronisation in between; one when the
tokens fit one block)."""
import re

import pytest
import torch

import mmkernels
from mmkernels import moe
from mmkernels._triton import routing as K
from mmkernels.ops import routing as R
from mmkernels.ops._util import next_pow2
from tests.conftest import assert_compiled_clean, backends, compile_family, record_launches

COMPILE_TARGETS = (80, 90)
KERNELS = ("route_topk_kernel", "route_scan_kernel", "route_scatter_kernel", "route_block_kernel", "route_bwd_kernel")


EXPERT_KERNELS = ("experts_up_kernel", "experts_rows_kernel", "experts_combine_kernel", "experts_dact_kernel",
                  "experts_dweight_kernel", "experts_gather_kernel", "experts_dw_kernel")
EXPERT_GEMMS = ("experts_up_kernel", "experts_rows_kernel", "experts_dact_kernel",
                "experts_dweight_kernel")


@pytest.fixture(scope="module")
def experts_results():
    return compile_family("experts", COMPILE_TARGETS)


@pytest.mark.compile
def test_experts_compile_without_local_memory_and_with_hgmma(experts_results):
    assert_compiled_clean(experts_results, EXPERT_KERNELS, COMPILE_TARGETS)
    for kernel in EXPERT_GEMMS:  # the EXPECTATIONS enforce it; say it here too, per kernel
        built = [r for r in experts_results if r.kernel == kernel and r.target == 90 and r.variant.startswith("bf16")
                 and (kernel == "experts_dweight_kernel" or not r.variant.endswith("bm=16"))]  # decode: HMMA
        assert built and all("HGMMA" in (r.mma or []) for r in built), kernel
        assert any(r.variant.endswith("bm=128") for r in built), kernel  # the tiles taken at large T


@pytest.fixture(scope="module")
def routing_results():
    return compile_family("routing", COMPILE_TARGETS)


@pytest.mark.compile
def test_routing_compiles_without_local_memory(routing_results):
    assert_compiled_clean(routing_results, KERNELS, COMPILE_TARGETS)
    assert {r.kernel for r in routing_results} == set(KERNELS)
    # every router style and dtype class the jobs promise was compiled
    variants = {r.variant for r in routing_results if r.kernel == "route_topk_kernel"}
    assert {"fp32 mixtral", "bf16 qwen3", "fp32 deepseek", "fp32 given ids", "fp64 mixtral"} <= variants
    # the one-block kernel (a few tokens) at every padded expert count the routing takes
    block = {int(re.search(r"E_PAD=(\d+)", r.config).group(1)) for r in routing_results
             if r.kernel == "route_block_kernel"}
    assert block == {1, 2, 8, 64, 128, 256, 1024, next_pow2(R.MAX_EXPERTS)}


@pytest.mark.parametrize("backend,device", [p for p in backends() if p.values[0] == "triton"])
@pytest.mark.parametrize("kwargs", [{}, dict(scoring="sigmoid", selection_bias=torch.zeros(64), n_groups=8,
                                             topk_groups=4, routed_scaling=2.5), dict(capacity_factor=1.0)],
                         ids=["mixtral", "deepseek", "capacity"])
@pytest.mark.parametrize("tokens", [300, 4])
def test_route_is_three_launches_or_one_block(monkeypatch, backend, device, kwargs, tokens):
    """One routing = the router, the scan and the scatter — one launch of the three in one
    program when the tokens fit one router block (decode)."""
    mmkernels.set_backend(backend)
    calls = record_launches(monkeypatch, K, KERNELS)
    logits = torch.randn(tokens, 64, device=device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with torch.no_grad():
        moe.route(logits, 8, **kwargs)
    want = ["route_topk_kernel", "route_scan_kernel", "route_scatter_kernel"] if tokens > 32 else ["route_block_kernel"]
    assert [name for name, _, _ in calls] == want
