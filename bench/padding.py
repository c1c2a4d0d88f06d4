"""Does padding factors of different orders to one order, to batch their factorizations,
pay? (Issue 18; Scalable Shampoo pads statistics as [[M, 0], [0, I]].)

    python3 bench/padding.py [--orders 1024 768 512 256] [--device cpu] [--repeats 3]

For each set of orders: the time of one eigh and one QR (geqrf + householder_product, as
lowbit's subspace step) per factor at its own order, against one batched call on all
factors padded to the largest order. Padding with the identity keeps the padded eigh and QR
exact for the original block (the padded rows and columns decouple), so only time differs.
Median of --repeats runs after one warm-up; CUDA times follow torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List

import torch


def spd(n: int, g: torch.Generator, device: str) -> torch.Tensor:
    a = torch.randn(n, n, generator=g).to(device)
    return a @ a.T / n + 1e-3 * torch.eye(n, device=device)


def padded(m: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.eye(size, dtype=m.dtype, device=m.device)
    out[: m.shape[0], : m.shape[0]] = m
    return out


def qr(batch: torch.Tensor) -> torch.Tensor:
    a, tau = torch.geqrf(batch)
    return torch.linalg.householder_product(a, tau)


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()
    return 1e3 * statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, nargs="+", default=[1024, 768, 512, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    mats: List[torch.Tensor] = [spd(n, g, args.device) for n in args.orders]
    top = max(args.orders)
    stack = torch.stack([padded(m, top) for m in mats])
    print(f"orders {args.orders} on {args.device}, {torch.get_num_threads()} threads; ms, median of {args.repeats}")
    print("| call | one per factor | padded, one batch | padded / separate |")
    print("|---|---|---|---|")
    for name, fn in [("eigh", torch.linalg.eigh), ("QR (geqrf + householder_product)", qr)]:
        separate = timed(lambda: [fn(m) for m in mats], args.device, args.repeats)
        batched = timed(lambda: fn(stack), args.device, args.repeats)
        print(f"| {name} | {separate:.1f} | {batched:.1f} | {batched / separate:.2f} |")


if __name__ == "__main__":
    main()
