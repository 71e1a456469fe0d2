"""The layout's rules, checked on the source: no import circle in the package, no private name of
one module used by another, the code speaks of the code (no ticket or session numbers), every
document the code cites is in the tree, and each family declared once with its files where the
manifest says."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmkernels"


def _modules() -> Dict[str, Path]:
    """Every module of the installed package by dotted name (``triton_kernels/`` is ``mmkernels._triton``)."""
    out = {}
    for base, prefix in ((PACKAGE, "mmkernels"), (ROOT / "triton_kernels", "mmkernels._triton")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, level: int, name: str, here: str) -> str:
    if not level:
        return name
    base = here.split(".")
    if not MODULES[here].name == "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(name: str) -> Iterator[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every import of module ``name`` (function-
    level ones included: a circle through a lazy import is still a circle)."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module or "", node.level, node.module or "", name)
            for a in node.names:
                yield mod, a.name, node.lineno


def _edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for mod, attr, _ in _imports(m):
            target = f"{mod}.{attr}" if f"{mod}.{attr}" in MODULES else mod
            if target in MODULES and target != m:
                graph[m].add(target)
    # the manifest imports every declaration (found on disk, not named in an import statement)
    graph["mmkernels.families"] |= {m for m in MODULES if m.startswith("mmkernels.families.")}
    return graph


def test_no_import_circle():
    graph = _edges()
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private_uses(path: Path, here: str) -> Iterator[str]:
    """``from X import _name`` and ``alias._name`` where X / alias is another package module and
    ``_name`` is not a submodule (package-private modules such as ``mmkernels._backend`` are
    imported by name; their private names are not)."""
    tree = ast.parse(path.read_text())
    aliases: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module or "", node.level, node.module or "", here) if here else node.module
            if not (mod or "").startswith("mmkernels"):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in MODULES:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and not a.name.startswith("__") and mod != here:
                    yield f"{path.relative_to(ROOT)}:{node.lineno}: from {mod} import {a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mmkernels") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES and aliases[node.value.id] != here):
            yield f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr} ({aliases[node.value.id]})"


def test_no_private_name_used_across_modules():
    found = [u for name, path in MODULES.items() for u in _private_uses(path, name)]
    for path in sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        found += list(_private_uses(path, ""))
    assert not found, "private names used from another module:\n" + "\n".join(found)


#: What the code must not speak of: its own history (ticket and session numbers).
HISTORY = re.compile(r"\b(issue|ticket|seed)s?\s*#?\d+|\bthe seeds'|\b(this|another|previous) session\b", re.I)


def _sources() -> List[Path]:
    dirs = ("mmkernels", "triton_kernels", "csrc", "tests", "bench", "examples")
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*")
                  if p.suffix in (".py", ".cpp", ".h") and "results" not in p.parts)


def test_the_code_speaks_of_the_code():
    me = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _sources() if p.resolve() != me
            for i, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "history in the code (name the module, paper or model instead):\n" + "\n".join(hits)


def test_every_cited_document_is_in_the_tree():
    cited = re.compile(r"\b((?:docs|bench|csrc|tests|examples)/[\w./-]+\.(?:md|py|cpp|h|txt))|\b([A-Z]+\.md)\b")
    missing = []
    for p in _sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for m in cited.finditer(line):
                doc = m.group(1) or m.group(2)
                if not ((ROOT / doc).exists() or (ROOT / "docs" / doc).exists()):
                    missing.append(f"{p.relative_to(ROOT)}:{i}: {doc}")
    assert not missing, "cited but not in the tree:\n" + "\n".join(missing)


def test_each_family_has_its_files_and_one_name():
    from mmkernels.families import FAMILIES

    for name, fam in FAMILIES.items():
        assert (ROOT / "triton_kernels" / f"{name}.py").exists(), name
        assert (PACKAGE / "ops" / f"{name}.py").exists(), name
        assert fam.kernels_module == f"mmkernels._triton.{name}" and fam.ops_module == f"mmkernels.ops.{name}"
        if fam.cpp_ops:
            assert (ROOT / "csrc" / f"{name}.cpp").exists(), name
    shared = {"pool", "isa"}  # every family's: the tensor pool, the instruction-set level
    cpp = {p.stem for p in (ROOT / "csrc").glob("*.cpp")} - shared
    assert cpp <= set(FAMILIES), f"C++ sources named after no family: {cpp - set(FAMILIES)}"


@pytest.mark.parametrize("path", ["README.md", "docs/adding-a-family.md"])
def test_adding_a_family_names_at_most_five_files(path):
    text = (ROOT / "docs" / "adding-a-family.md").read_text()
    steps = re.findall(r"^\d+\. \*\*`([^`]+)`\*\*", text, re.M)
    assert 1 <= len(steps) <= 5, steps
    for step in steps:
        assert (ROOT / step.replace("<name>", "softmax")).exists(), step
    if path == "README.md":
        assert "docs/adding-a-family.md" in (ROOT / path).read_text()
