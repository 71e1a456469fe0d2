"""Shared by tests and benches: the case registry, the tolerance table, assert helpers and the
NaN-poisoning of package-allocated outputs."""
from mmkernels.family import Case
from mmkernels.testing.asserts import ErrorReport, assert_close, assert_same_bits, error_report
from mmkernels.testing.poison import poison_allocations
from mmkernels.testing.registry import cases, make_inputs
from mmkernels.testing.tolerances import TOLERANCES, Tolerance, tolerance

__all__ = [
    "Case",
    "cases",
    "make_inputs",
    "ErrorReport",
    "assert_close",
    "assert_same_bits",
    "error_report",
    "poison_allocations",
    "TOLERANCES",
    "Tolerance",
    "tolerance",
]
