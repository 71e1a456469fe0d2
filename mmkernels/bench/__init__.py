"""The main job, ``python -m mmkernels bench``, and the measurement pieces the GPU suite reuses.

Every op family is run on the cases of the registry (:mod:`mmkernels.testing`) tagged ``bench``
(CPU) or ``gpu`` (CUDA), on the present device, against its PyTorch baseline, and a table is
printed: times, the ratio ``baseline / ours`` (> 1: we are faster), the error against a float64
reference, peak memory, and the fraction of the measured copy bandwidth (matmul families also:
useful FLOPs / time and its fraction of the measured mm rate).

``bench/gpu_suite.py`` holds no measurement code of its own: it adds the float64 references of
``tests/reference.py``, the acceptance targets' verdicts and its own output files to the pieces
below. One concern per module, in the order a run uses them:

* :mod:`~mmkernels.bench.environment`: where it runs: :func:`environment` (device, versions,
  commit), :func:`cache_bytes` (last-level cache), :func:`default_device`;
* :mod:`~mmkernels.bench.timing`: :func:`time_fn` -> :class:`Timing` (CUDA-graph replays or CUDA
  events on CUDA, ``perf_counter`` on CPU; warm-up, median over repeats, rotation among input
  buffer sets), :func:`rotation_sets`;
* :mod:`~mmkernels.bench.ceilings`: :func:`measure_copy_bandwidth`, :func:`measure_mm_rate`,
  :func:`measure_ceilings`;
* :mod:`~mmkernels.bench.specs` (the only family-specific module; how to add a family is at its
  top): :class:`Variant` (one measurable function of one case: ours, baselines, float64 reference,
  minimum bytes, useful FLOPs, its named outputs), :class:`CheckSample` (what the check compares
  when a row sample will not do), :class:`Target`, :class:`TorchReferences`, one spec class per
  family in :data:`FAMILIES` (:class:`SoftmaxBench`, :class:`BilinearBench`), :func:`variants_for`,
  :func:`all_targets`;
* :mod:`~mmkernels.bench.inputs`: :func:`random_inputs`, ``_copy_like`` (buffer sets);
* :mod:`~mmkernels.bench.check`: :func:`check_variant` (NaN-poisoned run, every element written,
  normwise error of each output on a bounded sample against the float64 reference, tolerance table),
  :func:`peak_memory`;
* :mod:`~mmkernels.bench.measure`: the loop: :class:`MeasureOptions`, :func:`measure_variant`,
  :func:`measure_case`, :func:`measure_cases`; and :func:`evaluate_targets`;
* :mod:`~mmkernels.bench.report`: :func:`format_table`, :func:`result_table`, :func:`ceilings_line`,
  :func:`write_json`, :func:`plot_results`;
* :mod:`~mmkernels.bench.cli`: the main job: :func:`add_arguments`, :func:`select_cases`, :func:`run`
  (``python -m mmkernels bench``; ``python -m mmkernels.bench`` works too).

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
from .cli import add_arguments, run, select_cases
from .environment import cache_bytes, default_device, device_name, environment, git_commit
from .inputs import DEVICE_DRAW_ABOVE, Inputs, random_inputs
from .measure import MeasureOptions, evaluate_targets, measure_case, measure_cases, measure_variant
from .report import ceilings_line, fmt_num, format_table, plot_results, result_table, write_json
from .specs import (FAMILIES, BilinearBench, CheckSample, SoftmaxBench, Target, TorchReferences, Variant,
                    all_targets, compiled, variants_for)
from .timing import GRAPH_BELOW_MS, GRAPH_SAMPLE_MS, Timing, rotation_sets, time_fn

__all__ = [
    # environment
    "cache_bytes", "default_device", "device_name", "environment", "git_commit",
    # timing
    "GRAPH_BELOW_MS", "GRAPH_SAMPLE_MS", "Timing", "rotation_sets", "time_fn",
    # ceilings
    "measure_ceilings", "measure_copy_bandwidth", "measure_mm_rate",
    # specs
    "FAMILIES", "BilinearBench", "CheckSample", "SoftmaxBench", "Target", "TorchReferences", "Variant",
    "all_targets", "compiled", "variants_for",
    # inputs
    "DEVICE_DRAW_ABOVE", "Inputs", "random_inputs",
    # check
    "check_variant", "peak_memory",
    # measure
    "MeasureOptions", "evaluate_targets", "measure_case", "measure_cases", "measure_variant",
    # report
    "ceilings_line", "fmt_num", "format_table", "plot_results", "result_table", "write_json",
    # cli
    "add_arguments", "run", "select_cases",
]
