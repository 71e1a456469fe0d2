"""Compile tier (docs/DESIGN.md, "Verification tiers", item 3): every softmax-family kernel at
every launch config compiles ahead of time for sm_80 and sm_90 on this CPU machine and meets the
EXPECTATIONS its module declares; the expectation checker itself reports violations; the jobs are
the launchers' own launches.

Runs with or without TRITON_INTERPRET=1 (under the interpreter the compile tier re-runs itself in a
subprocess without it). ``pytest -m compile tests/test_compile_tier.py``.
"""
from __future__ import annotations

import textwrap

import pytest

from mmkernels.testing import compile_tier as C
from tests.conftest import assert_launch_is_compiled, compile_family, describe_results, record_launches

pytestmark = pytest.mark.compile

TARGETS = (80, 90)
SOFTMAX_KERNELS = (
    "softmax_fwd_fused_kernel",
    "softmax_fwd_online_kernel",
    "softmax_bwd_fused_kernel",
    "softmax_bwd_looped_kernel",
    "softmax_split_partials_kernel",
    "softmax_split_fwd_out_kernel",
    "softmax_split_bwd_out_kernel",
)


@pytest.fixture(scope="module")
def softmax_results():
    return compile_family("softmax", TARGETS)


def test_softmax_every_config_compiles_and_meets_expectations(softmax_results):
    assert softmax_results, "the compile tier compiled nothing"
    not_compiled = [r for r in softmax_results if not r.compiled]
    assert not not_compiled, "compile failures:\n" + describe_results(not_compiled)
    violated = [r for r in softmax_results if r.violations]
    assert not violated, "expectations violated:\n" + describe_results(violated)
    code, failed = C.summary(softmax_results)
    assert code == 0 and not failed


def test_softmax_kernels_on_both_targets_without_spills(softmax_results):
    spills = []
    for kernel in SOFTMAX_KERNELS:
        for target in TARGETS:
            rs = [r for r in softmax_results if r.kernel == kernel and r.target == target]
            assert rs, f"{kernel} was not compiled for sm_{target}"
            assert all(r.registers is not None and r.registers > 0 for r in rs), \
                f"{kernel} sm_{target}: resource usage not parsed"
            spills += [r for r in rs if r.local_memory != 0 or r.spill_stores != 0]
    assert not spills, "spills:\n" + "\n".join(
        f"{r.label()}: regs={r.registers} local={r.local_memory} stack={r.stack} "
        f"spill stores/loads={r.spill_stores}/{r.spill_loads}" for r in spills)


def test_softmax_every_launch_config_is_covered(softmax_results):
    """Each config of launch_configs() was compiled, with the kernel it selects, on both targets."""
    from mmkernels.families.softmax import config_label
    from mmkernels.ops.softmax import launch_configs

    seen = {(r.kernel, r.config, r.target) for r in softmax_results}
    for cfg, _layout, _f64 in launch_configs():
        fwd, bwd = (("softmax_fwd_online_kernel", "softmax_bwd_looped_kernel") if cfg.online
                    else ("softmax_fwd_fused_kernel", "softmax_bwd_fused_kernel"))
        for kernel in (fwd, bwd):
            for target in TARGETS:
                assert (kernel, f"{config_label(cfg)} w={cfg.num_warps}", target) in seen, (kernel, cfg, target)
    # the non-representative variants are there too (storage dtypes, kinds, int64)
    variants = {r.variant.split(" columns")[0].split(" rows")[0] for r in softmax_results}
    for v in ("fp32 softmax", "bf16 softmax", "fp16 softmax", "fp64 softmax", "fp32 log_softmax",
              "fp32 softmin", "fp32 softmax int64"):
        assert v in variants, v


# ----------------------------------------------------------------------------------------------
# The checker: violations are failures
# ----------------------------------------------------------------------------------------------


def _fake(**kw) -> C.Result:
    base = dict(family="softmax", kernel="softmax_fwd_fused_kernel", config="BLOCK_I=4 BLOCK_N=512 w=4",
                variant="fp32 softmax rows", target=90, num_warps=4, compiled=True, registers=96,
                stack=0, local_memory=0, spill_stores=0, spill_loads=0, shared_static=0,
                shared_dynamic=64, mma=[])
    base.update(kw)
    return C.Result(**base)


