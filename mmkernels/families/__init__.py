"""The manifest of op families: :data:`FAMILIES`, every :class:`~mmkernels.family.Family` by name.

Each module of this package declares one family as ``FAMILY`` (see :mod:`mmkernels.family` for
what a declaration holds, and ``docs/adding-a-family.md`` for how to write one). The manifest is
this package's modules, in name order: adding ``families/<name>.py`` adds the family to the case
registry, the main job, the GPU suite, the compile tier, the C++ loader's report and the CLI's
``--family`` choices. Nothing else in the package lists families.

Importing this package imports every declaration (and so every op module); the core package
(``import mmkernels``) never does — only the generic machinery that reads the manifest.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

from mmkernels.family import Family


def _discover() -> Dict[str, Family]:
    found: Dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"{module.__name__} must declare FAMILY = mmkernels.family.Family(...)")
        if fam.name != info.name:
            raise ValueError(f"{module.__name__} declares the family {fam.name!r}; a family's module is named "
                             f"after it")
        found[fam.name] = fam
    return found


#: Every op family, by name, in name order.
FAMILIES: Dict[str, Family] = _discover()


def cpu_paths(build: bool = True) -> str:
    """One line: the C++ loader's state and the CPU path each family runs — its C++ operators
    (``Family.cpp_ops``, ``csrc/<name>.cpp``) where they are built and selected, else torch."""
    from mmkernels import _cpp

    line = _cpp.status(build=build)
    if _cpp.ops() is None:
        return line
    cpp = [n for n, f in FAMILIES.items() if f.cpp_ops and _cpp.has_ops(f.cpp_ops)]
    rest = [n for n in FAMILIES if n not in cpp]
    return f"{line}: C++ for {', '.join(cpp)}; torch for {', '.join(rest)}"


def family(name: str) -> Family:
    """The family called ``name``; a ValueError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown op family {name!r}; known: {', '.join(FAMILIES)}") from None
