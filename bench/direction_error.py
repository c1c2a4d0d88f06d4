"""Update-direction error of low-bit Shampoo against fp32 Shampoo on fixed gradient streams.

Both optimizers see the same gradients (a stream that does not depend on the parameters),
with the SGD graft at momentum 0 and lr 1, so each step moves the parameter by exactly the
grafted preconditioned direction d. The error of a step is ||d_low - d_fp32||_F / ||d_fp32||_F
(the quantity tests/precond_test.cpp and quant_error_test use); the table gives its mean
over the steps after the first root update, per stream, variant and interval setting.

    LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/direction_error.py \\
        [--steps 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Tuple

import torch

import lowbit

# Shapes of the streams: square, wide, and a tall odd order (1057 x 64: one 1057-order
# factor, quantized, and a 64-order one).
STREAMS: List[Tuple[str, Tuple[int, int]]] = [("256x256", (256, 256)), ("128x384", (128, 384)),
                                             ("1057x64", (1057, 64))]
VARIANTS: Dict[str, Dict] = {
    "8-bit": dict(bits=8),
    "4-bit": dict(bits=4),
    "4-bit eigh": dict(bits=4, eigen_update="eigh"),
    # The paper's QR step with its Q by CholeskyQR2 (batched, for GPUs) instead of Householder.
    "4-bit cholesky-qr": dict(bits=4, eigen_update="cholesky_qr"),
    # No stored root: U diag(lambda^-1/4) U^T from the stored U each step (issue 20). At 8 bits
    # it stores as many bytes as the paper's 4-bit (one 8-bit matrix instead of two 4-bit ones).
    "4-bit eigen-form": dict(bits=4, root_storage="eigen"),
    "8-bit eigen-form": dict(bits=8, root_storage="eigen"),
}
INTERVALS = [(1, 1), (2, 10)]


def gradient_stream(shape: Tuple[int, int], steps: int, seed: int) -> List[torch.Tensor]:
    """G_t = A Z_t B with Z_t Gaussian and A, B rotations scaled by decaying spectra (1 .. 1e-3
    on the left, 1 .. 1e-1 on the right), like the gradients of a real layer."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    left = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0] @ torch.diag(
        torch.logspace(0, -3, m, dtype=torch.float64))
    right = torch.diag(torch.logspace(0, -1, n, dtype=torch.float64)) @ torch.linalg.qr(
        torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return [(left @ torch.randn(m, n, generator=g, dtype=torch.float64) @ right).float() for _ in range(steps)]


def directions(grads: List[torch.Tensor], stat_interval: int, root_interval: int, **options) -> List[torch.Tensor]:
    p = torch.zeros_like(grads[0], requires_grad=True)
    opt = lowbit.Shampoo([p], lr=1.0, graft="sgdm", momentum=0.0, stat_interval=stat_interval,
                         root_interval=root_interval, min_quant_numel=4096, epsilon=1e-6, **options)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(before - p.detach())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="the variants to measure (default: all)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    start = time.time()
    for name, shape in STREAMS:
        grads = gradient_stream(shape, args.steps, args.seed)
        for t1, t2 in INTERVALS:
            reference = directions(grads, t1, t2, bits=32)
            # The eigen form makes its root at every statistics update, as fp32 Shampoo does at
            # T2 = T1; against fp32 at T2 > T1 its error also counts the reference's staler root.
            fresh_reference = reference if t1 == t2 else directions(grads, t1, t1, bits=32)
            for variant in args.variants:
                options = VARIANTS[variant]
                got = directions(grads, t1, t2, **options)
                against = [("fp32", reference)]
                if options.get("root_storage") == "eigen" and t1 != t2:
                    against.append(("fp32 T2=T1", fresh_reference))
                for label, ref in against:
                    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(got[t2:], ref[t2:])]
                    rows.append(dict(stream=name, T1=t1, T2=t2, variant=variant, reference=label,
                                     mean=sum(errors) / len(errors), max=max(errors)))
                    print(f"{name:8s} T1={t1} T2={t2:<3d} {variant:17s} vs {label:10s} mean {rows[-1]['mean']:.4f}  "
                          f"max {rows[-1]['max']:.4f}", flush=True)
    print(f"({time.time() - start:.0f} s, torch {torch.__version__}, {args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, seed=args.seed, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
