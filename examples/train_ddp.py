#!/usr/bin/env python3
"""Data-parallel training with torchrun + DDP + lowbit.Shampoo (Gloo on CPU, NCCL on GPU).

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --epochs 1 --limit 4000

DDP averages the gradients; lowbit.Shampoo(process_group=...) splits the preconditioner
work over the ranks (each factor updated by one rank, balanced by order^3) and broadcasts
the updated factors in their 4-bit form, so every rank keeps the same state and the
parameters stay bit-identical across ranks (checked at the end). Data and model are those
of train_fashion_mnist.py; each rank trains on its shard of every batch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from train_fashion_mnist import DEFAULT_DATA, SmallCNN, evaluate, lowbit, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, default=4, choices=[32, 8, 4, 3])
    parser.add_argument("--stat-interval", type=int, default=10)
    parser.add_argument("--root-interval", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    parser.add_argument("--data", default=os.environ.get("FASHION_MNIST", DEFAULT_DATA))
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    xtr, ytr, xte, yte, source = load(args.data, args.limit)
    model = DistributedDataParallel(SmallCNN().to(device))
    opt = lowbit.Shampoo(model.parameters(), lr=args.lr, bits=args.bits, stat_interval=args.stat_interval,
                         root_interval=args.root_interval, process_group=dist.group.WORLD)
    if rank == 0:
        print(f"{world} ranks ({'NCCL' if use_cuda else 'Gloo'}), {source}, {args.bits}-bit Shampoo", flush=True)

    step, start = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))  # same on every rank
        for i in range(0, len(xtr), args.batch_size):
            mine = order[i:i + args.batch_size][rank::world]  # this rank's shard of the global batch
            opt.zero_grad()
            F.cross_entropy(model(xtr[mine].to(device)), ytr[mine].to(device)).backward()  # DDP averages
            opt.step()
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if rank == 0:
            _, accuracy = evaluate(model.module, xte.to(device), yte.to(device))
            print(f"epoch {epoch}: test accuracy {100 * accuracy:.2f}%  ({time.perf_counter() - start:.1f} s)",
                  flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    agree = all(torch.equal(flat, other) for other in everyone)
    traffic = opt.communication()
    if rank == 0:
        print(f"{step} steps; parameters bit-identical on every rank: {'yes' if agree else 'NO'}; "
              f"preconditioner state exchanged: {traffic['state_bytes'] / 2**20:.2f} MiB in "
              f"{traffic['exchanges']} exchanges", flush=True)
    dist.destroy_process_group()
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
