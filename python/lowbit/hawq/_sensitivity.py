"""Per-layer curvature of the loss: HAWQ-V2's Hessian trace by Hutchinson's estimator (with a
stopping rule and a confidence interval) and HAWQ-V1's top eigenvalue by power iteration.

Both work on the loss averaged over a few batches. The Hessian-vector products are
``lowbit.hessian_vector_product`` (double backward), taken with respect to the quantizable
weights only (biases and normalization parameters stay fp32, so their curvature is not asked).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import torch

from ..second_order import _rademacher_like, hessian_vector_product
from ._layers import Layer

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class LayerTrace:
    """Hutchinson's estimate of Tr(H_i), H_i the layer's diagonal block of the Hessian.

    ``trace`` is the mean of ``probes`` samples z_i^T (H z)_i, ``stderr`` its standard error
    (sample standard deviation / sqrt(probes)); [``low``, ``high``] = trace -+ z * stderr is the
    normal-approximation confidence interval at ``confidence``. ``converged``: the stopping rule
    was met before ``max_probes``.
    """

    name: str
    numel: int
    trace: float
    stderr: float
    low: float
    high: float
    confidence: float
    probes: int
    converged: bool

    @property
    def average(self) -> float:
        """Tr(H_i) / n_i, HAWQ-V2's per-parameter sensitivity."""
        return self.trace / self.numel


def _normal_quantile(confidence: float) -> float:
    # Two-sided: P(|N(0,1)| <= z) = confidence.
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _gradient_graphs(model: torch.nn.Module, loss_fn: LossFn, batches: Sequence[Tuple[Any, Any]],
                     weights: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    graphs = []
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        graphs.append(list(torch.autograd.grad(loss, weights, create_graph=True)))
    return graphs


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # The curvature of the loss the quantized model is judged by: eval mode (BatchNorm's
    # running statistics, no dropout). The graphs keep what they need after the switch back.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _checked_batches(batches: Any) -> List[Tuple[Any, Any]]:
    out = list(batches)
    if not out:
        raise ValueError("lowbit.hawq: batches is empty; give at least one (inputs, targets) batch")
    for i, b in enumerate(out):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise ValueError(f"lowbit.hawq: batch {i} must be an (inputs, targets) pair; got {type(b).__name__}")
    return out


def layer_traces(model: torch.nn.Module, loss_fn: LossFn, batches: Any, layers: Sequence[Layer], *,
                 rel_tol: float = 0.1, confidence: float = 0.95, min_probes: int = 16, max_probes: int = 256,
                 seed: int = 0) -> List[LayerTrace]:
    """Tr(H_i) of each layer's block of the Hessian of the mean loss over ``batches``.

    Probe k draws a Rademacher z over all the layers' weights and takes one Hessian-vector
    product on batch k mod B; layer i's sample is z_i^T (H z)_i. Its mean is unbiased:
    E[z_i^T H_ij z_j] = 0 for j != i (independent signs) and E[z_i^T H_ii z_i] = Tr(H_ii),
    and a whole number of rounds over the B batches averages their Hessians. The sample
    variance (over batches too) gives the standard error; the samples being i.i.d. within a
    batch and the rounds balanced, it over-states, never under-states, the spread of the mean.

    Stopping rule: after whole rounds, with at least ``min_probes`` samples, stop when every
    layer's confidence half-width z * stderr is at most ``rel_tol * |trace|``; stop anyway at
    ``max_probes`` (``converged=False`` then).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"lowbit.hawq: confidence must be in (0, 1); got {confidence!r}")
    if not rel_tol > 0:
        raise ValueError(f"lowbit.hawq: rel_tol must be > 0; got {rel_tol!r}")
    if not 2 <= min_probes <= max_probes:
        raise ValueError(f"lowbit.hawq: need 2 <= min_probes <= max_probes; got {min_probes} and {max_probes}")
    batches = _checked_batches(batches)
    z_value = _normal_quantile(confidence)
    weights = [layer.weight for layer in layers]
    with _eval_mode(model):
        graphs = _gradient_graphs(model, loss_fn, batches, weights)
    generator = torch.Generator(device=weights[0].device).manual_seed(seed)
    samples: List[List[float]] = [[] for _ in layers]
    converged = False
    k = 0
    while k < max_probes:
        grads = graphs[k % len(graphs)]
        z = [_rademacher_like(w.detach(), generator) for w in weights]
        hz = hessian_vector_product(grads, weights, z)
        for s, zi, hi in zip(samples, z, hz):
            s.append(float(torch.dot(zi.flatten().double(), hi.flatten().double())))
        k += 1
        if k >= min_probes and k % len(graphs) == 0:
            converged = all(z_value * statistics.stdev(s) / math.sqrt(k) <= rel_tol * abs(statistics.fmean(s))
                            for s in samples)
            if converged:
                break
    out = []
    for layer, s in zip(layers, samples):
        mean, se = statistics.fmean(s), statistics.stdev(s) / math.sqrt(len(s))
        out.append(LayerTrace(layer.name, layer.numel, mean, se, mean - z_value * se, mean + z_value * se,
                              confidence, len(s), converged))
    return out


@dataclass(frozen=True)
class LayerEigenvalue:
    """HAWQ-V1's sensitivity: the eigenvalue of largest magnitude of the layer's Hessian block,
    as the Rayleigh quotient of the last power-iteration vector; ``residual`` = ||H_i v - rho v||
    bounds the distance from ``value`` to an eigenvalue of H_i (Krylov-Weinstein)."""

    name: str
    numel: int
    value: float
    residual: float
    iterations: int


def top_eigenvalues(model: torch.nn.Module, loss_fn: LossFn, batches: Any, layers: Sequence[Layer], *,
                    rel_tol: float = 1e-3, max_iterations: int = 100, seed: int = 0) -> List[LayerEigenvalue]:
    """Power iteration on each layer's block H_i = d^2 L / dW_i^2 of the mean loss over
    ``batches`` (one Hessian-vector product per batch and iteration, the vector zero outside
    the layer); stops when the residual is at most ``rel_tol * |rho|``."""
    if not rel_tol > 0 or max_iterations < 1:
        raise ValueError(f"lowbit.hawq: need rel_tol > 0 and max_iterations >= 1; got {rel_tol!r}, "
                         f"{max_iterations!r}")
    batches = _checked_batches(batches)
    weights = [layer.weight for layer in layers]
    with _eval_mode(model):
        graphs = _gradient_graphs(model, loss_fn, batches, weights)
    generator = torch.Generator(device=weights[0].device).manual_seed(seed)

    def block_product(i: int, v: torch.Tensor) -> torch.Tensor:
        vectors = [v if j == i else torch.zeros_like(w) for j, w in enumerate(weights)]
        total = torch.zeros_like(v)
        for grads in graphs:
            total += hessian_vector_product(grads, weights, vectors)[i]
        return total / len(graphs)

    out = []
    for i, layer in enumerate(layers):
        v = torch.randn(weights[i].shape, generator=generator, dtype=weights[i].dtype, device=weights[i].device)
        v /= v.norm()
        rho, residual, it = 0.0, math.inf, 0
        for it in range(1, max_iterations + 1):
            hv = block_product(i, v)
            rho = float(torch.dot(v.flatten(), hv.flatten()))
            residual = float((hv - rho * v).norm())
            if residual <= rel_tol * abs(rho) or float(hv.norm()) == 0.0:
                break
            v = hv / hv.norm()
        out.append(LayerEigenvalue(layer.name, layer.numel, rho, residual, it))
    return out
