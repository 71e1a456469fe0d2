"""pytest fixtures shared by the test suite (load with ``pytest_plugins = ["mmkernels.testing.fixtures"]``)."""
from __future__ import annotations

import pytest

from mmkernels.testing.poison import poison_allocations


@pytest.fixture
def poison_outputs():
    """Outputs allocated by mmkernels start as NaN for the duration of the test."""
    with poison_allocations():
        yield
