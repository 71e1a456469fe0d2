"""The main job, ``python -m mmkernels bench``, and the measurement pieces the GPU suite reuses.

Every op family (:data:`mmkernels.families.FAMILIES`) is run on its cases tagged ``bench`` (CPU)
or ``gpu`` (CUDA), on the present device, against its PyTorch baselines, and a table is printed:
times, the ratio ``baseline / ours`` (> 1: we are faster), the error against the float64
reference (:mod:`mmkernels.reference`), peak memory, and the fraction of the measured copy
bandwidth (matmul families also: useful FLOPs / time and its fraction of the measured mm rate).
What to run for a case — its variants, baselines, reference, bytes and FLOPs — is the family's
bench spec (``Family.variants``); nothing here names a family.

``bench/gpu_suite.py`` holds no measurement code of its own. One concern per module, in the order
a run uses them:

* :mod:`~mmkernels.bench.environment`: where it runs (device, versions, commit, cache size);
* :mod:`~mmkernels.bench.timing`: :func:`time_fn` -> :class:`Timing` (CUDA-graph replays or CUDA
  events on CUDA, ``perf_counter`` on CPU; warm-up, median over repeats, rotation among input
  buffer sets), :func:`rotation_sets`;
* :mod:`~mmkernels.bench.ceilings`: the copy bandwidth and the mm rate, measured in the same run;
* :mod:`~mmkernels.bench.inputs`: :func:`random_inputs`, :func:`copy_like` (buffer sets);
* :mod:`~mmkernels.bench.check`: :func:`check_variant` (NaN-poisoned run, every element written,
  normwise error of each output on a bounded sample against the float64 reference, tolerance
  table), :func:`peak_memory`;
* :mod:`~mmkernels.bench.measure`: the loop: :class:`MeasureOptions`, :func:`variants_for`,
  :func:`measure_variant`, :func:`measure_case`, :func:`measure_cases`; :func:`all_targets`,
  :func:`evaluate_targets`;
* :mod:`~mmkernels.bench.report`: tables, JSON, plots;
* :mod:`~mmkernels.bench.explore`: config exploration (the families' probes);
* :mod:`~mmkernels.bench.cli`: the main job (``python -m mmkernels bench``).

Definitions used throughout: *bytes* is the minimum traffic of one call (each input read once,
each output written once, storage dtypes); *GB/s* is bytes / median time; *%copy* is that over the
copy bandwidth measured in the same run (bytes read + bytes written of a large device-to-device
copy); *TFLOP/s* is a matmul family's useful FLOPs / median time and *%mm* (``frac_mm``) that over
the ``torch.mm`` rate measured in the same run (bf16 on CUDA). Ratios compare times measured the
same way in the same run.
"""
from __future__ import annotations

from .ceilings import measure_ceilings, measure_copy_bandwidth, measure_mm_rate
from .check import check_variant, peak_memory
from .cli import REFERENCE, add_arguments, run, select_cases
from .environment import cache_bytes, default_device, device_name, environment, git_commit
from .inputs import DEVICE_DRAW_ABOVE, copy_like, random_inputs
from .measure import (MeasureOptions, all_targets, evaluate_targets, measure_case, measure_cases, measure_variant,
                      variants_for)
from .report import ceilings_line, fmt_num, format_table, plot_results, result_table, write_json
from .timing import GRAPH_BELOW_MS, GRAPH_SAMPLE_MS, Timing, rotation_sets, time_fn

__all__ = [
    # environment
    "cache_bytes", "default_device", "device_name", "environment", "git_commit",
    # timing
    "GRAPH_BELOW_MS", "GRAPH_SAMPLE_MS", "Timing", "rotation_sets", "time_fn",
    # ceilings
    "measure_ceilings", "measure_copy_bandwidth", "measure_mm_rate",
    # inputs
    "DEVICE_DRAW_ABOVE", "copy_like", "random_inputs",
    # check
    "check_variant", "peak_memory",
    # measure
    "MeasureOptions", "all_targets", "evaluate_targets", "measure_case", "measure_cases", "measure_variant",
    "variants_for",
    # report
    "ceilings_line", "fmt_num", "format_table", "plot_results", "result_table", "write_json",
    # cli
    "REFERENCE", "add_arguments", "run", "select_cases",
]
