"""A whole MoE layer's forward and backward captured in one CUDA graph and replayed: the routing
and experts path reads nothing back to the host with capacity off (a host read fails the capture),
so a training or decoding step can be graph-captured. Needs CUDA; skipped, with the reason, elsewhere."""
import pytest
import torch

from mmkernels import nn as mnn
from mmkernels import testing as mt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")


@pytest.mark.parametrize("kwargs", [{}, dict(shared_expert_size=32),
                                    dict(scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5)],
                         ids=["moe", "shared-expert", "deepseek"])
def test_moe_layer_forward_and_backward_in_one_cuda_graph(kwargs):
    torch.manual_seed(0)
    layer = mnn.MoE(64, 96, 16, 4, **kwargs).cuda()
    params = list(layer.parameters())
    static_x = torch.randn(48, 64, device="cuda", requires_grad=True)
    static_g = torch.randn(48, 64, device="cuda")

    def step():
        out = layer(static_x).output
        grads = torch.autograd.grad(out, [static_x] + params, static_g)
        return out, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream: compiles the kernels, fills the caches
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step()

    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(48, 64, device="cuda", generator=gen)
        g = torch.randn(48, 64, device="cuda", generator=gen)
        static_x.data.copy_(x)
        static_g.copy_(g)
        graph.replay()
        torch.cuda.synchronize()
        xe = x.clone().requires_grad_()
        out = layer(xe).output
        want = torch.autograd.grad(out, [xe] + params, g)
        mt.assert_close(static_out, out.double(), backend="triton")
        for got, w in zip(static_grads, want):
            mt.assert_close(got, w.double(), backend="triton", magnitude=w.abs() + 1e-3)
