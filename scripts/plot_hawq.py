#!/usr/bin/env python3
"""Draws `lowbit hawq --json` results as test accuracy against model size, one line per
allocation method, and prints the same figures as a markdown table.
Usage: plot_hawq.py OUT.svg|OUT.png RESULTS.json [RESULTS.json ...] (one panel per file)."""
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"hawq": "o", "size": "s", "weight-error": "^", "uniform": "D"}
COLORS = {"hawq": "C0", "size": "C1", "weight-error": "C2", "uniform": "C3"}  # the same in every panel


def main(chart_path, result_paths):
    results = [json.load(open(p)) for p in result_paths]
    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        by_method = defaultdict(list)
        for a in r["allocations"]:
            by_method[a["method"]].append((a["total_bytes"] / 1e6, a["test_accuracy"]))
        for method, points in by_method.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS.get(method, "x"),
                    color=COLORS.get(method), label=method)
        ax.axhline(r["fp32_test_accuracy"], color="grey", linestyle="--", linewidth=0.8, label="fp32")
        ax.set_title(f"{r['model']} on {r['dataset']} ({r['scaling']} scales, widths "
                     f"{','.join(map(str, r['widths']))})")
        ax.set_xlabel("model size, MB (quantized weights + fp32 rest)")
        ax.set_ylabel("test accuracy, no retraining")
        ax.grid(alpha=0.3)
        ax.legend()
        print(f"\n{r['model']} ({r['checkpoint']}), fp32 accuracy {r['fp32_test_accuracy']:.4f}\n")
        methods = list(by_method)
        print("| budget MB | " + " | ".join(f"{m}: acc (MB, bits)" for m in methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        budgets = sorted({a["budget_bytes"] for a in r["allocations"]})
        for b in budgets:
            cells = []
            for m in methods:
                a = next(x for x in r["allocations"] if x["budget_bytes"] == b and x["method"] == m)
                bits = "/".join(str(layer["bits"]) for layer in a["layers"])
                cells.append(f"{a['test_accuracy']:.4f} ({a['total_bytes'] / 1e6:.4f}, {bits})")
            print(f"| {b / 1e6:.4f} | " + " | ".join(cells) + " |")
    fig.tight_layout()
    fig.savefig(chart_path)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
