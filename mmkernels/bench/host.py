"""Host time of one MoE layer: what its forward and backward cost the CPU before any kernel runs —
argument checks, allocations, Python, autograd bookkeeping and the launch preparation of the Triton
path — measured on every machine: the layer runs its Triton path on CPU tensors with every kernel
of the routing and experts families recorded rather than launched (:func:`launches_recorded`), so
the figure is the host's share alone, without the device's. On a GPU the launches themselves (the
JIT's argument binding, the driver) come on top: the GPU suite measures the layer with its kernels
launched (``device``) and the public :func:`mmkernels.moe.route` call (:func:`route_host_time`).

:func:`moe_layer_host_time` is what the main job prints, for one layer and per layer in a stack
(:func:`host_time_line`); ``python -m mmkernels.bench.host`` prints that line alone.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from typing import Dict, Iterator, Optional, Sequence

import torch

from mmkernels import _backend

#: The families whose kernels a MoE layer launches.
MOE_FAMILIES = ("routing", "experts")


@contextlib.contextmanager
def launches_recorded(families: Sequence[str] = MOE_FAMILIES) -> Iterator[list]:
    """Within the block, the Triton path runs on CPU tensors and every public kernel of the
    families' kernel modules records its launch (kernel name and grid, in the yielded list)
    instead of running: outputs stay as allocated (uninitialised), everything before the launch
    is real."""
    calls: list = []
    patched = []

    class Recorded:
        def __init__(self, name: str, real):
            self.name, self.arg_names = name, real.arg_names  # positional launches bind by arg_names

        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append((self.name, grid))
            return launch

    for fam in families:
        module = importlib.import_module(f"mmkernels._triton.{fam}")
        for name in _backend.kernel_names(module):  # jitted, or interpreted under TRITON_INTERPRET=1
            value = getattr(module, name)
            patched.append((module, name, value))
            setattr(module, name, Recorded(name, value))
    real_interpreter = _backend.interpreter_active
    _backend.interpreter_active = lambda: True  # the Triton path on CPU tensors: nothing will run
    try:
        with _backend.use_backend("triton"):
            yield calls
    finally:
        _backend.interpreter_active = real_interpreter
        for module, name, value in patched:
            setattr(module, name, value)


def moe_layer_host_time(tokens: int = 16, hidden: int = 32, intermediate: int = 16, experts: int = 16,
                        top_k: int = 4, repeats: int = 200, warmup: int = 20, layers: int = 1,
                        device: Optional[torch.device] = None, **layer_kw) -> Dict[str, float]:
    """Median host microseconds of one ``mmkernels.nn.MoE`` layer's forward (router linear, route,
    experts) and backward, launches recorded (:func:`launches_recorded`); also the launches per
    forward and backward. Small sizes on purpose: on CPU tensors a large allocation's page faults
    would be counted, which a GPU's caching allocator does not pay.

    ``device`` a CUDA device: the layer runs there and its kernels are launched for real, so the
    figure includes the JIT's per-call binding and the driver's launch; each iteration waits for
    the GPU after its timed calls (the host time, not the device's, is measured), and the launch
    counts are None.

    ``layers`` > 1: a stack of that many layers (each with its own weights, each feeding the
    next) runs forward and then one ``backward`` from the last output, and the figures are per
    layer (the stack's time / ``layers``). A single layer's backward carries the whole cost of one
    ``Tensor.backward`` call — the engine's graph task, the seed gradient — which a model pays
    once per step, not once per layer; the stack shares it out as a model does."""
    from mmkernels import nn as mnn

    cuda = device is not None and torch.device(device).type == "cuda"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host time is one thread's; the router linear's threads would only wait
    stack = [mnn.MoE(hidden, intermediate, experts, top_k, **layer_kw).to(device) for _ in range(layers)]
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    fwd, bwd = [], []
    with (contextlib.nullcontext([]) if cuda else launches_recorded()) as calls:
        n_fwd = n_bwd = 0
        for i in range(warmup + repeats):
            start = len(calls)
            t0 = time.perf_counter()
            out = x
            for layer in stack:
                out = layer(out).output
            t1 = time.perf_counter()
            mid = len(calls)
            out.backward(torch.ones_like(out))
            t2 = time.perf_counter()
            if i >= warmup:
                fwd.append((t1 - t0) * 1e6 / layers)
                bwd.append((t2 - t1) * 1e6 / layers)
            n_fwd, n_bwd = (mid - start) // layers, (len(calls) - mid) // layers
            for layer in stack:
                layer.zero_grad(set_to_none=True)
            x.grad = None
            if cuda:
                torch.cuda.synchronize(device)
    torch.set_num_threads(threads)
    return {"forward_us": statistics.median(fwd), "backward_us": statistics.median(bwd),
            "forward_launches": None if cuda else n_fwd, "backward_launches": None if cuda else n_bwd,
            "layers": layers, "device": str(device or "cpu (launches recorded)"),
            "shape": dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k)}


def route_host_time(device: torch.device, tokens: int = 16384, experts: int = 128, top_k: int = 8,
                    repeats: int = 200, warmup: int = 20) -> Dict[str, float]:
    """Median host microseconds of one :func:`mmkernels.moe.route` call on ``device`` (its checks,
    allocations and launches; each iteration waits for the GPU after its timed call): what a model
    pays per MoE layer when its step is not graph-captured. No gradient is recorded."""
    from mmkernels import moe

    logits = torch.randn(tokens, experts, device=device)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            moe.route(logits, top_k)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e6)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
    return {"route_us": statistics.median(times), "device": str(device),
            "shape": dict(tokens=tokens, experts=experts, top_k=top_k)}


#: The stack depth of the per-layer figure the main job prints beside the single layer's.
STACK_LAYERS = 8


def host_time_line(one: Dict[str, float], stacked: Dict[str, float]) -> str:
    """The main job's line: one layer's forward and backward, then per layer in a stack."""
    if one["forward_launches"] is None:  # on a GPU, launched
        what, n_fwd, n_bwd = f"launched on {one['device']}", "", ""
    else:
        what = "launches recorded, not run"
        n_fwd, n_bwd = f" ({one['forward_launches']} launches)", f" ({one['backward_launches']} launches)"
    return (f"MoE layer host time (the Triton path's Python, checks, allocations and launch preparation; "
            f"{what}; {one['shape']}): one layer: forward {one['forward_us']:.0f} µs{n_fwd}, backward "
            f"{one['backward_us']:.0f} µs{n_bwd}; per layer in a stack of {stacked['layers']} (one backward "
            f"call): forward {stacked['forward_us']:.0f} µs, backward {stacked['backward_us']:.0f} µs")


def main() -> int:
    print(host_time_line(moe_layer_host_time(), moe_layer_host_time(layers=STACK_LAYERS, repeats=100)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
