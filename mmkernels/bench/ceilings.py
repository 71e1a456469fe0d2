"""The two ceilings every result is compared with, measured in the same run: device-to-device copy
bandwidth (bytes read + bytes written) and the rate of a ``torch.mm`` on random data."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .environment import cache_bytes, free_device_memory
from .timing import time_fn


def measure_copy_bandwidth(device: torch.device, nbytes: int, **timing) -> Dict[str, Any]:
    """Device-to-device copy of ``nbytes`` of random bytes; GB/s counts bytes read + bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_fn([lambda: dst.copy_(src)], device, graph=False, **timing)
    gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    return {"GBps": gbps, "bytes": nbytes, "median_ms": t.median_ms, "timing": t.to_json()}


def measure_mm_rate(device: torch.device, n: int, dtype: torch.dtype, **timing) -> Dict[str, Any]:
    """``n x n x n`` matrix product through ``torch.mm`` on random (never zero) data; TFLOP/s."""
    gen = torch.Generator(device=device).manual_seed(1234)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn([lambda: torch.mm(a, b, out=out)], device, graph=False, **timing)
    tflops = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    return {"TFLOPs": tflops, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "median_ms": t.median_ms, "timing": t.to_json()}


def measure_ceilings(device: torch.device, *, copy_bytes: Optional[int] = None, mm_n: Optional[int] = None,
                     mm_dtype: Optional[torch.dtype] = None, quick: bool = False) -> Dict[str, Any]:
    """The two ceilings every result is compared with, measured now on ``device``.

    Defaults: CUDA 1 GiB copy and an 8192^3 bf16 product (DESIGN.md); CPU a copy of 4x the
    last-level cache and a 1024^3 float32 product (bf16 products are not a CPU ceiling).
    """
    if device.type == "cuda":
        copy_bytes = copy_bytes or (256 << 20 if quick else 1 << 30)
        mm_n, mm_dtype = mm_n or (4096 if quick else 8192), mm_dtype or torch.bfloat16
    else:
        copy_bytes = copy_bytes or max(16 << 20, min(256 << 20, 4 * cache_bytes(device)))
        mm_n, mm_dtype = mm_n or (512 if quick else 1024), mm_dtype or torch.float32
    timing = dict(target_s=0.1 if quick else 0.3, min_repeats=3, max_repeats=50)
    out = {"copy": measure_copy_bandwidth(device, copy_bytes, **timing),
           "mm": measure_mm_rate(device, mm_n, mm_dtype, **timing)}
    free_device_memory(device)
    return out


def best_of(first: Dict[str, Any], again: Dict[str, Any]) -> Dict[str, Any]:
    """The higher of two measurements of each ceiling (a ceiling is the best the machine did: on
    the shared 2-core CPU machine a slow minute measured 0.10 against the usual 0.19 TFLOP/s
    mm rate, and every fraction of that run read nearly twice too high). Both are kept under
    ``"samples"``."""
    out = {}
    for name, key in (("copy", "GBps"), ("mm", "TFLOPs")):
        a, b = first[name], again[name]
        out[name] = dict(max(a, b, key=lambda m: m[key]))
        out[name]["samples"] = [a[key], b[key]]
    return out
