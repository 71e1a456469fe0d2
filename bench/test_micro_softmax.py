"""pytest-benchmark microbenchmarks of the softmax family on the present device.

    python -m pytest bench/test_micro_softmax.py --benchmark-only

Each case of the registry tagged ``bench`` (CPU) or ``gpu`` (CUDA) is timed for ours and for the
torch baseline, grouped by case so pytest-benchmark prints them side by side. Not part of the
test suite (``testpaths`` is ``tests/``); the main job (``python -m mmkernels bench``) reports ratios.
"""
import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import testing as mt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAG = "gpu" if DEVICE == "cuda" else "bench"
OURS = {"softmax": mmkernels.softmax, "log_softmax": mmkernels.log_softmax, "softmin": mmkernels.softmin}
TORCH = {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "softmin": F.softmin}


def _timed(fn):
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


@pytest.mark.parametrize("impl", ["mmkernels", "torch"])
@pytest.mark.parametrize("case", mt.cases("softmax", tag=TAG), ids=lambda c: c.id)
def test_forward(benchmark, case, impl):
    benchmark.group = f"forward {case.id}"
    x = mt.make_inputs(case, DEVICE)["x"]
    fn = (OURS if impl == "mmkernels" else TORCH)[case.op]
    benchmark(_timed(lambda: fn(x, case.params["dim"])))
