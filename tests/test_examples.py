"""The examples run and show what they claim (examples/)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_weight_sharing_and_motif_detection():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "weight_sharing_motif.py"), "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    diff = float(re.search(r"untied copies' grads\| = (\S+)", out.stdout).group(1))
    assert diff < 1e-5  # the shared weights' gradient is the sum over positions
    acc, found = map(float, re.search(r"accuracy (\S+); motif located .* in (\S+) of", out.stdout).groups())
    assert acc >= 0.95 and found >= 0.5, out.stdout


def test_expert_parallel_example_prints_the_load_table():
    """P = 2 processes on gloo (CPU), a few steps: the table has one row per rank, all slots counted."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "expert_parallel.py"), "--procs", "2",
                          "--steps", "3", "--tokens", "64"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"^\s+(\d)\s+(\d-\d)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["0", "1"], out.stdout
    assert sum(int(r[2]) for r in rows) == 2 * 3 * 64 * 2  # ranks x steps x tokens x top-k
    assert "load imbalance" in out.stdout and "FutureWarning" not in out.stderr
