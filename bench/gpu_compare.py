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
With `--authors DIR` (a checkout of Sike-Wang/low-bit-Shampoo with its CUDA library built)
and `--meta-ds DIR|installed` (facebookresearch/optimizers), their optimizers run in the same
process on the same shapes (bench/peer_optimizers.py). `--models` adds end-to-end training
steps (bench/e2e_models.py: ViT-S/16 from timm, ResNet-18 from torchvision; skipped with a
note when the package is missing). The markdown ends with issue 18's GPU targets as ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below
import e2e_models  # noqa: E402
import peer_optimizers  # noqa: E402
from step_timing import time_cycles  # noqa: E402

Shape = Tuple[int, ...]

# Issue 18's shape sets (one parameter per entry), and the end-to-end models of each preset.
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
PRESET_MODELS: Dict[str, List[str]] = {"issue18": ["vit_s16", "resnet18"], "tiny": ["tiny_cnn"]}


def optimizers(a: argparse.Namespace) -> Dict[str, Callable]:
    common = dict(lr=1e-3, stat_interval=a.stat_interval, root_interval=a.root_interval,
                  max_preconditioner_dim=a.max_preconditioner_dim, graft="adamw")
    out: Dict[str, Callable] = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "lowbit fp32": lambda ps: lowbit.Shampoo(ps, bits=32, **common),
        "lowbit 4-bit": lambda ps: lowbit.Shampoo(ps, bits=4, **common),
        # The same step with its QR by CholeskyQR2 (batched products and Choleskys) instead of
        # one cuSOLVER Householder QR per factor.
        "lowbit 4-bit cholesky-qr": lambda ps: lowbit.Shampoo(ps, bits=4, eigen_update="cholesky_qr", **common),
    }
    if a.authors:
        out.update(peer_optimizers.authors_factories(a.authors, a.stat_interval, a.root_interval,
                                                     a.max_preconditioner_dim))
    if a.meta_ds:
        out.update(peer_optimizers.meta_ds_factories(a.meta_ds, a.root_interval, a.max_preconditioner_dim))
    return out


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

    result = time_cycles(step, device, root_interval, stat_interval, cycles)
    if device.type == "cuda":  # what the optimizer adds on top of parameters and gradients
        result["peak_added_mib"] = result.pop("peak_mib") - result.pop("base_mib")
    return result


def _cell(r: Dict, memory_key: str) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    cell = f"{r['ms_per_step']:.2f} ms (plain {r['plain_step_ms']:.2f})"
    if memory_key in r:
        cell += f", {r[memory_key]:.0f} MiB"
    return cell


def _table(title: str, rows: Dict[str, Dict], memory_key: str) -> List[str]:
    names = list(next(iter(rows.values())))
    lines = [f"| {title} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row_name, by_opt in rows.items():
        lines.append(f"| {row_name} | " + " | ".join(_cell(by_opt[n], memory_key) for n in names) + " |")
    return lines


def targets(results: Dict) -> List[str]:
    """Issue 18's GPU targets as measured ratios (only those whose runs are present)."""
    out = []

    def ratio(rows: Dict, a: str, b: str, key: str = "ms_per_step") -> float | None:
        if a in rows and b in rows and key in rows[a] and key in rows[b]:
            return rows[a][key] / rows[b][key]
        return None

    block = results["sets"].get("transformer block d=1024")
    if block:
        for peer, goal in (("authors 4-bit", 0.5), ("Meta DS fp32", 0.6), ("lowbit fp32", 1.1)):
            r = ratio(block, "lowbit 4-bit", peer)
            if r is not None:
                out.append(f"transformer block: lowbit 4-bit / {peer} = {r:.2f} (goal <= {goal}): "
                           + ("PASS" if r <= goal else "MISS"))
        plain = block["lowbit 4-bit"]["plain_step_ms"]
        out.append(f"transformer block: lowbit 4-bit plain step {plain:.2f} ms (goal <= 1.5 ms): "
                   + ("PASS" if plain <= 1.5 else "MISS"))
    vit = results.get("models", {}).get("vit_s16", {})
    r = ratio(vit, "lowbit 4-bit", "torch AdamW")
    if r is not None:
        out.append(f"ViT-S/16: lowbit 4-bit / AdamW step = {r:.2f} (goal <= 1.3): " + ("PASS" if r <= 1.3 else "MISS"))
    m = ratio(vit, "lowbit 4-bit", "torch AdamW", "peak_mib")
    if m is not None:
        out.append(f"ViT-S/16: lowbit 4-bit / AdamW peak memory = {m:.3f} (goal <= 1.02): "
                   + ("PASS" if m <= 1.02 else "MISS"))
    return out


def markdown(results: Dict) -> str:
    lines = _table(f"shapes (T1 = {results['stat_interval']}, T2 = {results['root_interval']})", results["sets"],
                   "peak_added_mib")
    if results.get("models"):
        lines += [""] + _table("end to end (ms per training step, peak MiB)", results["models"], "peak_mib")
    ratios = [f"{s}: 4-bit / fp32 {b['lowbit 4-bit']['ms_per_step'] / b['lowbit fp32']['ms_per_step']:.2f}"
              for s, b in results["sets"].items()]
    lines += ["", "; ".join(ratios)]
    goals = targets(results)
    if goals:
        lines += ["", "Targets (issue 18):"] + [f"- {g}" for g in goals]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="issue18")
    parser.add_argument("--stat-interval", type=int, default=10)
    parser.add_argument("--root-interval", type=int, default=50)
    parser.add_argument("--max-preconditioner-dim", type=int, default=1200)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--authors", default="", help="checkout of Sike-Wang/low-bit-Shampoo (CUDA library built)")
    parser.add_argument("--meta-ds", default="", help="checkout of facebookresearch/optimizers, or 'installed'")
    parser.add_argument("--models", default=None,
                        help="comma-separated end-to-end models (" + ", ".join(e2e_models.MODELS)
                        + "); default: the preset's; '' for none")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    a = parser.parse_args(argv)
    models = PRESET_MODELS[a.preset] if a.models is None else [m for m in a.models.split(",") if m]
    for m in models:
        if m not in e2e_models.MODELS:
            parser.error(f"--models: {m} is not one of {', '.join(e2e_models.MODELS)}")
    makers = optimizers(a)  # peers are imported here, so a bad --authors / --meta-ds fails before any timing
    device = torch.device(a.device)
    results: Dict = {"device": str(device), "torch": torch.__version__, "preset": a.preset,
                     "stat_interval": a.stat_interval, "root_interval": a.root_interval,
                     "date": time.strftime("%Y-%m-%d"), "sets": {}, "models": {}}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    for set_name, shapes in PRESETS[a.preset].items():
        by_opt = {}
        for name, make in makers.items():
            by_opt[name] = time_optimizer(make, shapes, device, a.root_interval, a.stat_interval, a.cycles, a.seed)
        results["sets"][set_name] = by_opt
    for model in models:
        missing = e2e_models.missing_package(model)
        results["models"][model] = {
            name: {"skipped": f"{missing} is not installed"} if missing else
            e2e_models.time_training(model, make, device, a.root_interval, a.stat_interval, a.cycles, a.seed)
            for name, make in makers.items()}
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
