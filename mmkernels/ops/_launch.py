"""Kernel launches with their constant arguments bound once: what the launch plans of the MoE
families (routing, experts) hold, so that a call passes only its tensors and strides, by position.

A keyword launch ``kernel[grid](x_ptr=x, ..., **constants)`` builds a dict of some thirty entries
per call (about 4 µs on the CI machines before the JIT sees it); :class:`Launch` fills a list
made once from the kernel's ``arg_names`` (about 1 µs). The kernel is looked up on its module at
every call, so the recorders that stand in for kernels (the compile tier's, the host-time bench's)
see these launches as any other; a stand-in must expose the real kernel's ``arg_names``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Dict, Sequence, Tuple

#: Launch options that are not kernel arguments.
OPTIONS = ("num_warps", "num_stages")


class Launch:
    """One launch of ``module.<kernel>`` on ``grid``: ``args`` are the arguments that follow from
    shapes and options (constexprs, sizes, ``num_warps`` / ``num_stages``), ``runtime`` names the
    rest, which a call passes in that order: ``launch(*values)``."""

    __slots__ = ("module", "kernel", "grid", "args", "runtime", "_template", "_slots", "_options")

    def __init__(self, module: ModuleType, kernel: str, grid: Tuple[int, ...], runtime: Sequence[str],
                 args: Dict[str, Any]):
        names = list(getattr(module, kernel).arg_names)
        constants = {k: v for k, v in args.items() if k not in OPTIONS}
        unknown = (set(constants) | set(runtime)) - set(names)
        missing = set(names) - set(constants) - set(runtime)
        if unknown or missing or set(constants) & set(runtime):
            raise TypeError(f"{kernel}: arguments do not match its signature (unknown {sorted(unknown)}, "
                            f"missing {sorted(missing)}, given twice {sorted(set(constants) & set(runtime))})")
        self.module, self.kernel, self.grid = module, kernel, tuple(grid)
        self.args, self.runtime = dict(args), tuple(runtime)
        self._template = [constants.get(n) for n in names]
        self._slots = tuple(names.index(n) for n in self.runtime)
        self._options = {k: args[k] for k in OPTIONS if k in args}

    def __call__(self, *values) -> None:
        if len(values) != len(self._slots):
            raise TypeError(f"{self.kernel} takes {self.runtime}, got {len(values)} values")
        args = self._template.copy()
        for i, v in zip(self._slots, values):
            args[i] = v
        getattr(self.module, self.kernel)[self.grid](*args, **self._options)

    def __repr__(self) -> str:
        return f"Launch({self.kernel}, grid={self.grid})"


def named_arguments(kernel, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """A launch's arguments by name, positional ones by ``kernel.arg_names``: what the stand-ins
    that record launches in place of kernels keep (they must expose ``arg_names`` themselves)."""
    return {**dict(zip(kernel.arg_names, args)), **kwargs}
