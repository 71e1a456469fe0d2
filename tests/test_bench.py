"""The measurement side: the main job ``python -m mmkernels bench`` on CPU, the GPU suite's dry run,
and the pieces they share (the package mmkernels/bench/). Kept to a few tiny runs (well under a minute)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import _cpp, bench
from mmkernels.__main__ import main as cli_main
from mmkernels.bench.inputs import copy_like
from mmkernels.family import sample_index
from mmkernels.testing import Case

ROOT = Path(__file__).resolve().parents[1]
#: the smallest `bench` case (4M elements), fp32 only: one case, forward and backward
SMALL = "softmax-32768x128-dim-1-float32"


def _case(op="softmax", shape=(4, 33), dtype=torch.float32, dim=-1):
    return Case("softmax", op, shape, dtype, frozenset({"test"}), {"dim": dim})


@pytest.mark.cputier
def test_main_job_cpu_table_json_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    with mmkernels.use_backend("cpu"):
        rc = cli_main(["bench", "--device", "cpu", "--quick", "--repeats", "3", "--filter", SMALL,
                       "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    # the table: header and one row per variant
    assert "ours ms" in out.out and "ratio" in out.out and "%copy" in out.out
    assert "softmax fwd" in out.out and "softmax bwd" in out.out
    assert f"] {SMALL}: fwd" in out.err  # one progress line per case on stderr

    data = json.loads(js.read_text())
    assert data["kind"] == "mmkernels-bench"
    for key in ("device", "torch", "triton", "commit", "date", "impl"):
        assert key in data["environment"]
    assert data["environment"]["impl"] == "cpu"
    assert data["ceilings"]["copy"]["GBps"] > 0 and data["ceilings"]["mm"]["TFLOPs"] > 0
    rows = data["results"]
    assert [r["direction"] for r in rows] == ["fwd", "bwd"]
    for r in rows:
        assert r["case"] == SMALL and r["check"]["passed"]
        assert r["ours_ms"] > 0 and r["baseline_ms"]["eager"] > 0 and r["ratio"] > 0
        assert r["check"]["max_rel"] <= r["check"]["tol_max_rel"]
        assert len(r["timings"]["ours"]["samples_ms"]) == 3
        assert r["bytes"] == r["passes"] * 32768 * 128 * 4
        assert r["peak_bytes"] >= 32768 * 128 * 4  # the output, at least
        assert 0 < r["frac_copy"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: a tiny bilinear registry case (tagged interp): the main job on it, forward and forward+backward
TINY_BILINEAR = "bilinear-7-b17-c13-d11-biasTrue-float32"


@pytest.mark.cputier
def test_main_job_cpu_bilinear_flops_and_memory(tmp_path, capsys):
    js = tmp_path / "bench.json"
    with mmkernels.use_backend("cpu"):
        rc = cli_main(["bench", "--device", "cpu", "--tag", "interp", "--quick", "--repeats", "3",
                       "--filter", f"bilinear {TINY_BILINEAR}", "--json", str(js)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "TFLOP/s" in out.out and "%mm" in out.out and "mem base MiB" in out.out
    assert "bilinear fwd " in out.out and "bilinear fwd+bwd" in out.out and "7 (17x13->11)" in out.out
    rows = json.loads(js.read_text())["results"]
    assert [r["direction"] for r in rows] == ["fwd", "fwd+bwd"]
    assert "ceilings (best of the start and end of the run)" in out.out
    cpp = {"torch_path"} if _cpp.load() else set()
    assert ("every baseline" in out.out) and all(f" {n} " in out.out for n in ("einsum", "gemm", *cpp))
    flops = 2 * 7 * 17 * 13 * 11
    for r, mult in zip(rows, (1, 3)):
        assert r["case"] == TINY_BILINEAR and "error" not in r and r["check"]["passed"], r.get("check")
        assert r["flops"] == mult * flops and r["TFLOPs"] > 0 and r["frac_mm"] > 0
        # on CPU with the C++ kernels built, ours on the vectorised-torch path is a baseline too
        assert set(r["baseline_ms"]) == {"eager", "einsum", "gemm"} | cpp and r["ratio"] > 0
        assert set(r["baseline_frac_mm"]) == set(r["baseline_ms"])
        assert r["peak_bytes"] > 0 and r["baseline_peak_bytes"] > 0  # ours and F.bilinear
        assert r["params"] == {"b": 17, "c": 13, "d": 11, "bias": True}
    parts = rows[1]["check"]["parts"]
    assert set(parts) == {"y", "dz", "dx", "dw", "db"} and all(p["passed"] for p in parts.values())
    assert parts["dw"]["sampled_elements"] == 11 * 17 * 13  # nothing to sample at this size
    assert rows[1]["peak_bytes"] >= 4 * (7 * (11 + 17 + 13) + 11 * 17 * 13)  # y and every gradient


@pytest.mark.interp
def test_gpu_suite_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND")}
    # every case must run: the suite's own budget (4 min, for a lent GPU) is raised — a 2-core VM
    # without AVX-512 took 245 s to reach the 20th of 23 interpreted cases
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run", "--max-minutes", "30",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== summary" in proc.stdout and "elapsed" in proc.stdout
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["dry_run"] is True and data["environment"]["triton_interpreter"] is True
    assert data["environment"]["impl"] == "triton"
    assert data["reference"].startswith("mmkernels.reference")
    rows = data["results"]
    assert rows and all("error" not in r and r["check"]["passed"] for r in rows)
    assert not data["skipped_families"]
    assert {r["op"] for r in rows} == {"softmax", "log_softmax", "softmin", "bilinear", "mixtral", "deepseek", "qwen3",
                                       "cross_entropy", "linear_cross_entropy", "attention", "gated_fusion", "gated_blend",
                                       "hard_switch", "dense_moe", "product_unit", "sigma_pi_unit", "pi_sigma"}
    assert {r["direction"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    soft = [r for r in rows if r["family"] == "softmax"]
    assert any(r["check"]["sampled_elements"] < r["bytes"] // 8 for r in soft)  # a row sample ran
    bil = [r for r in rows if r["family"] == "bilinear"]
    assert [r["direction"] for r in bil] == ["fwd", "fwd+bwd"] and all(r["impl"] == "triton" for r in bil)
    routing = [r for r in rows if r["family"] == "routing"]
    assert len(routing) == 6 and all(r["impl"] == "triton" for r in routing)
    # integer metadata is checked exactly: every part of the forward, bound 0
    parts = routing[0]["check"]["parts"]
    assert set(parts) == {"weights", "expert_ids", "counts", "offsets", "sorted_slots"}
    assert all(parts[n]["tol_max_rel"] == 0 and parts[n]["max_rel"] == 0 for n in parts if n != "weights")
    assert all(r["flops"] > 0 and r["TFLOPs"] > 0 and "frac_mm" in r for r in bil)
    parts = bil[1]["check"]["parts"]
    assert set(parts) == {"y", "dz", "dx", "dw", "db"}
    assert parts["y"]["sampled_elements"] < 40 * 6  # the check's row sample ran
    assert {t["status"] for t in data["targets"]} == {"NO DATA"}  # no M=8192 cases in a dry run
    host = data["host_time"]  # the MoE host times: recorded launches and a tiny route in a dry run
    assert host["layer"]["forward_launches"] > 0 and host["stack"]["layers"] == 8
    assert host["route"]["route_us"] > 0 and host["route_status"] is None
    assert "MoE layer host time" in proc.stdout and "route host time per call" in proc.stdout
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## Correctness" in md and f"{len(rows)}/{len(rows)} passed" in md
    assert "## Acceptance targets" in md and "## Raw medians" in md
    # config exploration: the resolver's config and each alternative, checked against it and timed
    explored = data["explore"]
    assert len({r["probe"] for r in explored}) == 3 and {r["config"] for r in explored} >= {"resolver"}
    assert all(r["check"] and r["ms"] > 0 for r in explored)
    assert "## Config exploration" in md


#: Runs the dry run with mmkernels.softmax made wrong by 1%: the suite must say so and exit 1.
_BROKEN_RUN = """
import importlib.util, os, sys
os.environ["TRITON_INTERPRET"] = "1"; os.environ["MMKERNELS_BACKEND"] = "triton"
import torch, mmkernels
mmkernels.softmax = lambda x, dim=-1, dtype=None: torch.softmax(x, dim) * 1.01
spec = importlib.util.spec_from_file_location("gpu_suite", sys.argv[1])
suite = importlib.util.module_from_spec(spec); spec.loader.exec_module(suite)
sys.exit(suite.main(["--dry-run", "--out", sys.argv[2], "--filter", "4x128 float32 fwd"]))
"""


#: Runs the dry run with mmkernels._triton.bilinear made unimportable: skipped and said so.
_NO_BILINEAR_TRITON = """
import importlib.abc, importlib.util, os, sys
os.environ["TRITON_INTERPRET"] = "1"; os.environ["MMKERNELS_BACKEND"] = "triton"

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmkernels._triton.bilinear":
            raise ImportError("blocked by the test")

sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("gpu_suite", sys.argv[1])
suite = importlib.util.module_from_spec(spec); spec.loader.exec_module(suite)
sys.exit(suite.main(["--dry-run", "--out", sys.argv[2], "--filter", "4x128 float32 fwd"]))
"""


@pytest.mark.interp
def test_gpu_suite_skips_a_family_without_its_triton_module(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _NO_BILINEAR_TRITON, str(ROOT / "bench" / "gpu_suite.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SKIPPING the bilinear family (1 cases)" in proc.stdout and "blocked by the test" in proc.stdout
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert "bilinear" in data["skipped_families"]
    assert [r["case"] for r in data["results"]] == ["softmax-4x128-dim-1-float32"]
    assert "Skipped family bilinear" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.interp
def test_gpu_suite_exits_nonzero_on_a_failed_check(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _BROKEN_RUN, str(ROOT / "bench" / "gpu_suite.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "correctness: 0/1 passed" in proc.stdout and "FAILED softmax-4x128-dim-1-float32 fwd" in proc.stdout
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["results"]
    assert len(rows) == 1 and not rows[0]["check"]["passed"]


# ------------------------------------------------------------------------------------------------
# the shared pieces
# ------------------------------------------------------------------------------------------------


def test_select_cases_in_another_dtype():
    """``--dtype`` runs the main job's cases in one dtype: every case in it, ids unique (the softmax
    rows that differ only by dtype once), and the other cases unchanged."""
    from mmkernels.bench.cli import select_cases

    own = select_cases("bench", ["gating", "softmax"])
    bf16 = select_cases("bench", ["gating", "softmax"], "bfloat16")
    assert {c.dtype for c in bf16} == {torch.bfloat16}
    assert len({c.id for c in bf16}) == len(bf16) < len(own)
    assert {c.id.replace("float32", "bfloat16") for c in own} == {c.id for c in bf16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        select_cases("bench", ["gating"], "int8")


def test_host_time_records_the_moe_launches_and_runs_none(monkeypatch):
    """The host-time measurement records every routing / experts launch and runs none, whether
    the kernels are jitted or interpreted (as in the tests, under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from mmkernels.bench.host import launches_recorded, moe_layer_host_time

    def ran(self, *args, **kwargs):
        raise AssertionError(f"{self} ran under launches_recorded")

    monkeypatch.setattr(InterpretedFunction, "run", ran)
    monkeypatch.setattr(JITFunction, "run", ran)
    r = moe_layer_host_time(repeats=3, warmup=1)
    assert r["forward_launches"] > 0 and r["backward_launches"] > 0
    assert r["forward_us"] > 0 and r["backward_us"] > 0
    with launches_recorded() as calls:  # and the kernels are back afterwards
        pass
    from mmkernels._backend import kernel_names
    from mmkernels._triton import experts, routing

    for module in (routing, experts):
        assert all(isinstance(getattr(module, n), (JITFunction, InterpretedFunction)) for n in kernel_names(module))
        assert len(kernel_names(module)) >= 4
    assert calls == []


def test_check_catches_unwritten_and_wrong_outputs():
    case = _case()
    raw = bench.random_inputs(case, torch.device("cpu"), seed=3)
    fwd, bwd = bench.variants_for(case)
    with mmkernels.use_backend("cpu"):
        assert bench.check_variant(fwd, raw, backend="cpu")["passed"]
        assert bench.check_variant(bwd, raw, backend="cpu")["passed"]

    def unwritten(i):
        y = torch.softmax(i["x"], -1)
        y[1, 5] = float("nan")
        return y

    def wrong(i):
        return torch.softmax(i["x"], -1) * (1 + 1e-4)

    fwd.ours = unwritten
    rep = bench.check_variant(fwd, raw, backend="cpu")
    assert not rep["passed"] and rep["nonfinite_mismatch"] == 1
    fwd.ours = wrong
    rep = bench.check_variant(fwd, raw, backend="cpu")
    assert not rep["passed"] and rep["max_rel"] > rep["tol_max_rel"]


def _bilinear_case(n=64, b=8, c=8, d=16, bias=True):
    return Case("bilinear", "bilinear", (n,), torch.float32, frozenset({"test"}), {"b": b, "c": c, "d": d, "bias": bias})


def test_bilinear_check_each_output_on_its_own_scale():
    case = _bilinear_case()
    raw = bench.random_inputs(case, torch.device("cpu"), seed=3)
    fwd, fb = bench.variants_for(case)
    assert fb.outputs == ("y", "dz", "dx", "dw", "db") and fb.flops == 3 * fwd.flops == 3 * 2 * 64 * 8 * 8 * 16
    with mmkernels.use_backend("cpu"):
        # a bound of 256 elements: two rows for y, dz, dx; eight output features for dw and db
        rep = bench.check_variant(fb, raw, backend="cpu", max_elems=256)
        assert rep["passed"], rep["detail"]
        p = rep["parts"]
        assert p["y"]["sampled_elements"] == 2 * 16 and p["dz"]["sampled_elements"] == 2 * 8
        assert p["dw"]["sampled_elements"] == 8 * 8 * 8 and p["db"]["sampled_elements"] == 8
        assert bench.check_variant(fwd, raw, backend="cpu", max_elems=256)["passed"]
        assert bench.check_variant(bench.variants_for(_bilinear_case(bias=False))[1], raw, backend="cpu")["passed"]

        ours = fb.ours

        def small_error_in_dx(i):  # 1e-4 of dx's own scale: far below y's or dw's
            y, dz, dx, dw, db = ours(i)
            return y, dz, dx + 1e-4 * dx.abs().max(), dw, db

        def unwritten_dw(i):
            y, dz, dx, dw, db = ours(i)
            dw = dw.clone()
            dw[3, 2, 1] = float("nan")
            return y, dz, dx, dw, db

        fb.ours = small_error_in_dx
        rep = bench.check_variant(fb, raw, backend="cpu")
        assert not rep["passed"] and [n for n, q in rep["parts"].items() if not q["passed"]] == ["dx"]
        assert "dx FAILED" in rep["detail"]
        fb.ours = unwritten_dw
        rep = bench.check_variant(fb, raw, backend="cpu")
        assert not rep["passed"] and rep["parts"]["dw"]["nonfinite_mismatch"] == 1


def test_bilinear_targets():
    def row(n, direction, ratio, frac, dtype="bfloat16"):
        return {"family": "bilinear", "op": "bilinear", "direction": direction, "shape": [n], "dtype": dtype,
                "params": {"b": 256, "c": 256, "d": 256, "bias": True}, "case": f"c{n}{direction}",
                "ratio": ratio, "frac_mm": frac, "check": {"passed": True}}

    rows = [row(8192, "fwd", 12.0, 0.72), row(8192, "fwd+bwd", 9.0, 0.60), row(64, "fwd", 1.5, 0.1),
            row(64, "fwd+bwd", 0.9, 0.1), row(8192, "fwd", 1.0, 0.1, dtype="float32")]
    res = {t["target"].split(" (")[0]: t for t in bench.evaluate_targets(rows, bench.all_targets())}
    assert res["bilinear fwd >= 70% of the bf16 mm rate"]["status"] == "PASS"
    assert res["bilinear fwd >= 10x F.bilinear"]["status"] == "PASS"
    assert res["bilinear fwd+bwd >= 55% of the bf16 mm rate"]["status"] == "PASS"
    assert res["bilinear fwd+bwd >= 10x F.bilinear"]["failing"] == ["c8192fwd+bwd:fwd+bwd ratio=9.000"]
    assert res["bilinear fwd faster than F.bilinear"]["status"] == "PASS"
    assert res["bilinear fwd+bwd faster than F.bilinear"]["status"] == "FAIL"


def test_row_sample_keeps_whole_rows_first_and_last():
    gen = torch.Generator().manual_seed(0)
    d, idx = sample_index((100, 64), keep=(1,), max_elems=640, gen=gen)
    assert d == 0 and len(idx) == 10 and idx[0] == 0 and idx[-1] == 99
    assert sample_index((4, 64), keep=(1,), max_elems=640, gen=gen) == (None, None)
    d, idx = sample_index((8, 50, 16), keep=(1,), max_elems=400, gen=gen)
    assert d == 2 and idx[0] == 0 and idx[-1] == 15  # the largest free dim, the reduced dim whole


def test_copy_like_keeps_layouts():
    base = torch.randn(6, 8)
    for t in (base, base.t(), base[:, ::2], base[:1].expand(6, 8)):
        c = copy_like(t)
        assert torch.equal(c, t) and c.stride() == t.stride() and c.data_ptr() != t.data_ptr()


def test_time_fn_and_rotation_on_cpu():
    x = [torch.randn(256, 256) for _ in range(3)]
    t = bench.time_fn([lambda i=i: torch.softmax(x[i], -1) for i in range(3)], torch.device("cpu"),
                      warmup=1, repeats=4)
    assert t.method == "perf_counter" and len(t.samples_ms) == 4 and t.buffer_sets == 3 and t.median_ms > 0
    assert bench.rotation_sets(100 << 20, 32 << 20) == 1
    assert bench.rotation_sets(8 << 20, 32 << 20) == 16
    assert bench.rotation_sets(32 << 20, 32 << 20) == 4


def test_time_interleaved_takes_samples_in_turn():
    """Entries in turn, each after every other equally often, and the buffer sets walked in one
    sequence across the entries (no call finds its set fresh from the entry before it)."""
    order = []
    named = {"a": [lambda i=i: order.append(("a", i)) for i in range(3)], "b": [lambda: order.append(("b", 0))]}
    t = bench.timing.time_interleaved(named, warmup=1, repeats=3)
    timed = order[-6:]  # after the warm-up and the estimate
    assert timed == [("a", 0), ("b", 0), ("a", 2), ("b", 0), ("a", 1), ("b", 0)]
    for n in range(2, 6):
        names = "vwxyz"[:n]
        entries = {c: [lambda c=c: order.append(c)] for c in names}
        bench.timing.time_interleaved(entries, warmup=1, repeats=n - 1)
        walk = order[-n * (n - 1):]
        pairs = [(walk[i], walk[(i + 1) % len(walk)]) for i in range(len(walk))]
        # every ordered pair of different entries once, closing on itself: never twice in a row
        assert sorted(pairs) == sorted((p, q) for p in names for q in names if p != q), walk
    t4 = bench.timing.time_interleaved(named, warmup=1, repeats=4)  # two whole walks of two
    assert [len(v.samples_ms) for v in t4.values()] == [4, 4]
    assert [name for name, _ in order[-8:]] == ["a", "b"] * 4
    assert set(t) == {"a", "b"} and all(len(v.samples_ms) == 3 for v in t.values())
    assert t["a"].buffer_sets == 3 and t["a"].method == "perf_counter-interleaved"
    with pytest.raises(ValueError):
        bench.timing.time_interleaved({"a": []})


def test_time_interleaved_settles_a_spread_row(monkeypatch):
    """A stall over two of an entry's five samples: whole walks more (both entries alike) until the
    quartile spread is under settle_spread, and the median is the quiet one; never past settle_s or
    max_repeats, and never with a fixed number of repeats. (A scripted clock: the calls advance it.)"""
    clock = [0.0]
    monkeypatch.setattr(bench.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def entry(durations_ms):
        it = iter(durations_ms)
        return [lambda: clock.__setitem__(0, clock[0] + next(it) / 1e3)]

    def run(a_ms, **kw):
        named = {"a": entry(a_ms), "b": entry(itertools.repeat(2.0))}
        return bench.timing.time_interleaved(named, warmup=1, target_s=1e-3, min_repeats=5, **kw)

    untimed = [1.0, 1.0]  # a warm-up call and the estimate's
    stall = untimed + [1.0, 9.0, 9.0, 1.0, 1.0]
    t = run(itertools.chain(stall, itertools.repeat(1.0)), settle_spread=0.1, settle_s=1.0)
    # [1 x 7, 9, 9]: the quartiles at 1 (inclusive method), after four walks of (a, b)
    assert [len(v.samples_ms) for v in t.values()] == [9, 9]
    assert t["a"].median_ms == pytest.approx(1.0) and t["a"].quartile_spread == pytest.approx(0.0)
    assert t["b"].median_ms == pytest.approx(2.0)
    # a stall that never ends: stops at settle_s (3 ms a walk: 0.03 s is ten walks) or max_repeats
    forever = itertools.chain(untimed, itertools.cycle([1.0, 9.0]))
    t = run(forever, settle_spread=0.1, settle_s=0.03)
    assert 5 < len(t["a"].samples_ms) <= 5 + 11 and len(t["a"].samples_ms) == len(t["b"].samples_ms)
    forever = itertools.chain(untimed, itertools.cycle([1.0, 9.0]))
    assert len(run(forever, settle_spread=0.1, settle_s=10.0, max_repeats=12)["a"].samples_ms) == 12
    forever = itertools.chain(untimed, itertools.cycle([1.0, 9.0]))
    assert len(run(forever, settle_spread=0.1, settle_s=10.0, repeats=5)["a"].samples_ms) == 5
    assert len(run(itertools.chain(stall, itertools.repeat(1.0)))["a"].samples_ms) == 5  # settling off
    assert bench.timing.quartile_spread([1.0]) != bench.timing.quartile_spread([1.0])  # NaN


def test_time_interleaved_gives_each_call_a_set_as_long_untouched():
    """Three entries on one list of four buffer sets (as the main job runs ours and its baselines):
    each timed call's set was last used exactly four calls before, whichever entry it belongs to."""
    log = []
    sets = range(4)
    named = {name: [lambda name=name, s=s: log.append((name, s)) for s in sets] for name in ("ours", "eager", "path")}
    bench.timing.time_interleaved(named, warmup=1, repeats=8)
    timed = [s for _, s in log[-24:]]
    assert all(timed[c] == timed[c - 4] for c in range(4, 24))
    assert all(len(set(timed[c:c + 3])) == 3 for c in range(0, 24, 3))  # a round: three different sets
    assert {name for name, _ in log[-24:]} == set(named)


def test_peak_memory_cpu_counts_the_output():
    peak, method = bench.peak_memory(lambda: torch.empty(1 << 20), torch.device("cpu"))
    assert "profiler" in method and peak is not None and peak >= 4 << 20


def test_targets_pass_fail_no_data():
    def row(n, direction, ratio, frac):
        return {"family": "softmax", "op": "softmax", "direction": direction, "shape": [8192, n], "dim": -1,
                "dtype": "float32", "case": f"c{n}", "ratio": ratio, "frac_copy": frac, "check": {"passed": True}}

    rows = [row(4096, "fwd", 1.2, 0.9), row(65536, "fwd", 1.1, 0.6), row(2048, "bwd", 1.7, 0.85)]
    res = {t["target"].split(" (")[0]: t for t in bench.evaluate_targets(rows, bench.all_targets())}
    assert res["softmax fwd >= 85% of copy bandwidth"]["status"] == "FAIL"
    assert res["softmax fwd >= 85% of copy bandwidth"]["failing"] == ["c65536:fwd frac_copy=0.600"]
    assert res["softmax fwd never slower than torch.softmax"]["status"] == "PASS"
    assert res["softmax bwd >= 1.6x torch eager backward"]["status"] == "PASS"
    assert bench.evaluate_targets([], bench.all_targets())[0]["status"] == "NO DATA"


def test_rescore_uses_the_better_ceilings_and_skips_crashed_rows():
    from mmkernels.bench.ceilings import best_of
    from mmkernels.bench.measure import _error_row, rescore

    first = {"copy": {"GBps": 20.0, "bytes": 1}, "mm": {"TFLOPs": 0.10, "n": 8, "dtype": "float32"}}
    again = {"copy": {"GBps": 10.0, "bytes": 1}, "mm": {"TFLOPs": 0.20, "n": 8, "dtype": "float32"}}
    ceil = best_of(first, again)
    assert ceil["copy"]["GBps"] == 20.0 and ceil["mm"]["TFLOPs"] == 0.20
    assert ceil["mm"]["samples"] == [0.10, 0.20]
    row = {"bytes": 2e6, "flops": 1e9, "ours_ms": 10.0, "baseline_ms": {"eager": 20.0}}
    crashed = _error_row(_case(), RuntimeError("boom"))
    rescore([row, crashed], ceil)
    assert row["frac_mm"] == pytest.approx(0.1 / 0.2) and row["baseline_frac_mm"]["eager"] == pytest.approx(0.25)
    assert row["frac_copy"] == pytest.approx(0.2 / 20.0)
    assert "frac_mm" not in crashed
