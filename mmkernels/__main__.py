"""Command line: ``python -m mmkernels {bench,compile}``.

* ``bench``   — the main job: every op family against its PyTorch baseline on the present device.
* ``compile`` — the compile tier: every kernel at every launch config, compiled for sm_80/sm_90.
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

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
