"""The MoE routing family: router scores -> top-k -> renormalisation -> exact dispatch metadata
(:func:`mmkernels.moe.route`).

Cases: ops are router styles (:data:`STYLES`: Mixtral, Qwen3, DeepSeek-V3, gpt-oss); the shape is
``(T, E)``; params ``k`` and the style's options (``n_groups``, ``topk_groups``,
``capacity_factor``); inputs ``logits`` (T, E), ``bias`` (E,) for DeepSeek-V3 and an incoming
gradient ``dw`` (T, k) of the weights. Bench: route + metadata (and its backward) against the
torch composition users write. Compile tier: every launch config at fp32 Mixtral routing forward
and backward, and at top-k 8 every router style, bf16, fp64 and caller-given ids.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from mmkernels import reference as ref
from mmkernels.family import Case, CheckSample, Family, Inputs, Outputs, Target, Variant, case_builder, compiled, randn
from mmkernels.ops import routing as R

#: ``moe.route`` options of each router style, given its case params.
STYLES = {
    "mixtral": lambda p: {},
    "qwen3": lambda p: {"renormalize": False},
    "deepseek": lambda p: {"scoring": "sigmoid", "n_groups": p["n_groups"], "topk_groups": p["topk_groups"],
                           "routed_scaling": p.get("routed_scaling", 2.5)},
    "gptoss": lambda p: {"softmax_after_topk": True},
}
#: Relative gap under which two selection keys (or group scores) computed in float32 may order
#: differently than in float64.
NEAR_TIE = 1e-5

_case = case_builder("routing")


def route_kwargs(case: Case, inputs: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """The keyword arguments of ``moe.route`` for ``case`` (besides the logits and top-k)."""
    kw = dict(STYLES[case.op](case.params))
    if "bias" in inputs:
        kw["selection_bias"] = inputs["bias"]
    if case.params.get("capacity_factor") is not None:
        kw["capacity_factor"] = case.params["capacity_factor"]
    return kw


def cases() -> List[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    out: List[Case] = []

    def add(style, T, E, k, dtype, tags, **params):
        out.append(_case(style, (T, E), dtype, tags, k=k, **params))

    # the main job on CPU (Qwen3 2048 x 64: the router of the CPU MoE block of the experts family)
    add("mixtral", 4096, 64, 8, f32, {"bench"})
    add("qwen3", 2048, 64, 8, f32, {"bench"})
    add("deepseek", 2048, 256, 8, f32, {"bench"}, n_groups=8, topk_groups=4)
    # the GPU suite: the acceptance size (T = 16384, E = 128, k = 8), the models' own shapes, decode
    for dt in (f32, bf16):
        add("mixtral", 16384, 128, 8, dt, {"gpu"})
        add("qwen3", 16384, 128, 8, dt, {"gpu"})
    add("mixtral", 16384, 8, 2, bf16, {"gpu"})
    add("deepseek", 16384, 256, 8, f32, {"gpu"}, n_groups=8, topk_groups=4)
    add("gptoss", 16384, 128, 4, bf16, {"gpu"})
    add("mixtral", 64, 128, 8, bf16, {"gpu"})
    add("mixtral", 16384, 128, 8, f32, {"gpu"}, capacity_factor=1.25)
    # the GPU suite's dry run: softmax, grouped sigmoid, capacity drops
    add("mixtral", 40, 16, 4, f32, {"dry-run"})
    add("deepseek", 24, 32, 4, f32, {"dry-run"}, n_groups=4, topk_groups=2)
    add("qwen3", 33, 8, 2, torch.float16, {"dry-run"}, capacity_factor=1.0)
    return out


def _near_ties(logits: torch.Tensor, bias: torch.Tensor, k: int, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Rows whose DeepSeek-V3 selection (sigmoid + bias, group top-2 sums) has a near tie among the
    ranks that decide it: fp32 rounding could then choose or order differently than float64."""
    key = torch.sigmoid(logits.double().cpu()) + bias.double().cpu()
    T, E = key.shape
    gs = key.view(T, n_groups, E // n_groups).topk(2, dim=-1).values.sum(-1)

    def close(v, n):  # adjacent gaps among the n + 1 largest
        top = v.topk(min(n + 1, v.shape[1]), dim=-1).values
        return ((top[:, :-1] - top[:, 1:]) <= NEAR_TIE * top[:, :-1].abs()).any(-1)

    return close(key, k) | close(gs, topk_groups) if n_groups > 1 else close(key, k)


def inputs(case: Case, device: torch.device, gen: torch.Generator) -> Inputs:
    """Logits ``randn · scale``; DeepSeek-V3 cases also a bias ``randn · 0.1``, and their rows with a
    near tie in the selection (:func:`_near_ties`) are drawn again, so that checks against a float64
    reference can be exact (the logits-keyed routers select on the stored logits: no rounding)."""
    T, E = case.shape
    k = int(case.params["k"])
    scale = float(case.params.get("scale", 2.0))
    out = {"logits": randn((T, E), case.dtype, device, gen, scale), "dw": randn((T, k), torch.float32, device, gen)}
    if case.op == "deepseek":
        out["bias"] = bias = randn((E,), torch.float32, device, gen, 0.1)
        logits = out["logits"]
        for _ in range(20):
            rows = _near_ties(logits, bias, k, int(case.params["n_groups"]), int(case.params["topk_groups"]))
            rows = rows.nonzero().flatten()
            if rows.numel() == 0:
                break
            logits[rows.to(logits.device)] = randn((rows.numel(), E), case.dtype, device, gen, scale)
    return out


# ----------------------------------------------------------------------------------------------
# Bench spec
# ----------------------------------------------------------------------------------------------

def torch_route(logits: torch.Tensor, k: int, op: str, params: Mapping[str, Any], bias: Optional[torch.Tensor],
                counts_by: str = "bincount") -> Tuple[torch.Tensor, ...]:
    """The torch composition users write today: scores -> topk -> renormalise -> argsort -> bincount
    -> cumsum (``counts_by="scatter"``: counts by ``scatter_add_``, which needs no host sync and
    so can be captured in a CUDA graph; ``bincount`` on CUDA reads the maximum back to the host).
    Returns (weights fp32, expert_ids, counts, offsets, sorted_slots), the ids in topk's order."""
    T, E = logits.shape
    if op == "gptoss":
        top, ids = torch.topk(logits, k, dim=-1)
        w = torch.softmax(top.float(), dim=-1)
    elif op == "deepseek":  # transformers' DeepseekV3TopkRouter after its linear layer
        scores = torch.sigmoid(logits.float())
        choice = scores + bias
        g = int(params["n_groups"])
        group_scores = choice.view(T, g, E // g).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=int(params["topk_groups"]), dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        mask = mask.unsqueeze(-1).expand(T, g, E // g).reshape(T, E)
        ids = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * float(params.get("routed_scaling", 2.5))
    else:
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if op == "mixtral":
            w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    sorted_slots = torch.argsort(flat, stable=True)
    if counts_by == "bincount":
        counts = torch.bincount(flat, minlength=E)
    else:
        counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    i32 = torch.int32
    return w, ids.to(i32), counts.to(i32), offsets.to(i32), sorted_slots.to(i32)


OUTPUTS = ("weights", "expert_ids", "counts", "offsets", "sorted_slots")


def variants(case: Case, compile_baseline: bool = False) -> List[Variant]:
    """``fwd`` (route + metadata; the integers checked exactly against the float64 reference, over
    the whole case) and ``fwd+bwd`` (weights, then d logits for an incoming ``dw``). Baselines:
    ``eager`` = :func:`torch_route` (DeepSeek-V3: transformers' router); ``nosync`` = the same with
    counts by ``scatter_add_`` (timed like ours, in CUDA graphs). Bytes: the logits read once;
    weights, ids, sorted_slots and the inverse written once (fwd+bwd: plus dw read and d logits
    written)."""
    from mmkernels import moe

    T, E = case.shape
    k = int(case.params["k"])
    esize = torch.empty((), dtype=case.dtype).element_size()
    names = ("logits", "bias") if case.op == "deepseek" else ("logits",)
    shape_text = f"{T}x{E} k={k}" + (f" cap={case.params['capacity_factor']}" if case.params.get("capacity_factor")
                                     else "")

    def everything(inputs: Inputs, max_elems: int, gen: torch.Generator) -> List[CheckSample]:
        # the metadata depends on every token: no sample
        return [CheckSample(inputs, OUTPUTS if "dw" not in inputs else ("weights", "dlogits"), lambda n, t: t)]

    def ours(i: Inputs) -> Outputs:
        r = moe.route(i["logits"], k, **route_kwargs(case, i))
        return r.weights, r.expert_ids, r.counts, r.offsets, r.sorted_slots

    def base(counts_by: str):
        return lambda i: torch_route(i["logits"], k, case.op, case.params, i.get("bias"), counts_by)

    def reference(i: Inputs) -> Outputs:
        r = ref.route_ref(i["logits"], k, **route_kwargs(case, i))
        return tuple(r[n] for n in OUTPUTS)

    fwd_base = {"eager": base("bincount"), "nosync": base("scatter")}
    common = dict(case=case, passes=None, reduced_dims=(), shape_text=shape_text, check_samples=everything)
    slots = T * k * (4 + 4 + 4 + 4 + 1)  # weights, ids, sorted_slots, slot_rows, dropped
    fwd = Variant(direction="fwd", ours=ours, baselines=fwd_base, reference=reference,
                  prepare=lambda raw: {n: raw[n] for n in names}, bytes_moved=T * E * esize + slots,
                  outputs=OUTPUTS, **common)

    def fwd_bwd(fn):
        def call(i: Inputs) -> Outputs:
            w = fn(i)
            (g,) = torch.autograd.grad(w, i["logits"], i["dw"])
            return w.detach(), g
        return call

    def ref_fb(i: Inputs) -> Outputs:
        logits = i["logits"].detach().requires_grad_()
        w = ref.route_ref(logits, k, **route_kwargs(case, i))["weights"]
        (g,) = torch.autograd.grad(w, logits, i["dw"].to(w.dtype))
        return w.detach(), g

    def prepare_fb(raw: Inputs) -> Inputs:
        out = {n: raw[n] for n in names}
        out["logits"] = raw["logits"].detach().requires_grad_()
        out["dw"] = raw["dw"]
        return out

    fb_base = {"eager": fwd_bwd(lambda i: base("bincount")(i)[0]), "nosync": fwd_bwd(lambda i: base("scatter")(i)[0])}
    fb = Variant(direction="fwd+bwd", ours=fwd_bwd(lambda i: ours(i)[0]), baselines=fb_base, reference=ref_fb,
                 prepare=prepare_fb, bytes_moved=2 * T * E * esize + slots + T * k * 4,
                 outputs=("weights", "dlogits"), **common)
    if compile_baseline:
        fwd_base["compile"] = compiled(
            lambda *ts: torch_route(ts[0], k, case.op, case.params, ts[1] if len(ts) > 1 else None, "scatter"), names)
    return [fwd, fb]


def targets() -> List[Target]:
    """GPU (T = 16384, E = 128, k = 8, dropless, softmax routers): route + metadata >= 3x the torch
    composition (both timed alike: ``ratio_nosync``; and with bincount, ``ratio``), in at most 3
    launches. CPU: >= 3x the torch composition at T = 2048, E = 64, k = 8 (the Qwen3 router)."""

    def rows(r: Mapping[str, Any]) -> bool:
        p = r.get("params") or {}
        return (r.get("family") == "routing" and r.get("direction") == "fwd"
                and list(r.get("shape", ())) == [16384, 128] and p.get("k") == 8
                and r.get("op") in ("mixtral", "qwen3") and not p.get("capacity_factor"))

    def cpu_rows(r: Mapping[str, Any]) -> bool:
        p = r.get("params") or {}
        return (r.get("family") == "routing" and r.get("direction") == "fwd" and r.get("op") == "qwen3"
                and list(r.get("shape", ())) == [2048, 64] and p.get("k") == 8 and not p.get("capacity_factor"))

    size = "(T=16384, E=128, k=8)"
    cpu = "(CPU, Qwen3 router, T=2048, E=64, k=8, fp32)"
    return [
        Target(f"route + metadata >= 3x the torch composition {size}", "ratio", 3.0, rows),
        Target(f"route + metadata >= 3x the sync-free torch composition {size}", "ratio_nosync", 3.0, rows),
        Target(f"route + metadata in at most 3 launches {size}", "launches", 3, rows, at_most=True),
        Target(f"route + metadata >= 3x the torch composition {cpu}", "ratio", 3.0, cpu_rows),
    ]


# ----------------------------------------------------------------------------------------------
# Compile-tier launches
# ----------------------------------------------------------------------------------------------

def launches(rec, target: int) -> None:
    """The routing launchers on meta tensors: every launch config :func:`mmkernels.ops.routing.
    launch_configs` stands for (expert counts 1 .. 1024, top-k 1, 8 and E, a few tokens and 2**20;
    one token too, whose routing is one block and one launch at every expert count),
    fp32 Mixtral routing forward and backward (both: from the weights' gradient and from the
    experts' partial sums); at top-k min(8, E) and 2**20 tokens also bf16 Qwen3
    (no renormalisation), DeepSeek-V3 (sigmoid, bias, groups), plain sigmoid scores, caller-given
    expert ids and fp64."""
    def launch(T, E, k, variant, dtype=torch.float32, **kw):
        logits = torch.empty((T, E), dtype=dtype, device="meta")
        bias = torch.empty((E,), device="meta") if kw.pop("bias", False) else None
        ids_in = torch.empty((T, k), dtype=torch.int32, device="meta") if kw.pop("given", False) else None
        spec = R.RouterSpec(k, **kw)
        cfg = R.resolve_config(T, E, k, dtype == torch.float64)
        with rec.variant(variant, config=f"BLOCK_T={cfg.block_t} E_PAD={cfg.e_pad} K_PAD={cfg.k_pad}"):
            R.triton_route(logits, bias, ids_in, spec, 2**31 - 1, R.DEFAULT_BLOCK_M)
            ids = torch.empty((T, k), dtype=torch.int32, device="meta")
            R.triton_route_backward(torch.empty((T, k), device="meta"), logits, ids, spec)
            # a MoE layer's node: the weights' gradient as the experts' partial sums (two per row)
            p = R.route_plan(T, E, spec, R.NO_CAPACITY, R.DEFAULT_BLOCK_M, dtype, False, False)
            R.launch_route_backward_from_partials(
                p, torch.empty((T * k * 2,), dtype=p.weights_dtype, device="meta"), 2,
                torch.empty((T * k,), dtype=torch.int32, device="meta"),
                torch.empty((E + 1,), dtype=torch.int32, device="meta"), logits, ids, torch.empty_like(logits))

    for E in (1, 2, 8, 61, 128, 256, 1024, R.MAX_EXPERTS):
        for k in sorted({1, min(8, E), E}):
            for T in (5, 1 << 20):
                launch(T, E, k, "fp32 mixtral")
        launch(1, E, min(8, E), "fp32 mixtral")  # one token: one block at every expert count
        k, T = min(8, E), 1 << 20
        launch(T, E, k, "bf16 qwen3", torch.bfloat16, renormalize=False)
        launch(T, E, k, "fp32 given ids", given=True)
        launch(T, E, k, "fp64 mixtral", torch.float64)
        if E >= 4:
            g = min(8, E // 2)
            launch(T, E, k, "fp32 deepseek", scoring="sigmoid", bias=True, n_groups=g, topk_groups=max(1, g // 2),
                   routed_scaling=2.5, key_on_scores=True)
            launch(T, E, k, "fp32 sigmoid", scoring="sigmoid", renormalize=False)


FAMILY = Family(name="routing", summary="MoE routing: scores, top-k, weights and exact dispatch metadata",
                cases=cases, inputs=inputs, variants=variants, targets=targets, launches=launches,
                cpp_ops=("route_softmax_topk", "route_metadata"))
