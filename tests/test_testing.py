"""The shared harness itself: NaN poisoning catches unwritten outputs, assert_close catches what it
should and says where, the registry builds what it promises."""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import testing as mt
from mmkernels._backend import interpreter_active
from tests.conftest import DEVICE


class _NoLaunch:
    """Stands in for a kernel: launching it writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.interp
def test_poisoning_exposes_an_unwritten_output(monkeypatch):
    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs CUDA or the interpreter")
    from mmkernels._triton import softmax as K

    monkeypatch.setattr(K, "softmax_fwd_fused_kernel", _NoLaunch())
    x = torch.randn(4, 8, device=DEVICE)
    with mmkernels.use_backend("triton"), mt.poison_allocations():
        y = mmkernels.softmax(x, -1)
    assert torch.isnan(y).all()
    with pytest.raises(AssertionError, match="NaN/inf positions differ"):
        mt.assert_close(y, torch.softmax(x.double(), -1), backend="triton")


def test_poisoning_is_scoped():
    """Only allocations made from mmkernels modules are poisoned, and only inside the block."""
    from mmkernels.testing import poison

    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    with mt.poison_allocations():
        assert torch.empty is not originals[0]
        assert not poison._from_package(1)  # this test module is not the package
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == originals


def test_assert_close_reports_the_worst_coordinate():
    ref = torch.zeros(3, 5, dtype=torch.float64)
    ref[:] = 1.0
    got = ref.clone().float()
    got[2, 3] = 1.5
    with pytest.raises(AssertionError, match=r"worst at \(2, 3\)"):
        mt.assert_close(got, ref, backend="cpu")
    rep = mt.assert_close(ref.float(), ref, backend="cpu")
    assert rep.max_rel == 0.0 and rep.rms_rel == 0.0


def test_assert_close_requires_matching_nan_and_inf():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    mt.assert_close(ref.float(), ref, backend="cpu")
    for bad in ([1.0, 0.0, float("inf")], [1.0, float("nan"), float("-inf")], [1.0, float("nan"), 1e30]):
        with pytest.raises(AssertionError):
            mt.assert_close(torch.tensor(bad), ref, backend="cpu")


def test_tolerance_table_covers_every_backend_and_dtype():
    for backend in ("cpu", "triton"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            tol = mt.tolerance(backend, dtype)
            assert 0 < tol.rms_rel <= tol.max_rel < 0.05
    with pytest.raises(KeyError):
        mt.tolerance("cuda", torch.float32)


def test_registry_ids_are_unique_and_layouts_hold():
    cs = mt.cases("softmax")
    ids = [c.id for c in cs]
    assert len(ids) == len(set(ids))
    for tag in ("interp", "edge", "bench", "gpu"):
        assert mt.cases("softmax", tag=tag), tag
    for c in cs:
        if "interp" not in c.tags or not c.layouts:
            continue
        ins = mt.make_inputs(c)
        assert ins["x"].shape == c.shape and ins["dy"].shape == c.shape
        if c.layouts.get("x") == "transposed" and len(c.shape) > 1:
            assert not ins["x"].is_contiguous()
        if c.layouts.get("dy") == "expanded":
            assert 0 in ins["dy"].stride()
