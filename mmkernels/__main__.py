"""Command line: ``python -m mmkernels {bench,compile,info}``.

* ``bench``   — the main job: every op family against its PyTorch baseline on the present device.
* ``compile`` — the compile tier: every kernel at every launch config, compiled for sm_80/sm_90.
* ``info``    — versions, the device, the GPU backend and which CPU implementation is active, and why.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from mmkernels import bench
    from mmkernels.testing import compile_tier

    p = sub.add_parser("bench", help="run every op family against its baseline on this device")
    bench.add_arguments(p)
    p.set_defaults(run=bench.run)

    p = sub.add_parser("compile", help="compile every kernel for sm_80 / sm_90 and check its resources")
    compile_tier.add_arguments(p)
    p.set_defaults(run=compile_tier.run)

    p = sub.add_parser("info", help="versions, device, and which GPU / CPU implementation runs (and why)")
    p.set_defaults(run=_info)

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _info(args) -> int:
    import torch

    from mmkernels import _backend

    print(f"torch {torch.__version__}; triton {'available' if _backend.triton_available() else 'missing'}; "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    from mmkernels.families import cpu_paths

    print(f"CPU ops: {cpu_paths()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