def test_violated_expectation_is_reported_as_failure():
    clean = _fake()
    assert C.check_expectations(clean, {"local_memory": 0}) == []

    spilled = _fake(registers=128, local_memory=96, stack=96, spill_stores=80, spill_loads=96)
    violations = C.check_expectations(spilled, {"local_memory": 0})
    assert len(violations) == 1 and "local_memory" in violations[0] and "96" in violations[0]
    spilled.violations = violations
    assert not spilled.passed and spilled.status == "FAIL"

    code, failed = C.summary([clean, spilled])
    assert code == 1 and failed == [spilled]
    assert C.summary([clean]) == (0, [])
    assert "FAIL" in C.format_table([clean, spilled])


@pytest.mark.parametrize("expectation, result_kw, expect_violation", [
    ({"stack": 0}, dict(stack=16), True),
    ({"stack": 32}, dict(stack=16), False),
    ({"spills": 0}, dict(spill_stores=8), True),
    ({"spills": 0}, dict(spill_stores=0), False),
    ({"max_registers": 128}, dict(registers=168), True),
    ({"max_registers": {80: 255, 90: 128}}, dict(registers=168, target=80), False),
    ({"max_registers": {80: 255, "sm_90": 128}}, dict(registers=168, target=90), True),
    ({"mma": "HGMMA"}, dict(target=90, mma=["HMMA"]), True),
    ({"mma": "HGMMA"}, dict(target=80, mma=["HMMA"]), False),   # wgmma is required on sm_90 only
    ({"mma": {80: "HMMA", 90: "HGMMA"}}, dict(target=90, mma=["HGMMA"]), False),
    ({"mma": {80: "HMMA", 90: "HGMMA"}}, dict(target=80, mma=[]), True),
    ({"local_memroy": 0}, {}, True),                               # a typo is not silently ignored
    ({}, dict(registers=200, num_warps=16), True),                 # 200 x 512 threads > 64K registers
    ({}, dict(shared_dynamic=300_000), True),                      # over sm_90's shared memory
])
def test_expectation_keys(expectation, result_kw, expect_violation):
    assert bool(C.check_expectations(_fake(**result_kw), expectation)) is expect_violation


def test_compile_failure_is_a_failure():
    broken = _fake(compiled=False, registers=None, local_memory=None,
                   error="CompilationError: tile too large")
    assert C.check_expectations(broken, {"local_memory": 0}) == []  # nothing to measure ...
    assert not broken.passed and C.summary([_fake(), broken]) == (1, [broken])  # ... still fails


def test_parse_resource_usage():
    text = textwrap.dedent("""
        Resource usage:
         Common:
          GLOBAL:0
         Function softmax_fwd_fused_kernel:
          REG:255 STACK:776 SHARED:16 LOCAL:776 CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0
    """)
    assert C.parse_resource_usage(text, "softmax_fwd_fused_kernel") == {
        "registers": 255, "stack": 776, "shared_static": 16, "local_memory": 776}
    log = ("ptxas info    : Function properties for softmax_bwd_fused_kernel\n"
           "    80 bytes stack frame, 80 bytes spill stores, 96 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 80 bytes cumulative stack size")
    assert C.parse_ptxas_spills(log) == {"ptxas_stack": 80, "spill_stores": 80, "spill_loads": 96}
    assert C.parse_mma("  HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;") == ["HGMMA"]
    assert C.parse_mma("  FFMA R1, R2, R3, R4 ;\n  HMMA.16816.F32 R4, R8, R12, R4 ;") == ["HMMA"]
    assert C.parse_mma("  FFMA R1, R2, R3, R4 ;") == []



