"""``python -m mmkernels.bench``: the main job, like ``python -m mmkernels bench``."""
import argparse
import sys

from mmkernels import bench

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(_parser)
    sys.exit(bench.run(_parser.parse_args()))
