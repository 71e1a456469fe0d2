"""Shared by tests and benches: the case registry, the tolerance table, assert helpers and the
NaN-poisoning of package-allocated outputs."""
from mmkernels.testing.asserts import ErrorReport, assert_close, error_report
from mmkernels.testing.registry import Case, cases, make_inputs, register
from mmkernels.testing.poison import poison_allocations
from mmkernels.testing.tolerances import TOLERANCES, Tolerance, tolerance

__all__ = [
    "Case",
    "cases",
    "make_inputs",
    "register",
    "ErrorReport",
    "assert_close",
    "error_report",
    "poison_allocations",
    "TOLERANCES",
    "Tolerance",
    "tolerance",
]
