"""Where a result is measured: the device (default, name, last-level cache size, handing its cached
memory back), the versions and the commit (:func:`environment`, recorded in every result file)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mmkernels import _backend


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> Optional[str]:
    """``HEAD`` of the checkout holding this package (``+dirty`` if it has local changes), or the
    ``MMKERNELS_COMMIT`` variable (for copies of the tree without ``.git``); None if unknown."""
    if os.environ.get("MMKERNELS_COMMIT"):
        return os.environ["MMKERNELS_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache in front of ``device``'s memory (L2 on CUDA, L3 on CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        try:
            best = max(best, int(size.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or 32 << 20


def free_device_memory(device: torch.device) -> None:
    """Hand the CUDA caching allocator's unused blocks back (large cases follow one another)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> Dict[str, Any]:
    """What a result file must say about where it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: Dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": _backend.get_backend(),
        "impl": _backend.resolve(device).value,
        "triton_interpreter": _backend.interpreter_active(),
        "cache_bytes": cache_bytes(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
    else:

        from mmkernels.families import cpu_paths

        info.update(threads=torch.get_num_threads(), cpu_ops=cpu_paths())
    return info
