"""Host time of one MoE layer: what its forward and backward cost the CPU before any kernel runs —
argument checks, allocations, Python, autograd bookkeeping and the launch preparation of the Triton
path — measured on every machine: the layer runs its Triton path on CPU tensors with every kernel
of the routing and experts families recorded rather than launched (:func:`launches_recorded`), so
the figure is the host's share alone, without the device's. On a GPU the launches themselves (the
JIT's argument binding, the driver) come on top; the GPU suite times whole calls.

:func:`moe_layer_host_time` is what the main job prints; ``python -m mmkernels.bench.host`` prints
it alone.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from typing import Dict, Iterator, Sequence

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
                        top_k: int = 4, repeats: int = 200, warmup: int = 20, **layer_kw) -> Dict[str, float]:
    """Median host microseconds of one ``mmkernels.nn.MoE`` layer's forward (router linear, route,
    experts) and backward, launches recorded (:func:`launches_recorded`); also the launches per
    forward and backward. Small sizes on purpose: on CPU tensors a large allocation's page faults
    would be counted, which a GPU's caching allocator does not pay."""
    from mmkernels import nn as mnn

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host time is one thread's; the router linear's threads would only wait
    layer = mnn.MoE(hidden, intermediate, experts, top_k, **layer_kw)
    x = torch.randn(tokens, hidden, requires_grad=True)
    fwd, bwd = [], []
    with launches_recorded() as calls:
        n_fwd = n_bwd = 0
        for i in range(warmup + repeats):
            start = len(calls)
            t0 = time.perf_counter()
            out = layer(x).output
            t1 = time.perf_counter()
            mid = len(calls)
            out.backward(torch.ones_like(out))
            t2 = time.perf_counter()
            if i >= warmup:
                fwd.append((t1 - t0) * 1e6)
                bwd.append((t2 - t1) * 1e6)
            n_fwd, n_bwd = mid - start, len(calls) - mid
            layer.zero_grad(set_to_none=True)
            x.grad = None
    torch.set_num_threads(threads)
    return {"forward_us": statistics.median(fwd), "backward_us": statistics.median(bwd),
            "forward_launches": n_fwd, "backward_launches": n_bwd,
            "shape": dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k)}


def main() -> int:
    r = moe_layer_host_time()
    print(f"MoE layer host time (launches recorded, not run; {r['shape']}): forward {r['forward_us']:.0f} µs "
          f"({r['forward_launches']} launches), backward {r['backward_us']:.0f} µs ({r['backward_launches']} launches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
