#!/usr/bin/env python
"""Expert parallelism: an MoE layer whose experts live on P processes (mmkernels.nn.MoE with a
process group), trained for a few steps; prints the tokens each rank's experts received (the
load imbalance) and the step time.

CPU, gloo, P processes spawned here (what CI runs):

    python examples/expert_parallel.py --procs 2 [--steps 10]

GPUs, NCCL, one process per GPU:

    torchrun --nproc_per_node=<gpus> examples/expert_parallel.py

Every rank builds the same full layer from one seed and keeps its shard
(``shard_state_dict``), so the result is the single-process layer's (the tests check that).
"""
import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

HIDDEN, INTER, EXPERTS, TOP_K = 64, 128, 8, 2


def worker(rank: int, world: int, args, port: int = 0) -> None:
    from mmkernels.nn import MoE
    from mmkernels.ops.expert_parallel import shard_state_dict

    nccl = port == 0 and torch.cuda.is_available()
    if nccl:  # torchrun: RANK / WORLD_SIZE / MASTER_ADDR in the environment
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    device = torch.device("cuda") if nccl else torch.device("cpu")
    torch.manual_seed(0)
    full = MoE(HIDDEN, INTER, EXPERTS, TOP_K)
    layer = MoE(HIDDEN, INTER, EXPERTS, TOP_K, process_group=dist.group.WORLD).to(device)
    layer.load_state_dict(shard_state_dict(full.state_dict(), rank, world))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)
    received = torch.zeros(world, dtype=torch.int64, device=device)
    times = []
    for step in range(args.steps):
        x = (torch.randn(args.tokens, HIDDEN, generator=gen) + 0.3 * rank).to(device)  # ranks differ: skewed load
        t0 = time.perf_counter()
        out = layer(x)
        loss = out.output.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        counts = out.counts.to(torch.int64)
        dist.all_reduce(counts)  # slots every expert received, from all ranks
        received += counts.reshape(world, -1).sum(1)
    step_ms = torch.tensor([1e3 * sorted(times)[len(times) // 2]], device=device)
    all_ms = [torch.zeros_like(step_ms) for _ in range(world)]
    dist.all_gather(all_ms, step_ms)
    if rank == 0:
        total = int(received.sum())
        per = EXPERTS // world
        print(f"expert parallelism: {world} ranks ({'nccl' if nccl else 'gloo'}), {EXPERTS} experts "
              f"({per} per rank), {args.tokens} tokens per rank per step, {args.steps} steps")
        print(f"{'rank':>4} {'experts':>9} {'slots received':>15} {'share':>7} {'step ms':>8}")
        for r in range(world):
            share = int(received[r]) / max(total, 1)
            print(f"{r:>4} {f'{r * per}-{(r + 1) * per - 1}':>9} {int(received[r]):>15} {share:>7.1%} "
                  f"{float(all_ms[r]):>8.1f}")
        print(f"load imbalance (max / mean): {float(received.max()) / max(total / world, 1e-9):.2f}", flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes to spawn on CPU (gloo)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    if EXPERTS % args.procs:
        p.error(f"--procs must divide the {EXPERTS} experts")
    from mmkernels.testing.distributed import free_port

    torch.multiprocessing.spawn(worker, args=(args.procs, args, free_port()), nprocs=args.procs, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
