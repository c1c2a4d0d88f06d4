#!/usr/bin/env python3
"""A small transformer trained with FSDP2 (fully_shard) and lowbit.Shampoo(bits=4).

    torchrun --standalone --nproc_per_node 2 examples/train_fsdp2.py [--mode lossless] [--steps 60]

Synthetic next-token prediction (sequences from a fixed random Markov chain, so there is
something to learn). Each rank trains on its slice of every batch and FSDP2 averages the
gradients. Rank 0 also trains the same model in one process on the whole batch, and the
script prints both loss curves, and each rank's optimizer state next to what AdamW would
keep (two fp32 moments of the local shards).

The curves must match (the script exits with 1 if not):
- ``--mode lossless``: the optimizer steps the whole parameters as one process would, bit
  for bit; the only difference is the order in which FSDP2 and one process sum the
  per-example gradients (relative rounding about 1e-7 per step), which the training
  amplifies (5e-4 at most over the 60 steps on 2 ranks, measured 2026-12-04). Stated
  tolerance: every loss within 1e-2 relative of one process's.
- ``--mode local`` (default): each rank preconditions its own rows, a different (block
  diagonal) preconditioner than one process's. Stated tolerance: the mean loss of the last
  10 steps within 5% of one process's.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lowbit

VOCAB, SEQ, WIDTH = 16, 12, 32


class TinyTransformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=2 * WIDTH, dropout=0.0, batch_first=True)
            for _ in range(2))
        self.head = torch.nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(SEQ - 1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, src_mask=self.mask, is_causal=True)
        return self.head(x)


def batches(steps: int, batch: int) -> list:
    """Sequences of a fixed random Markov chain over VOCAB tokens (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    transition = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=g), dim=1)
    out = []
    for _ in range(steps):
        seq = [torch.randint(0, VOCAB, (batch,), generator=g)]
        for _ in range(SEQ - 1):
            seq.append(torch.multinomial(transition[seq[-1]], 1, generator=g).squeeze(1))
        out.append(torch.stack(seq, dim=1))
    return out


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_optimizer(params, mode: str) -> lowbit.Shampoo:
    # min_quant_numel 256: this model's factors are small (order 32 to 64); the default (4096)
    # would keep them in fp32.
    return lowbit.Shampoo(params, lr=3e-3, bits=4, stat_interval=5, root_interval=10, min_quant_numel=256,
                          fsdp_mode=mode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=48, help="global batch, split over the ranks")
    parser.add_argument("--mode", default="local", choices=["local", "lossless"])
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the {world} ranks")
    torch.manual_seed(0)
    model = TinyTransformer()
    reference = copy.deepcopy(model) if rank == 0 else None
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters(), args.mode)
    reference_opt = make_optimizer(reference.parameters(), "local") if reference is not None else None

    share = args.batch_size // world
    sharded_losses, reference_losses = [], []
    for tokens in batches(args.steps, args.batch_size):
        loss = loss_of(model, tokens[rank * share:(rank + 1) * share])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        sharded_losses.append(float(mean) / world)
        if reference is not None:
            whole = loss_of(reference, tokens)
            reference_opt.zero_grad(set_to_none=True)
            whole.backward()
            reference_opt.step()
            reference_losses.append(whole.item())

    state = torch.tensor([opt.state_bytes().total,
                          sum(8 * p.to_local().numel() for p in model.parameters())], dtype=torch.float64)
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    ok = True
    if rank == 0:
        print(f"FSDP2 on {world} ranks, lowbit.Shampoo 4-bit, fsdp_mode={args.mode!r}; "
              f"one process: {reference_opt.state_bytes().total} state bytes")
        for r, s in enumerate(states):
            print(f"  rank {r}: optimizer state {int(s[0])} bytes; AdamW would keep {int(s[1])}")
        print("step  FSDP2 loss  one-process loss")
        for k in range(0, args.steps, 10):
            print(f"{k:4d}  {sharded_losses[k]:.5f}     {reference_losses[k]:.5f}")
        print(f"{args.steps - 1:4d}  {sharded_losses[-1]:.5f}     {reference_losses[-1]:.5f}")
        if args.mode == "lossless":
            worst = max(abs(a - b) / abs(b) for a, b in zip(sharded_losses, reference_losses))
            ok = worst <= 1e-2
            print(f"largest relative difference {worst:.2e} (tolerance 1e-2): {'MATCH' if ok else 'DIFFERENT'}")
        else:
            tail = lambda xs: sum(xs[-10:]) / len(xs[-10:])  # noqa: E731
            gap = abs(tail(sharded_losses) - tail(reference_losses)) / tail(reference_losses)
            ok = gap <= 0.05
            print(f"last-10 mean loss {tail(sharded_losses):.5f} vs {tail(reference_losses):.5f}, relative gap "
                  f"{gap:.2e} (tolerance 5e-2): {'MATCH' if ok else 'DIFFERENT'}")
    verdict = torch.tensor([1 if ok else 0])
    dist.broadcast(verdict, src=0)
    # Gloo destroys a finished collective's work (and the tensors it holds) on its own
    # thread; if that happens while Python shuts down, the decref waits for the GIL, Python
    # ends the thread, and the process aborts ("terminate called without an active
    # exception", 1 run in 8 here). So: let the last broadcast settle, then tear down.
    del opt, reference_opt, model, reference
    dist.barrier()
    dist.destroy_process_group()
    return 0 if int(verdict) else 1


if __name__ == "__main__":
    sys.exit(main())
