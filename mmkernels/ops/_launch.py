"""Kernel launches with their constant arguments bound once: what the launch plans of the MoE
families (routing, experts) hold, so that a call passes only its tensors and strides, by position.

A keyword launch ``kernel[grid](x_ptr=x, ..., **constants)`` builds a dict of some thirty entries
per call (about 4 µs on the CI machines before the JIT sees it). :class:`Launch` writes, once, a
small function whose parameters are the runtime arguments and whose body is the positional launch
with the constants in place::

    def route_scan_kernel(hist_ptr, base_ptr, ...):
        _module.route_scan_kernel[_grid](hist_ptr, base_ptr, ..., _c_NB, _c_E, ..., num_warps=_o_num_warps)

so a call is one Python frame and the launch itself (no dict, no argument list filled in a loop).
The kernel is looked up on its module at every call, so the recorders that stand in for kernels
(the compile tier's, the host-time bench's) see these launches as any other; a stand-in must
expose the real kernel's ``arg_names``.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Dict, Sequence, Tuple

#: Launch options that are not kernel arguments.
OPTIONS = ("num_warps", "num_stages")


class Launch(functools.partial):
    """One launch of ``module.<kernel>`` on ``grid``: ``bound`` are the arguments that follow from
    shapes and options (constexprs, sizes, ``num_warps`` / ``num_stages``), ``runtime`` names the
    rest, which a call passes in that order: ``launch(*values)``. A ``functools.partial`` of the
    written function, so that a call enters no Python frame before it (``partial`` calls in C)."""

    def __new__(cls, module: ModuleType, kernel: str, grid: Tuple[int, ...], runtime: Sequence[str],
                args: Dict[str, Any]):
        names = list(getattr(module, kernel).arg_names)
        constants = {k: v for k, v in args.items() if k not in OPTIONS}
        unknown = (set(constants) | set(runtime)) - set(names)
        missing = set(names) - set(constants) - set(runtime)
        if unknown or missing or set(constants) & set(runtime) or len(set(runtime)) != len(runtime):
            raise TypeError(f"{kernel}: arguments do not match its signature (unknown {sorted(unknown)}, "
                            f"missing {sorted(missing)}, given twice {sorted(set(constants) & set(runtime))})")
        grid, runtime = tuple(grid), tuple(runtime)
        self = super().__new__(cls, _launcher(module, kernel, grid, names, runtime, constants,
                                              {k: args[k] for k in OPTIONS if k in args}))
        self.module, self.kernel, self.grid = module, kernel, grid
        self.bound, self.runtime = dict(args), runtime
        return self

    def __repr__(self) -> str:
        return f"Launch({self.kernel}, grid={self.grid})"

    def __reduce__(self):  # as the arguments it was made from (partial's own pickles the written function)
        return Launch, (self.module, self.kernel, self.grid, self.runtime, self.bound)


def _launcher(module: ModuleType, kernel: str, grid: tuple, names: Sequence[str], runtime: Sequence[str],
              constants: Dict[str, Any], options: Dict[str, Any]):
    """The function ``f(*runtime values)`` that launches ``module.<kernel>[grid]`` with every
    argument in signature order: runtime values by their parameter, constants and options from
    the function's globals (``_c_<name>``, ``_o_<name>``), never written into the source."""
    scope: Dict[str, Any] = {"_module": module, "_grid": grid}
    scope.update({f"_c_{k}": v for k, v in constants.items()})
    scope.update({f"_o_{k}": v for k, v in options.items()})
    call_args = [n if n in runtime else f"_c_{n}" for n in names]
    call_args += [f"{k}=_o_{k}" for k in options]
    source = (f"def {kernel}({', '.join(runtime)}):\n"
              f"    _module.{kernel}[_grid]({', '.join(call_args)})\n")
    exec(compile(source, f"<launch {kernel}>", "exec"), scope)  # noqa: S102 - names from arg_names only
    return scope[kernel]


def named_arguments(kernel, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """A launch's arguments by name, positional ones by ``kernel.arg_names``: what the stand-ins
    that record launches in place of kernels keep (they must expose ``arg_names`` themselves)."""
    return {**dict(zip(kernel.arg_names, args)), **kwargs}
