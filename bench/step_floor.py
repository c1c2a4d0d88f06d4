"""How close can 4-bit Shampoo's step come to fp32's? The floor of the paper's arithmetic,
against a `lowbit bench step --json` run (issue 18's CPU goal: 4-bit <= 1.3 x fp32).

    ./build/lowbit bench step --json step.json
    python3 bench/step_floor.py step.json [--goal 1.3] [--repeats 7]

A 4-bit statistics update of a factor of order n makes five n x n x n products (Björck's
two, V diag(lambda) V^T, A V, and A P for diag(P^T A P)) and one orthonormalization of A V,
the Householder QR (geqrf + householder_product) that lowbit uses; fp32 makes the G G^T
products alone. This script times one product and one QR per factor order of each shape
(the fastest of --repeats runs; lowbit's partition: rows and columns cut into chunks of at
most max_preconditioner_dim), with the run's thread count, and prices one T2 cycle with the run's own plain and root steps
and every statistics-only step at its floor: the 4-bit plain step, what fp32's statistics
step adds to its plain step, and the 4-bit work above with no overhead at all. It prints
the time the goal leaves a statistics-only step, the floor of that step, and the floor's
4-bit / fp32 ratio: where the floor's ratio exceeds the goal, no implementation of the
paper's algorithm with these kernels meets it on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List

import torch


def chunks(size: int, max_dim: int) -> List[int]:
    return [min(max_dim, size - start) for start in range(0, size, max_dim)]


def factor_orders(matrix: List[int], max_dim: int) -> List[int]:
    """Orders of every factor of a matrix's blocks (left: rows of a block, right: columns)."""
    rows, cols = chunks(matrix[0], max_dim), chunks(matrix[1], max_dim)
    return [n for r in rows for c in cols for n in (r, c)]


def fastest_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs after a warm-up: a floor wants the best case (a shared
    or throttled machine only ever makes a run slower)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def primitive_ms(n: int, repeats: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g)
    x = torch.randn(n, n, generator=g).t().contiguous().t()  # column-major, as lowbit hands it over

    def qr() -> torch.Tensor:
        reflectors, tau = torch.geqrf(x)
        return torch.linalg.householder_product(reflectors, tau)

    return {"product": fastest_ms(lambda: a @ a, repeats), "qr": fastest_ms(qr, repeats)}


def main_with(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_json", help="the --json output of `lowbit bench step`")
    parser.add_argument("--goal", type=float, default=1.3, help="4-bit / fp32 step time asked for")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="", help="also write the table here")
    args = parser.parse_args(argv)

    run = json.load(open(args.step_json))
    torch.set_num_threads(int(run["threads"]))
    t1, t2, max_dim = int(run["stat_interval"]), int(run["root_interval"]), int(run["max_preconditioner_dim"])
    if t2 % t1:
        raise SystemExit(f"step_floor: T2 = {t2} is not a multiple of T1 = {t1}; the cycle below assumes it is")
    stats_only = t2 // t1 - 1  # statistics steps of a cycle that are not also its root step
    plain = t2 - stats_only - 1
    by_shape: Dict[str, Dict[str, dict]] = {}
    for r in run["results"]:
        if r.get("timed") and r["variant"] in ("fp32", "4bit"):
            by_shape.setdefault(r["shape"], {})[r["variant"]] = r
    primitives: Dict[int, Dict[str, float]] = {}
    rows = []
    print(f"T1 = {t1}, T2 = {t2}, {run['threads']} threads; goal 4-bit <= {args.goal} x fp32")
    print(f"{'shape':<14}{'orders':<24}{'measured':>10}{'allowed ms':>12}{'floor ms':>10}{'floor ratio':>13}")
    for shape, v in by_shape.items():
        fp32, four = v["fp32"], v["4bit"]
        orders = factor_orders(four["matrix"], max_dim)
        for n in set(orders):
            primitives.setdefault(n, primitive_ms(n, args.repeats))
        work = sum(5 * primitives[n]["product"] + primitives[n]["qr"] for n in orders)
        floor_step = four["plain_step_ms"] + (fp32["stat_step_ms"] - fp32["plain_step_ms"]) + work
        fp32_cycle = t2 * fp32["ms_per_step"]
        rest = plain * four["plain_step_ms"] + four["root_step_ms"]
        allowed = (args.goal * fp32_cycle - rest) / stats_only
        floor_ratio = (rest + stats_only * floor_step) / fp32_cycle
        rows.append({"shape": shape, "orders": orders, "measured_ratio": four["time_ratio_vs_fp32"],
                     "allowed_stat_step_ms": allowed, "floor_stat_step_ms": floor_step, "floor_ratio": floor_ratio,
                     "primitives_ms": {str(n): primitives[n] for n in sorted(set(orders))}})
        print(f"{shape:<14}{','.join(map(str, sorted(set(orders)))):<24}{four['time_ratio_vs_fp32']:>10.3f}"
              f"{allowed:>12.1f}{floor_step:>10.1f}{floor_ratio:>13.3f}")
    for n in sorted(primitives):
        print(f"  order {n}: product {primitives[n]['product']:.1f} ms, QR {primitives[n]['qr']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"goal": args.goal, "threads": run["threads"], "rows": rows}, f, indent=1)
    if any(not math.isfinite(r["floor_ratio"]) for r in rows):
        raise SystemExit("step_floor: a ratio is not finite; is the step run complete?")


if __name__ == "__main__":
    main_with(sys.argv[1:])