_SASS_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R8], desc[UR4][R10.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0050*/              @!P0 BRA `(.L_x_1) ;
        /*0060*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0070*/               @P1 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""


def test_parse_main_loop():
    """The innermost loop holding an MMA: its instructions, MMA count and FLOPs (from the shapes),
    and its global loads by opcode; none without a loop around an MMA."""
    assert C.parse_main_loop(_SASS_LOOPS) == {
        "instructions": 4, "mma": 2, "mma_flops": 2 * (2 * 64 * 128 * 16),
        "loads": {"LDGSTS.E.BYPASS.128": 1}}
    assert C.main_loop_merit(C.parse_main_loop(_SASS_LOOPS)) == 2 * (2 * 64 * 128 * 16) / 4
    outer_only = _SASS_LOOPS.replace("HGMMA.64x128x16.F32.BF16", "FFMA")
    assert C.parse_main_loop(outer_only)["mma_flops"] == 2 * 16 * 8 * 16  # the HMMA's loop
    assert C.parse_main_loop("  /*0000*/  HMMA.16816.F32 R4, R8, R12, R4 ;") is None
    assert C.main_loop_merit(None) is None

_PROBE_GEMM = '''
import triton
import triton.language as tl


@triton.jit
def probe_gemm_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))
'''


def test_mma_found_in_sass_of_a_gemm(tmp_path, monkeypatch):
    """A one-tile fp16 GEMM: HMMA on sm_80, HGMMA (wgmma) on sm_90, read from the real SASS."""
    (tmp_path / "mmk_probe_gemm.py").write_text(_PROBE_GEMM)
    monkeypatch.syspath_prepend(str(tmp_path))
    div16 = [["tt.divisibility", 16]]
    jobs = [C.Job(family="probe", module="mmk_probe_gemm", kernel="probe_gemm_kernel",
                  config="BM=128 BN=128 BK=64 w=4", variant="fp16->fp32", target=t,
                  signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
                             "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
                  constexprs={"BM": 128, "BN": 128, "BK": 64},
                  attrs={"a_ptr": div16, "b_ptr": div16, "c_ptr": div16},
                  options={"num_warps": 4})
            for t in TARGETS]
    expect = {"mma": {80: "HMMA", 90: "HGMMA"}, "local_memory": 0}
    r80, r90 = C.run_jobs(jobs, {("probe", "probe_gemm_kernel"): expect}, jobs=2)
    assert r80.passed and r90.passed, describe_results([r80, r90])
    assert "HMMA" in r80.mma and "HGMMA" not in r80.mma
    assert "HGMMA" in r90.mma
    # and the same SASS fails an expectation it does not meet
    assert C.check_expectations(r80, {"mma": {80: "HGMMA"}})


# ----------------------------------------------------------------------------------------------
# The compile tier compiles what the launchers launch
# ----------------------------------------------------------------------------------------------

_LAUNCHES = [  # (direction, shape, dim, kind, dtype)
    ("fwd", (64, 1000), -1, 0, "float32"),      # rows, fused, unaligned row stride
    ("fwd", (8, 4096), -1, 1, "bfloat16"),      # rows, log-softmax, bf16
    ("fwd", (3, 16384), 1, 2, "float64"),       # rows, softmin, float64: looped, few rows (split)
    ("fwd", (2, 20000), -1, 0, "float16"),      # rows, online
    ("fwd", (256, 64), 0, 0, "float32"),        # columns (reduced dim strided)
    ("fwd", (40000, 3), 0, 0, "float32"),       # columns, looped
    ("bwd", (64, 1000), -1, 0, "float32"),
    ("bwd", (2, 20000), -1, 1, "float32"),      # rows, looped
    ("bwd", (256, 64), 0, 2, "bfloat16"),       # columns
]


@pytest.mark.parametrize("direction, shape, dim, kind, dtype", _LAUNCHES)
def test_real_launches_are_compiled(monkeypatch, direction, shape, dim, kind, dtype):
    """A launch the softmax launcher makes for real inputs (kernels replaced by recorders, CPU
    tensors), specialised by Triton's own binder, is one the compile tier compiles: same kernel,
    argument types (strides equal to 1 as constexpr 1), constexprs and warps — at a config of
    launch_configs()."""
    import torch

    from mmkernels._triton import softmax as K
    from mmkernels.ops import softmax as S

    calls = record_launches(monkeypatch, K, SOFTMAX_KERNELS)
    dt = getattr(torch, dtype)
    x = torch.randn(shape).to(dt)
    dim = dim % x.dim()  # the launchers take the normalised dim
    if direction == "fwd":
        S.triton_forward(x, dim, S.Kind(kind), dt)
    else:
        S.triton_backward(x, torch.randn(shape).to(dt), dim, S.Kind(kind), dt)
    assert len(calls) in (1, 2), calls  # one kernel, or the split pair (partials, then the output)
    monkeypatch.undo()  # the real kernels back: the compile tier records the family's own launches
    for name, real, kw in calls:
        job = assert_launch_is_compiled("softmax", name, real, kw)
        online = name not in ("softmax_fwd_fused_kernel", "softmax_bwd_fused_kernel")
        cfg = S.SoftmaxConfig(kw["BLOCK_I"], kw["BLOCK_N"], kw["num_warps"], online)
        assert cfg in {c for c, _, _ in S.launch_configs()} and job.options["num_warps"] == cfg.num_warps


def test_compile_errors_and_crashes_are_failures_of_their_own(tmp_path, monkeypatch):
    """A config the compiler rejects and a compile that kills its process each give one failed
    result; the jobs around them still compile, and the run's exit code is non-zero."""
    (tmp_path / "mmk_crash_probe.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from mmkernels.families import FAMILIES

    good = next(j for j in C.family_jobs(FAMILIES["softmax"], (80,))
                if j.kernel == "softmax_fwd_fused_kernel" and j.constexprs["BLOCK_N"] == 1024)
    rejected = C.Job(**{**good.__dict__, "variant": "BLOCK_N=3",
                        "constexprs": {**good.constexprs, "BLOCK_N": 3}})  # arange needs a power of 2
    crash = C.Job(**{**good.__dict__, "module": "mmk_crash_probe", "variant": "crash"})
    results = C.run_jobs([good, rejected, crash, good], jobs=2)
    assert [r.variant for r in results] == [good.variant, "BLOCK_N=3", "crash", good.variant]
    assert results[0].passed and results[3].passed
    assert not results[1].compiled and "power of 2" in results[1].error
    assert not results[2].compiled and "died" in results[2].error
    assert C.summary(results) == (1, [results[1], results[2]])


#: (family, kernel, variant) of the jobs that check the shared front end: a row kernel, a bf16
#: GEMM (tensor cores, a main loop) and the router (sort networks, int64 metadata).
_FRONT_END_PROBES = (("softmax", "softmax_bwd_fused_kernel", "fp32 log_softmax 64 rows of odd N = 1001"),
                     ("bilinear", "bilinear_fwd_kernel", "bf16"),
                     ("routing", "route_topk_kernel", None))


def test_a_build_from_the_shared_ttir_measures_what_a_build_from_source_does():
    """run_jobs runs Triton's front end once per job for both targets and builds sm_90 from sm_80's
    TTIR: every figure the tier reads (registers, stack, spills, shared memory, load width,
    tensor-core instructions, the main loop's SASS) is what a build of sm_90 from the kernel's
    source gives, for each kind of kernel of :data:`_FRONT_END_PROBES`."""
    from mmkernels.families import FAMILIES

    jobs = []
    for family, kernel, variant in _FRONT_END_PROBES:
        pair = [next(j for j in C.family_jobs(FAMILIES[family], (t,))
                     if j.kernel == kernel and (variant is None or j.variant == variant)) for t in TARGETS]
        assert C.front_end_key(pair[0]) == C.front_end_key(pair[1])
        jobs += pair
    shared = C.run_jobs(jobs, jobs=2)
    alone = C.run_jobs(jobs, jobs=2, share_front_end=False)
    assert [r.front_end for r in shared] == ["python", "ttir"] * len(_FRONT_END_PROBES)
    assert {r.front_end for r in alone} == {"python"}
    assert all(r.compiled for r in shared + alone), describe_results(shared + alone)
    fields = ("registers", "stack", "local_memory", "spill_stores", "spill_loads", "shared_static",
              "shared_dynamic", "mma", "load_bits", "main_loop")
    for a, b in zip(shared, alone):
        assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}, a.label()
    assert any(r.main_loop for r in shared)  # the GEMM's SASS main loop was compared too
    other = dict(jobs[1].options, num_warps=2 * int(jobs[1].options.get("num_warps", 4)))
    with pytest.raises(ValueError, match="differ in more than their target"):
        C.compile_for_targets([jobs[0], C.Job(**{**jobs[1].__dict__, "options": other})])


def test_softmax_aligned_launches_use_16_byte_loads(softmax_results):
    """With sizes and strides that are multiples of 16 (what Triton specialises for N = 4096 etc.),
    every load of at least 16 contiguous bytes per thread is a 128-bit vector load: the
    representative fp32 / fp64 builds, rows along BLOCK_N and columns along BLOCK_I."""
    import re

    checked = 0
    for r in softmax_results:
        if "unaligned" in r.variant or not r.variant.startswith(("fp32 softmax", "fp64 softmax")):
            continue
        bi, bn = (int(v) for v in re.findall(r"BLOCK_[IN]=(\d+)", r.config))
        contiguous = bn if r.variant.endswith("rows") else bi
        elem_bits = 64 if r.variant.startswith("fp64") else 32
        threads = 32 * r.num_warps
        if contiguous * elem_bits < 128 or bi * bn * elem_bits < 128 * threads:
            continue  # too few contiguous elements per thread for a 16-byte vector
        checked += 1
        assert r.load_bits == 128, f"{r.label()}: widest global load {r.load_bits} bits"
    assert checked > 50
