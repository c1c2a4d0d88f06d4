"""Step time and peak memory of lowbit.Shampoo (fp32 and 4-bit) against torch.optim.AdamW,
on issue 18's shape sets, in one process: JSON plus a markdown table.

    LOWBIT_LIBRARY=build-cuda/liblowbit.so PYTHONPATH=python python3 bench/gpu_compare.py \\
        --device cuda --json out.json --markdown out.md
    ... --device cpu --preset tiny          # the small CPU run the test suite makes

Every optimizer sees the same shapes, intervals (T1 = 10, T2 = 50 unless given) and
gradients (a pool of random tensors made before timing). ms/step is the mean over
`--cycles` full T2 cycles after one warm-up cycle; the plain step (no refresh) is reported
on its own. On CUDA the clock reads follow torch.cuda.synchronize(), and peak memory is
torch.cuda.max_memory_allocated() after a reset, less the parameters and gradients.
The authors' 4-bit Shampoo and Meta's Distributed Shampoo are not driven by this script
yet (issue 18 asks for --authors / --meta-ds); time them in the same process by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import lowbit

Shape = Tuple[int, ...]

# Issue 18's shape sets (one parameter per entry).
PRESETS: Dict[str, Dict[str, List[Shape]]] = {
    "issue18": {
        "transformer block d=1024": [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)],
        "conv stack": [(256, 256, 3, 3)] * 4 + [(512, 256, 3, 3)],
        "wide block d=2048": [(2048, 2048)] * 4 + [(8192, 2048), (2048, 8192)],
    },
    # Small enough for the CPU test suite: the same structure (several factors of one order).
    "tiny": {
        "block d=32": [(32, 32)] * 4 + [(128, 32), (32, 128)],
        "conv 8x8x3x3": [(8, 8, 3, 3)] * 2,
    },
}


def optimizers(stat_interval: int, root_interval: int, max_dim: int) -> Dict[str, Callable]:
    common = dict(lr=1e-3, stat_interval=stat_interval, root_interval=root_interval,
                  max_preconditioner_dim=max_dim, graft="adamw")
    return {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "lowbit fp32": lambda ps: lowbit.Shampoo(ps, bits=32, **common),
        "lowbit 4-bit": lambda ps: lowbit.Shampoo(ps, bits=4, **common),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizer(make: Callable, shapes: Sequence[Shape], device: torch.device, root_interval: int,
                   stat_interval: int, cycles: int, seed: int) -> Dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.randn(*s, generator=g).to(device).requires_grad_(True) for s in shapes]
    pool = [[torch.randn(*s, generator=g).to(device) for s in shapes] for _ in range(3)]
    opt = make(params)

    def step(k: int) -> None:
        for p, grad in zip(params, pool[k % len(pool)]):
            p.grad = grad
        opt.step()

    for k in range(root_interval):  # warm-up: every factor created and refreshed once
        step(k)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    plain: List[float] = []
    total = 0.0
    for k in range(root_interval, root_interval * (1 + cycles)):
        start = time.perf_counter()
        step(k)
        synchronize(device)
        elapsed = time.perf_counter() - start
        total += elapsed
        if (k + 1) % stat_interval != 0 and (k + 1) % root_interval != 0:
            plain.append(elapsed)
    result = {"ms_per_step": 1e3 * total / (root_interval * cycles),
              "plain_step_ms": 1e3 * sum(plain) / max(1, len(plain))}
    if device.type == "cuda":
        result["peak_added_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return result


def markdown(results: Dict) -> str:
    names = list(next(iter(results["sets"].values())))
    lines = [f"| shapes (T1 = {results['stat_interval']}, T2 = {results['root_interval']}) | "
             + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for set_name, by_opt in results["sets"].items():
        cells = []
        for n in names:
            r = by_opt[n]
            cell = f"{r['ms_per_step']:.2f} ms (plain {r['plain_step_ms']:.2f})"
            if "peak_added_mib" in r:
                cell += f", {r['peak_added_mib']:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    ratios = [f"{s}: 4-bit / fp32 {b['lowbit 4-bit']['ms_per_step'] / b['lowbit fp32']['ms_per_step']:.2f}"
              for s, b in results["sets"].items()]
    return "\n".join(lines) + "\n\n" + "; ".join(ratios) + "\n"


def main(argv: Sequence[str] | None = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue18")
    parser.add_argument("--stat-interval", type=int, default=10)
    parser.add_argument("--root-interval", type=int, default=50)
    parser.add_argument("--max-preconditioner-dim", type=int, default=1200)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    a = parser.parse_args(argv)
    device = torch.device(a.device)
    results: Dict = {"device": str(device), "torch": torch.__version__, "preset": a.preset,
                     "stat_interval": a.stat_interval, "root_interval": a.root_interval,
                     "date": time.strftime("%Y-%m-%d"), "sets": {}}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    for set_name, shapes in PRESETS[a.preset].items():
        by_opt = {}
        for name, make in optimizers(a.stat_interval, a.root_interval, a.max_preconditioner_dim).items():
            by_opt[name] = time_optimizer(make, shapes, device, a.root_interval, a.stat_interval, a.cycles, a.seed)
        results["sets"][set_name] = by_opt
    table = markdown(results)
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table)
    return results


if __name__ == "__main__":
    main()
