"""Packaging: every install carries the C++ sources, and a non-editable install builds and uses them.

The wheel and the sdist are built from this checkout with setuptools' own backend (no network, no
build isolation); the install goes to a fresh target directory put first on ``PYTHONPATH`` of a
new process that runs from a folder outside the checkout, so nothing of the checkout (or of an
editable install of it) is imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mmkernels._cpp as cpp

ROOT = Path(__file__).resolve().parent.parent
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h"))


def _build(kind: str, out: Path) -> Path:
    """Build a wheel or an sdist of the checkout into ``out`` (setuptools.build_meta)."""
    code = (f"from setuptools import build_meta as b; import sys; "
            f"print(b.build_{kind}(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_wheel_and_sdist_carry_the_cpp_sources(tmp_path):
    assert CSRC, "no C++ sources in the checkout"
    wheel = _build("wheel", tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mmkernels/_csrc/{n}" for n in CSRC} <= names, sorted(n for n in names if "csrc" in n)
    assert "mmkernels/_triton/bilinear.py" in names
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {f"csrc/{n}" for n in CSRC} <= members


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMKERNELS_CPP") == "0", reason="C++ kernels switched off (MMKERNELS_CPP=0)")
def test_non_editable_install_uses_the_cpp_kernels(tmp_path):
    """``pip install`` of the wheel (not editable) into a fresh directory: ``python -m mmkernels
    info`` there builds the C++ kernels from the installed ``mmkernels/_csrc`` and uses them."""
    if not cpp.load():
        pytest.skip(f"the C++ kernels cannot be built on this machine: {cpp.status()}")
    wheel = _build("wheel", tmp_path / "dist")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "-c", "import mmkernels; print(mmkernels.__file__)"], cwd=run_dir,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(site), proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mmkernels", "info"], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C++ CPU kernels active" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert str(site / "mmkernels" / "_csrc") in proc.stdout + proc.stderr
