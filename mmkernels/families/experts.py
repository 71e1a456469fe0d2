"""The MoE experts family: grouped expert GEMMs over a routing (:func:`mmkernels.moe.experts`) and
the dense mixture of experts built on them (:func:`mmkernels.moe.dense_moe`).

Cases: op ``experts`` per model shape (:data:`SHAPES`; the case's op is the model name), shape
``(T,)``, params ``H``, ``I``, ``E``, ``k``; inputs x (T, H), router logits (T, E), gate_up
(E, 2I, H), down (E, H, I) and an incoming gradient dout (T, H). Op ``dense_moe``: shape
``(T, H, I, E)``, inputs x, gate_weight (E, H), gate_up, down, dout. Bench: route + experts
forward and forward + backward against transformers' experts implementations (eager,
``grouped_mm``) and torch's ``_grouped_mm`` composed directly; the dense MoE against a softmax gate
and a loop over the experts. Compile tier: the forward and the whole backward at Mixtral, Qwen3
and an odd small shape, each dtype, every activation, interleaved gate/up with biases (gpt-oss),
and the decode tiles; each target with its own tiles.
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping

import torch

from mmkernels import reference as ref
from mmkernels.family import (Case, CheckSample, Family, Inputs, Outputs, Target, Variant, case_builder,
                              fwd_bwd_variant, randn)

#: (H, I, E, k) of the models the GPU suite runs, and the CPU block of the main job.
SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "olmoe": (2048, 1024, 64, 8),
          "qwen3_cpu": (512, 256, 64, 8)}

_case = case_builder("experts")


def cases() -> List[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    out: List[Case] = []

    def add(name, T, dtype, tags):
        H, I, E, k = SHAPES[name]
        out.append(_case(name, (T,), dtype, tags, H=H, I=I, E=E, k=k))

    # the main job on CPU: a Qwen3-MoE block, fp32, forward + backward
    add("qwen3_cpu", 2048, f32, {"bench"})
    # the GPU suite: the three model shapes at T = 16384, 64 (decode) and 1024, bf16
    for T in (16384, 64, 1024):
        for name in ("qwen3", "mixtral", "olmoe"):
            add(name, T, bf16, {"gpu"})
    # dense MoE (T, H, I, E)
    out.append(_case("dense_moe", (512, 256, 128, 8), f32, {"bench"}))
    out.append(_case("dense_moe", (8192, 1024, 512, 8), bf16, {"gpu"}))
    # the GPU suite's dry run (odd sizes)
    out.append(_case("qwen3", (40,), f32, {"dry-run"}, H=24, I=40, E=4, k=2))
    out.append(_case("dense_moe", (12, 8, 6, 3), f32, {"dry-run"}))
    return out


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    if case.op == "dense_moe":
        T, H, I, E = case.shape
        return {"x": randn((T, H), case.dtype, device, gen),
                "gate_weight": randn((E, H), case.dtype, device, gen, H ** -0.5),
                "gate_up": randn((E, 2 * I, H), case.dtype, device, gen, H ** -0.5),
                "down": randn((E, H, I), case.dtype, device, gen, I ** -0.5),
                "dout": randn((T, H), case.dtype, device, gen)}
    (T,) = case.shape
    H, I, E = (int(case.params[k]) for k in ("H", "I", "E"))
    return {"x": randn((T, H), case.dtype, device, gen),
            "logits": randn((T, E), torch.float32, device, gen),
            "gate_up": randn((E, 2 * I, H), case.dtype, device, gen, H ** -0.5),
            "down": randn((E, H, I), case.dtype, device, gen, I ** -0.5),
            "dout": randn((T, H), case.dtype, device, gen)}


# ----------------------------------------------------------------------------------------------
# Bench spec: the baselines
# ----------------------------------------------------------------------------------------------

def hf_experts(H: int, I: int, E: int, k: int, gate_up: torch.Tensor, down: torch.Tensor):
    """transformers' Qwen3-MoE experts module holding ``gate_up`` / ``down`` (shared, not copied),
    or None without transformers."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    # the very tensors (Parameters, see the variants' prepare): gradients reach the same leaves
    mod.gate_up_proj = gate_up if isinstance(gate_up, torch.nn.Parameter) else torch.nn.Parameter(gate_up, False)
    mod.down_proj = down if isinstance(down, torch.nn.Parameter) else torch.nn.Parameter(down, False)
    return mod


