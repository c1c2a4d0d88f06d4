"""Optimizer state per rank and step time of lowbit on an FSDP2 model (fully_shard, Gloo,
CPU) for 1, 2 and 4 ranks: lowbit.Shampoo 4-bit and fp32 (default mode: each rank
preconditions its local shard; and 4-bit in lossless mode) and lowbit.AdamW 4-bit, with torch.optim.AdamW as the
baseline of the same run.

    LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/fsdp2_scaling.py \\
        --ranks 1 2 4 --markdown out.md

fsdp_mode="lossless" rows also give the MiB each rank gathers and broadcasts per step (whole
parameters and gradients). State bytes are each rank's own count (state_bytes(); torch AdamW: its tensors' bytes), so
they are exact. Time is the optimizer step alone (forward and backward excluded), the
median over --steps steps after a warm-up of one T2 cycle, on rank 0, each rank with one
thread: on a machine with fewer cores than ranks the ranks share cores and the times
grow; read them as a trend, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTHS = [512, 1024, 1024, 512]
INTERVALS = dict(stat_interval=10, root_interval=50)


def _optimizers() -> Dict[str, Any]:
    import lowbit

    return {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "lowbit AdamW 4-bit": lambda ps: lowbit.AdamW(ps, lr=1e-3, bits=4),
        "lowbit Shampoo fp32": lambda ps: lowbit.Shampoo(ps, lr=1e-3, bits=32, **INTERVALS),
        "lowbit Shampoo 4-bit": lambda ps: lowbit.Shampoo(ps, lr=1e-3, bits=4, **INTERVALS),
        "lowbit Shampoo 4-bit lossless": lambda ps: lowbit.Shampoo(ps, lr=1e-3, bits=4, fsdp_mode="lossless",
                                                                  **INTERVALS),
    }


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes().total)
    total = 0
    for state in opt.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def _rank(rank: int, world: int, init_file: str, out: str, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, make in _optimizers().items():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:])]
        model = torch.nn.Sequential(*layers)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = make(model.parameters())
        x = torch.randn(32, WIDTHS[0], generator=torch.Generator().manual_seed(1))
        times = []
        for step in range(INTERVALS["root_interval"] + steps):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - t0
            if step >= INTERVALS["root_interval"]:
                times.append(elapsed)
        steps_taken = INTERVALS["root_interval"] + steps
        moved = opt.communication().get("fsdp_bytes", 0) if hasattr(opt, "communication") else 0
        results[name] = {"state_bytes": _state_bytes(opt), "ms": 1e3 * statistics.median(times),
                         "mib_moved_per_step": moved / steps_taken / 2**20}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=50, help="timed steps (one T2 cycle by default)")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args()
    rows: Dict[str, Dict[int, Dict[str, float]]] = {}
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as out:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(out, "init"), out, args.steps))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            per_rank = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]
        for name in per_rank[0]:
            rows.setdefault(name, {})[world] = {"max_state_mib": max(r[name]["state_bytes"] for r in per_rank) / 2**20,
                                                "ms": per_rank[0][name]["ms"],
                                                "moved": per_rank[0][name]["mib_moved_per_step"]}
    header = "| optimizer | " + " | ".join(f"{w} rank(s): max state MiB/rank, step ms" for w in args.ranks) + " |"
    lines = [header, "|" + "---|" * (len(args.ranks) + 1)]
    for name, by_world in rows.items():
        cells = [f"{by_world[w]['max_state_mib']:.2f}, {by_world[w]['ms']:.1f}"
                 + (f" ({by_world[w]['moved']:.1f} MiB moved/step)" if by_world[w]["moved"] else "")
                 for w in args.ranks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
