"""Hessian-vector products for FSDP2 models by a finite difference of gradients.

AdaHessian and Sophia's Hutchinson estimator need H z. On a plain model lowbit gets it
from a second backward (``hessian_vector_product``); FSDP2 reduce-scatters the gradients
without their graph, so there it takes the directional derivative of the gradient instead:

    H z ~ (g(theta + eps z) - g(theta)) / eps

with every rank's shards moved together (one global eps), one extra call of the closure
(forward and backward on every rank), and the parameters and gradients put back exactly
(copies, not theta + eps z - eps z). The error is eps/2 ||d3 L|| (zero for a quadratic
loss) plus the rounding of the two gradients over eps: eps = sqrt(u) (1 + ||theta||) / ||z||
balances the two, as for any forward difference (u: fp32's machine epsilon).
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist


def step_size(theta_squared: float, probe_count: float) -> float:
    """eps for parameters of squared norm ``theta_squared`` and a Rademacher probe of
    ``probe_count`` entries (squared norm = count)."""
    return math.sqrt(torch.finfo(torch.float32).eps) * (1.0 + math.sqrt(theta_squared)) / math.sqrt(probe_count)


def anywhere(flag: bool, group: Any) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (every rank must then call the closure)."""
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def hessian_times_probe(locals_: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], keys: Sequence[Any],
                        every_key: Sequence[Any], z: Sequence[torch.Tensor], closure: Callable[[], Any],
                        group: Any) -> List[torch.Tensor]:
    """H z for the local shards ``locals_`` (their gradients ``grads``, their DTensor
    parameters ``keys``) and probes ``z``. ``every_key``: all parameters of the optimizer,
    whose gradients the closure replaces and which are put back. Every rank of ``group``
    calls this (with empty lists where it has nothing due)."""
    sums = torch.tensor([sum(float(p.detach().double().square().sum()) for p in locals_),
                         float(sum(zi.numel() for zi in z))], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    eps = step_size(float(sums[0]), max(float(sums[1]), 1.0))
    saved_grads = [k.grad for k in every_key]
    saved_values = [p.detach().clone() for p in locals_]
    base = [g.detach().clone() for g in grads]
    try:
        with torch.no_grad():
            for p, zi in zip(locals_, z):
                p.add_(zi, alpha=eps)
        with torch.enable_grad():
            closure()
        moved = [k.grad.to_local().detach().clone() for k in keys]
    finally:
        with torch.no_grad():
            for p, v in zip(locals_, saved_values):
                p.copy_(v)
        for k, g in zip(every_key, saved_grads):
            k.grad = g
    return [(m - b).div_(eps) for m, b in zip(moved, base)]