def torch_experts(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  k: int) -> torch.Tensor:
    """A plain torch MoE layer (the ``eager`` baseline without transformers): softmax -> topk, then a
    Python loop over the experts of ``index_select`` / ``mm`` / ``index_add``."""
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        h = x[t] @ gate_up[e].t()
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ down[e].t()
        out = out.index_add(0, t, y * w[t, j, None].to(x.dtype))
    return out


def torch_grouped_mm_experts(x: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                             k: int) -> torch.Tensor:
    """A ``torch._grouped_mm`` MoE layer written directly (no transformers): softmax -> topk, the
    slots sorted by expert (a permuted copy of x's rows), one grouped GEMM per projection over the
    experts' row ranges (``offs``: cumulative counts), SwiGLU between, the routing weight on the
    output rows and ``index_add`` back to the tokens. Differentiable; no host synchronisation."""
    E, I2, _ = gate_up.shape
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    h = torch._grouped_mm(x.index_select(0, tok), gate_up.transpose(-2, -1), offs=offs)
    a = torch.nn.functional.silu(h[:, : I2 // 2]) * h[:, I2 // 2:]
    y = torch._grouped_mm(a, down.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1).index_select(0, order)[:, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, tok, y)


def loop_dense_moe(x, gate_weight, gate_up, down):
    """Dense MoE as users write it: a softmax gate, then a Python loop over the experts (SwiGLU)."""
    p = torch.softmax(x @ gate_weight.T, dim=-1)
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gate_weight.shape[0]):
        h = x @ gate_up[e].T
        out = out + p[:, e:e + 1] * ((torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ down[e].T)
    return out


# ----------------------------------------------------------------------------------------------
# Bench spec: the variants
# ----------------------------------------------------------------------------------------------

def _dense_variants(case: Case, compile_baseline: bool) -> List[Variant]:
    """Dense MoE forward + backward vs :func:`loop_dense_moe`; useful FLOPs 3 x 6·T·E·H·I."""
    from mmkernels import moe

    T, H, I, E = case.shape
    esize = torch.empty((), dtype=case.dtype).element_size()
    wrt = ("x", "gate_weight", "gate_up", "down")
    return [fwd_bwd_variant(case, ours=lambda i: moe.dense_moe(*(i[n] for n in wrt)),
                            eager=lambda i: loop_dense_moe(*(i[n] for n in wrt)),
                            reference=lambda i: ref.dense_moe_ref(*(i[n] for n in wrt)), wrt=wrt, upstream="dout",
                            names=wrt + ("dout",), outputs=("out", "dx", "dgate_weight", "dgate_up", "ddown"),
                            bytes_moved=(T * H * 2 + 3 * E * H * I) * esize, flops=3 * 6 * T * E * H * I,
                            compile_baseline=compile_baseline)]


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """SwiGLU experts after a Qwen3-style router (softmax, top-k, no renormalisation): ``fwd``
    (route + experts) and ``fwd+bwd`` (then the gradients of x, gate_up_proj, down_proj and the
    router logits). Baselines: ``eager`` = transformers' Qwen3-MoE experts module (a Python loop
    over the experts hit), ``grouped_mm`` = the same with ``experts_implementation="grouped_mm"``;
    without transformers ``eager`` is :func:`torch_experts` and ``grouped_mm`` is absent;
    ``torch_grouped_mm`` = :func:`torch_grouped_mm_experts` where torch has ``_grouped_mm``. Useful
    FLOPs ``6·T·k·H·I`` forward, 3x that forward + backward. Bytes: the expert weights touched plus
    x and out — the measure at decode sizes. The check compares the output (and dx) on a sample of
    whole tokens with the float64 per-token reference (the weight gradients are the tests')."""
    if case.op == "dense_moe":
        return _dense_variants(case, compile_baseline)
    from mmkernels import moe

    (T,) = case.shape
    H, I, E, k = (int(case.params[n]) for n in ("H", "I", "E", "k"))
    esize = torch.empty((), dtype=case.dtype).element_size()
    flops = 6 * T * k * H * I
    weight_bytes = 3 * E * H * I * esize

    def ours_fwd(i: Inputs) -> torch.Tensor:
        r = moe.route(i["logits"], k, renormalize=False, block_m=moe.suggest_block_m(T, E, k))
        return moe.experts(i["x"], r, i["gate_up"], i["down"])

    def hf(impl: str):
        def call(i: Inputs) -> torch.Tensor:
            mod = i.get("_hf")
            if mod is None:
                mod = i["_hf"] = hf_experts(H, I, E, k, i["gate_up"], i["down"])
            mod.config._experts_implementation = impl
            w, ids = torch.topk(torch.softmax(i["logits"], dim=-1, dtype=torch.float32), k, dim=-1)
            return mod(i["x"], ids, w.to(i["x"].dtype))
        return call

    def sample(inputs: Inputs, max_elems: int, gen: torch.Generator) -> List[CheckSample]:
        n = min(T, 16)  # the float64 reference runs per token on the CPU: 16 tokens, first and last in
        rows = torch.cat([torch.tensor([0, T - 1]), torch.randperm(T, generator=gen)[: n - 2]]).unique()[:n]
        take = lambda name, t: t.index_select(0, rows.to(t.device))  # noqa: E731
        r_in = {"x": take("x", inputs["x"]), "logits": take("logits", inputs["logits"]),
                "gate_up": inputs["gate_up"], "down": inputs["down"]}
        parts = ("out",)
        if "dout" in inputs:
            r_in["dout"] = take("dout", inputs["dout"])
            parts = ("out", "dx")
        return [CheckSample(r_in, parts, take)]

    def reference(i: Inputs) -> Outputs:
        r = ref.route_ref(i["logits"], k, renormalize=False)
        x = i["x"].detach().requires_grad_()
        out = ref.experts_ref(x, r["weights"].detach(), r["expert_ids"], r["dropped"], i["gate_up"], i["down"])
        if "dout" not in i:
            return out
        (dx,) = torch.autograd.grad(out, x, i["dout"])
        return out.detach(), dx

    have_hf = hf_experts(1, 1, 1, 1, torch.empty(1, 2, 1), torch.empty(1, 1, 1)) is not None
    fwd_base = {"eager": hf("eager"), "grouped_mm": hf("grouped_mm")} if have_hf else {
        "eager": lambda i: torch_experts(i["x"], i["logits"], i["gate_up"], i["down"], k)}
    if hasattr(torch, "_grouped_mm"):
        fwd_base["torch_grouped_mm"] = lambda i: torch_grouped_mm_experts(i["x"], i["logits"], i["gate_up"],
                                                                          i["down"], k)
    common = dict(case=case, passes=None, reduced_dims=(), shape_text=f"T={T} H={H} I={I} E={E} k={k}",
                  check_samples=sample)

    def params(raw: Inputs, grad: bool) -> Inputs:
        """The expert weights as Parameters (what a model holds, and what transformers' module
        must be given for its gradients to reach the same leaves as ours)."""
        out = {n: raw[n].detach().requires_grad_(grad) for n in ("x", "logits")}
        out.update({n: torch.nn.Parameter(raw[n].detach(), requires_grad=grad) for n in ("gate_up", "down")})
        return out

    fwd = Variant(direction="fwd", ours=ours_fwd, baselines=fwd_base, reference=reference,
                  prepare=lambda raw: params(raw, False), bytes_moved=weight_bytes + 2 * T * H * esize,
                  outputs=("out",), flops=flops, **common)

    def fb(fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], Outputs]:
        def call(i: Inputs) -> Outputs:
            out = fn(i)
            grads = torch.autograd.grad(out, [i["x"], i["gate_up"], i["down"], i["logits"]], i["dout"])
            return out.detach(), grads[0]
        return call

    def prepare_fb(raw: Inputs) -> Inputs:
        out = params(raw, True)
        out["dout"] = raw["dout"]
        return out

    fwd_bwd = Variant(direction="fwd+bwd", ours=fb(ours_fwd), baselines={n: fb(f) for n, f in fwd_base.items()},
                      reference=reference, prepare=prepare_fb, bytes_moved=2 * weight_bytes + 4 * T * H * esize,
                      outputs=("out", "dx"), flops=3 * flops, **common)
    return [fwd, fwd_bwd]


def targets() -> List[Target]:
    """bf16 GPU, T = 16384 forward + backward >= 1x grouped_mm and >= 5x eager on the three shapes;
    forward >= 65% of the bf16 mm rate on Mixtral's shape; T = 64 >= 60% of copy over the touched
    expert weights. CPU (the C++ path): the Qwen3 block forward + backward >= 1.5x and 2x
    grouped_mm (transformers' fastest CPU experts at this shape), >= 1.3x the vectorised-torch path,
    >= 60% of the fp32 mm rate."""

    def rows(direction: str, T: int, ops=("mixtral", "qwen3", "olmoe")):
        def applies(r: Mapping[str, Any]) -> bool:
            return (r.get("family") == "experts" and r.get("direction") == direction
                    and list(r.get("shape", ())) == [T] and r.get("op") in ops)
        return applies

    cpu = rows("fwd+bwd", 2048, ("qwen3_cpu",))
    return [
        Target("experts fwd+bwd >= 1x transformers grouped_mm (T=16384, bf16)", "ratio_grouped_mm", 1.0,
               rows("fwd+bwd", 16384)),
        Target("experts fwd+bwd >= 5x transformers eager (T=16384, bf16)", "ratio", 5.0, rows("fwd+bwd", 16384)),
        Target("experts fwd >= 65% of the bf16 mm rate (Mixtral, T=16384)", "frac_mm", 0.65,
               rows("fwd", 16384, ("mixtral",))),
        Target("experts fwd >= 60% of copy over the touched weights (T=64)", "frac_copy", 0.60, rows("fwd", 64)),
        Target("experts CPU fwd+bwd >= 1.5x grouped_mm (Qwen3 block, T=2048, fp32)", "ratio_grouped_mm", 1.5, cpu),
        Target("experts CPU fwd+bwd >= 2x transformers' fastest (grouped_mm; Qwen3 block, T=2048, fp32)",
               "ratio_grouped_mm", 2.0, cpu),
        Target("experts CPU fwd+bwd >= 1.3x the vectorised-torch path (Qwen3 block, T=2048, fp32)",
               "ratio_torch_path", 1.3, cpu),
        Target("experts CPU fwd+bwd >= 60% of the fp32 mm rate (Qwen3 block, T=2048)", "frac_mm", 0.6, cpu),
    ]


# ----------------------------------------------------------------------------------------------
# Compile-tier launches
# ----------------------------------------------------------------------------------------------

def meta_routing(T: int, E: int, k: int):
    """A :class:`~mmkernels.moe.Routing` of meta tensors with the tile height the library's callers
    take (:func:`~mmkernels.moe.suggest_block_m`)."""
    from mmkernels.ops.routing import Routing, max_tiles, suggest_block_m

    block_m = suggest_block_m(T, E, k)
    i32 = dict(dtype=torch.int32, device="meta")
    nt = max_tiles(T * k, E, block_m)
    return Routing(torch.empty((T, k), device="meta"), torch.empty((T, k), **i32), torch.empty((E,), **i32),
                   torch.empty((E + 1,), **i32), torch.empty((T * k,), **i32), torch.empty((T * k,), **i32),
                   torch.empty((T, k), dtype=torch.bool, device="meta"), torch.empty((nt,), **i32),
                   torch.empty((nt,), **i32), torch.empty((1,), **i32), block_m, None)


def _expect(label: str):
    """bf16 / fp16 GEMMs on tensor cores (HGMMA on sm_90, by the kernels' EXPECTATIONS; decode's
    16-row tiles are under HGMMA's 64-row M: HMMA there); fp32 / fp64 (IEEE / FMA dots) none."""
    def expect(name: str, kw: dict):
        if not label.startswith(("bf16", "fp16")) or name in ("experts_combine_kernel", "experts_dw_kernel"):
            return {"mma": None}
        return {"mma": "HMMA"} if kw.get("BLOCK_M", 64) < 64 and name != "experts_dweight_kernel" else None
    return expect


def launches(rec, target: int) -> None:
    """The forward (with the saved pre-activation) and the whole backward, on meta tensors, with
    target's own tiles: bf16 and fp32 at Mixtral (H 4096, I 14336, E 8, k 2), Qwen3-30B-A3B (H 2048,
    I 768, E 128, k 8) and a small odd shape (H 24, I 40); fp16 Qwen3; Qwen3 also at T = 1024 and
    64 (64- and 16-row tiles); Mixtral at one token with the down GEMM split four ways; fp64 at the
    odd shape; every activation in bf16 at Qwen3; interleaved gate/up with biases (gpt-oss)."""
    from mmkernels.ops import experts as X

    def launch(label, T, H, I, E, k, dtype, act="silu", interleaved=False, bias=False, split_k=None):
        r = meta_routing(T, E, k)
        x = torch.empty((T, H), dtype=dtype, device="meta")
        gu = torch.empty((E, 2 * I, H), dtype=dtype, device="meta")
        dn = torch.empty((E, H, I), dtype=dtype, device="meta")
        b1 = torch.empty((E, 2 * I), dtype=dtype, device="meta") if bias else None
        b2 = torch.empty((E, H), dtype=dtype, device="meta") if bias else None
        spec = X.ExpertSpec(act, interleaved)
        with rec.variant(f"{label} bm={r.block_m}", expect=_expect(label)):
            _, h, _, a = X.triton_forward(x, r.weights, gu, dn, b1, b2, r, spec, save_h=True, arch=target // 10,
                                          split_k=split_k)
            X.triton_backward(torch.empty((T, H), dtype=dtype, device="meta"), x, r.weights, gu, dn, b1, b2, r,
                              h, a, spec, (True,) * 6, arch=target // 10)

    shapes = {"mixtral": (16384, 4096, 14336, 8, 2), "qwen3": (16384, 2048, 768, 128, 8), "odd": (64, 24, 40, 7, 3)}
    for name, shp in shapes.items():
        for dname, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            launch(f"{dname} {name}", *shp, dt)
    launch("fp16 qwen3", *shapes["qwen3"], torch.float16)
    for T in (1024, 64):  # 64-row tiles, and decode's 16-row tiles
        launch("bf16 qwen3", T, *shapes["qwen3"][1:], torch.bfloat16)
    for dname, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):  # one token: the down GEMM split-K
        launch(f"{dname} mixtral decode split-k", 1, *shapes["mixtral"][1:], dt, split_k=4)
    launch("fp64 odd", *shapes["odd"], torch.float64)
    for act in X.ACTIVATIONS[1:]:
        launch(f"bf16 qwen3 {act}", *shapes["qwen3"], torch.bfloat16, act=act)
    launch("bf16 gpt-oss (interleaved, biases)", 16384, 2880, 2880, 32, 4, torch.bfloat16, act="swiglu_oai",
           interleaved=True, bias=True)


FAMILY = Family(name="experts", summary="MoE experts: grouped GEMMs over a routing, and the dense MoE",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                cpp_ops=("experts_forward", "experts_backward"))
