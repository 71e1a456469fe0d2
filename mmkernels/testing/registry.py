"""The case registry shared by tests and benches: every family's cases, from the manifest.

:func:`cases` lists the :class:`~mmkernels.family.Case` s the families declare
(``Family.cases``), filtered by family, tag and op; :func:`make_inputs` builds fresh random inputs
for one (``Family.inputs``). Tags say who uses a case: ``interp`` (small enough for Triton's
interpreter), ``edge`` (boundary shapes and layouts), ``bench`` (the main job on CPU), ``gpu``
(the GPU suite), ``dry-run`` (the GPU suite's check on CPU).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from mmkernels.family import Case


@functools.lru_cache(maxsize=None)
def _all() -> Tuple[Case, ...]:
    from mmkernels.families import FAMILIES

    out: List[Case] = []
    for name, fam in FAMILIES.items():
        for case in fam.cases():
            if case.family != name:
                raise ValueError(f"the {name} family declares a case of family {case.family!r}: {case.id}")
            out.append(case)
    return tuple(out)


def cases(family: Optional[str] = None, tag: Optional[str] = None, op: Optional[str] = None) -> List[Case]:
    """Registered cases, filtered by family, tag and op (each None: any)."""
    if family is not None:
        from mmkernels.families import family as lookup

        lookup(family)  # an unknown name is an error, not an empty list
    return [c for c in _all()
            if (family is None or c.family == family)
            and (tag is None or tag in c.tags)
            and (op is None or c.op == op)]


def make_inputs(case: Case, device="cpu", seed: int = 0, generator_device="cpu") -> Dict[str, torch.Tensor]:
    """Fresh random inputs for ``case`` on ``device``.

    The default CPU generator (float64 draws) gives the same values on every device; pass
    ``generator_device="cuda"`` to draw large inputs on the GPU instead (float32 draws, other values).
    """
    from mmkernels.families import family

    gen = torch.Generator(device=generator_device).manual_seed(seed)
    return family(case.family).inputs(case, torch.device(device), gen)
