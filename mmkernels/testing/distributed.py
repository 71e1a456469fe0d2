"""Multi-process checks of expert parallelism on CPU (gloo over loopback), shared by the tests and
the example: :func:`run` spawns P processes, each runs :func:`_worker`, and returns what each rank
reported.

Each rank also checks ``gather_state_dict`` and the error for experts that do not divide over
the ranks. Each rank compares its expert-parallel :class:`mmkernels.nn.MoE` (E/P experts, loaded with
``shard_state_dict``) against single-process ``MoE`` layers with the full weights on the same
inputs: its output and input gradient against the reference on its own tokens, its router
gradient likewise (the router is replicated, its gradient per rank), its experts' gradients
against the sum of the reference's over every rank's tokens (its experts saw all of them).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
import traceback
from typing import Dict, List, Optional

#: The scenarios a worker can run: (name, tokens per rank for P ranks, capacity factor, routing).
SCENARIOS = {
    "random": dict(tokens=[13, 9, 16, 11], capacity_factor=None, skew=False),
    "capacity": dict(tokens=[13, 9, 16, 11], capacity_factor=1.0, skew=False),
    "one token": dict(tokens=[1, 7, 1, 9], capacity_factor=None, skew=False),
    "all to rank 0": dict(tokens=[8, 5, 6, 7], capacity_factor=None, skew=True),
    "all to rank 0 with capacity": dict(tokens=[8, 5, 6, 7], capacity_factor=1.5, skew=True),
}
H, I, E, K = 12, 10, 8, 2
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel_err(a, b) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if a.numel() else 0.0


def _scenario(name: str, rank: int, P: int, group) -> List[str]:
    """Problems found in one scenario on this rank (empty: all equal to TOL)."""
    import torch

    from mmkernels.nn import MoE
    from mmkernels.ops.expert_parallel import shard_state_dict

    sc = SCENARIOS[name]
    sizes = sc["tokens"][:P]
    torch.manual_seed(0)
    ref = MoE(H, I, E, K, capacity_factor=sc["capacity_factor"])
    if sc["skew"]:  # positive tokens, rank 0's experts with positive gate rows: every slot goes there
        with torch.no_grad():
            El = E // P
            ref.gate.weight.abs_().mul_(5)
            ref.gate.weight[El:].neg_()
    ep = MoE(H, I, E, K, capacity_factor=sc["capacity_factor"], process_group=group)
    ep.load_state_dict(shard_state_dict(ref.state_dict(), rank, P))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(t, H, generator=gen) for t in sizes]
    gs = [torch.randn(t, H, generator=gen) for t in sizes]
    if sc["skew"]:
        xs = [x.abs() + 0.1 for x in xs]

    # the reference, batch by batch (each rank's own tokens, as its routing sees them)
    ref_out, ref_dx, ref_dgate = None, None, None
    for r, (x, g) in enumerate(zip(xs, gs)):
        xr = x.clone().requires_grad_()
        gate_before = None if ref.gate.weight.grad is None else ref.gate.weight.grad.clone()
        out = ref(xr).output
        (out * g).sum().backward()
        if r == rank:
            ref_out, ref_dx = out.detach(), xr.grad
            ref_dgate = ref.gate.weight.grad - (0 if gate_before is None else gate_before)

    x = xs[rank].clone().requires_grad_()
    res = ep(x)
    (res.output * gs[rank]).sum().backward()
    problems = []
    El = E // P
    lo, hi = rank * El, (rank + 1) * El
    checks = [("output", res.output.detach(), ref_out), ("d input", x.grad, ref_dx),
              ("d router", ep.gate.weight.grad, ref_dgate),
              ("d gate_up_proj", ep.experts.gate_up_proj.grad, ref.experts.gate_up_proj.grad[lo:hi]),
              ("d down_proj", ep.experts.down_proj.grad, ref.experts.down_proj.grad[lo:hi])]
    for what, got, want in checks:
        if got is None or got.shape != want.shape:
            problems.append(f"{name}: {what}: missing or shape {None if got is None else tuple(got.shape)}")
            continue
        err = _rel_err(got, want)
        if not err <= TOL:
            problems.append(f"{name}: {what}: relative error {err:.2e} > {TOL:.0e}")
    if sc["skew"] and rank > 0 and ep.experts.gate_up_proj.grad is not None \
            and ep.experts.gate_up_proj.grad.abs().sum() != 0:
        problems.append(f"{name}: rank {rank} received no tokens but its experts have gradients")
    return problems


def _helpers(rank: int, P: int, group) -> List[str]:
    """gather_state_dict gives back the full layer's state dict; E not divisible by P raises."""
    import torch

    from mmkernels.nn import MoE
    from mmkernels.ops.expert_parallel import gather_state_dict, shard_state_dict

    problems = []
    torch.manual_seed(0)
    full = MoE(H, I, E, K, bias=True)
    ep = MoE(H, I, E, K, bias=True, process_group=group)
    ep.load_state_dict(shard_state_dict(full.state_dict(), rank, P))
    back = gather_state_dict(ep.state_dict(), group)
    if set(back) != set(full.state_dict()) or not all(torch.equal(back[k], v) for k, v in full.state_dict().items()):
        problems.append("gather_state_dict did not give back the full state dict")
    try:
        MoE(H, I, E * P + 1, K, process_group=group)
        problems.append(f"num_experts={E * P + 1} over {P} ranks did not raise")
    except ValueError as exc:
        if "divisible" not in str(exc):
            problems.append(f"unclear error for indivisible experts: {exc}")
    return problems


def _worker(rank: int, P: int, port: int, scenarios: List[str], out_dir: str, fail_rank: Optional[int],
            timeout_s: float, hang: bool = False) -> None:
    import torch
    import torch.distributed as dist

    report = {"rank": rank, "problems": [], "error": None, "seconds": 0.0}
    t0 = time.time()
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if fail_rank is None:
            report["problems"] += _helpers(rank, P, dist.group.WORLD)
        for name in scenarios:
            if fail_rank == rank:
                if hang:  # alive but absent: the others must give up at the group's timeout
                    time.sleep(3 * timeout_s)
                raise RuntimeError(f"simulated failure of rank {rank} before the forward of {name!r}")
            report["problems"] += _scenario(name, rank, P, dist.group.WORLD)
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        report["traceback"] = traceback.format_exc()[-4000:]
    finally:
        report["seconds"] = time.time() - t0
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
                pass


def run(P: int, scenarios: List[str], fail_rank: Optional[int] = None, timeout_s: float = 60.0,
        deadline_s: float = 240.0, hang: bool = False) -> Dict[int, dict]:
    """Spawn P gloo processes on loopback running ``scenarios``; each rank's report (``problems``,
    ``error``, ``seconds``). ``fail_rank`` raises before its first forward (``hang``: after
    sleeping 3 x ``timeout_s``, alive but absent). Processes still alive after ``deadline_s`` are
    killed and reported as hung (``error`` = "hung")."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, P, port, scenarios, out_dir, fail_rank, timeout_s, hang))
                 for r in range(P)]
        for p in procs:
            p.start()
        end = time.time() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.time()))
        reports = {}
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                reports[r] = {"rank": r, "problems": [], "error": "hung", "seconds": deadline_s}
                continue
            path = os.path.join(out_dir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    reports[r] = json.load(f)
            else:
                reports[r] = {"rank": r, "problems": [], "error": f"exited with code {p.exitcode}, no report"}
    return reports
