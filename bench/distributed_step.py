#!/usr/bin/env python3
"""Distributed Shampoo on one machine (CPU, Gloo on loopback): optimizer step time for 1, 2
and 4 processes, and bytes exchanged per root update, for fp32 and 4-bit Shampoo, in one run.

    LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/distributed_step.py

Every step refreshes statistics and roots (T1 = T2 = 1), the worst case for the matrix
work that the ranks share; the gradients are equal on every rank (as after DDP), so the
time is the optimizer's alone. Each rank gets cores / N intra-op threads (--threads to fix it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Transformer-block-like weights (d = 512, MLP 4d) and a conv layer viewed as 2-D.
SHAPES = [(512, 512)] * 4 + [(2048, 512), (512, 2048), (128, 64, 3, 3)]


def worker(rank: int, world: int, init_file: str, bits: int, steps: int, threads: int, out: str) -> None:
    import lowbit

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(*s, generator=g).requires_grad_(True) for s in SHAPES]
    opt = lowbit.Shampoo(params, lr=1e-3, bits=bits, stat_interval=1, root_interval=1,
                         process_group=dist.group.WORLD if world > 1 else None)
    times = []
    for k in range(steps + 1):  # the first step (state creation) is not timed
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k))
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        dist.barrier()
        if k > 0:
            times.append(time.perf_counter() - start)
    if rank == 0:
        traffic = opt.communication()
        with open(out, "w") as f:
            json.dump({"step_s": sorted(times)[len(times) // 2],
                       "state_bytes_per_update": traffic["state_bytes"] / max(1, traffic["exchanges"])}, f)
    dist.destroy_process_group()


def measure(world: int, bits: int, steps: int, threads: int) -> dict:
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(world, os.path.join(tmp, "init"), bits, steps, threads, out),
                           nprocs=world, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0: cores / N)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    procs = [int(n) for n in args.procs.split(",")]
    rows = {}
    for bits in (32, 4):
        for n in procs:
            rows[(bits, n)] = measure(n, bits, args.steps, args.threads)
    print(f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, threads per rank "
          f"{args.threads or 'cores / N'}, shapes {SHAPES}")
    print(f"{'bits':>4} {'procs':>5} {'step (median)':>14} {'vs 1 proc':>10} {'state bytes / root update':>26}")
    for (bits, n), r in rows.items():
        base = rows[(bits, procs[0])]["step_s"]
        print(f"{bits:>4} {n:>5} {1000 * r['step_s']:>11.1f} ms {r['step_s'] / base:>9.2f}x "
              f"{r['state_bytes_per_update']:>26.0f}")
    for n in procs[1:]:
        ratio = rows[(32, n)]["state_bytes_per_update"] / rows[(4, n)]["state_bytes_per_update"]
        print(f"{n} procs: fp32 / 4-bit bytes per root update = {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{b}bit_{n}proc": r for (b, n), r in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
