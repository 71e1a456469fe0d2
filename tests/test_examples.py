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
