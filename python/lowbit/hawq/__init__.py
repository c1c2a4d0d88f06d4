"""HAWQ: Hessian-aware mixed-precision quantization of a trained network's weights
(Dong et al., HAWQ, ICCV 2019; HAWQ-V2, NeurIPS 2020). docs/hawq.md has the method.

    plan = lowbit.hawq.analyze(model, loss_fn, batches, widths=(3, 4, 8))
    allocation = plan.allocate(budget_bytes)          # or method="uniform" / "size" / ...
    lowbit.hawq.apply(model, allocation)              # weights -> Q_b(W) through the codec
    print(allocation.table())

or in one call ``lowbit.hawq.allocate(model, loss_fn, batches, budget_bytes, widths)``.

Layer i at width b costs Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2 (HAWQ-V2), H_i its
block of the loss Hessian (Hutchinson's estimate, ``layer_traces``), n_i its parameter
count; the allocation minimizes sum_i Omega_i under the byte budget exactly (a Pareto
frontier). The budget counts the codec's stored bytes of every quantized weight plus the
unquantized parameters (biases, normalization) at their dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._allocation import best_choice, pareto_frontier
from ._layers import (CODEC_WIDTHS, Layer, block_size_for, check_widths, fixed_bytes, layer_bytes,
                      quantizable_layers, quantized_weight)
from ._sensitivity import LayerEigenvalue, LayerTrace, LossFn, layer_traces, top_eigenvalues

__all__ = ["analyze", "allocate", "apply", "evaluate", "Plan", "Allocation", "LayerChoice", "LayerTrace",
           "LayerEigenvalue", "layer_traces", "top_eigenvalues", "pareto_frontier", "best_choice",
           "quantizable_layers", "METHODS", "CODEC_WIDTHS"]

# "hawq": Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2 (HAWQ-V2); "eigenvalue": lambda_max(H_i)/n_i * the
# same error (HAWQ-V1's measure, needs sensitivity="eigenvalue" in analyze); "weight-error":
# ||Q_b(W_i) - W_i||^2 alone (no curvature); "size": 4^-b, the relative noise power of a b-bit
# grid, alike for every layer, so the budget alone decides: bits go first to the layers where
# they cost the fewest bytes, the small ones (allocation by layer size alone); "uniform": one
# width for every layer.
METHODS = ("hawq", "eigenvalue", "weight-error", "size", "uniform")


@dataclass(frozen=True)
class LayerChoice:
    name: str
    numel: int
    sensitivity: float  # Tr(H_i) (or lambda_max with method "eigenvalue"); NaN for methods without
    bits: int
    bytes: int
    omega: float  # the method's Omega_i at the chosen width


@dataclass
class Allocation:
    method: str
    budget_bytes: int
    layers: List[LayerChoice]
    fixed_bytes: int  # unquantized parameters
    scaling: str
    block_size: int
    mapping: str
    traces: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.fixed_bytes

    @property
    def bits(self) -> Dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    def to_json(self) -> Dict[str, Any]:
        return {"method": self.method, "budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes,
                "weight_bytes": self.weight_bytes, "fixed_bytes": self.fixed_bytes, "scaling": self.scaling,
                "block_size": self.block_size, "mapping": self.mapping,
                "layers": [asdict(layer) for layer in self.layers], "traces": self.traces}

    def table(self) -> str:
        lines = [f"{'layer':<28} {'params':>9} {'trace':>12} {'bits':>4} {'bytes':>10} {'omega':>11}"]
        for c in self.layers:
            lines.append(f"{c.name:<28} {c.numel:>9} {c.sensitivity:>12.4g} {c.bits:>4} {c.bytes:>10} {c.omega:>11.4g}")
        lines.append(f"{'quantized weights':<28} {'':>9} {'':>12} {'':>4} {self.weight_bytes:>10}")
        lines.append(f"{'unquantized parameters':<28} {'':>9} {'':>12} {'':>4} {self.fixed_bytes:>10}")
        lines.append(f"{'total (' + self.method + ')':<28} {'':>9} {'':>12} {'':>4} {self.total_bytes:>10}"
                     f"   budget {self.budget_bytes}")
        return "\n".join(lines)


@dataclass
class Plan:
    """Everything the allocations need, computed once: the layers, their curvature, and per
    width the stored bytes and the squared quantization error ||Q_b(W_i) - W_i||^2."""

    layers: List[Layer]
    widths: List[int]
    fixed_bytes: int
    scaling: str
    block_size: int
    mapping: str
    pin_edges: bool
    bytes: List[List[int]]  # [layer][width]
    squared_error: List[List[float]]  # [layer][width]
    traces: Optional[List[LayerTrace]] = None
    eigenvalues: Optional[List[LayerEigenvalue]] = None

    def options(self, i: int) -> List[int]:
        """Indices into ``widths`` layer i may take: 8 bits only for a pinned first/last layer."""
        if self.pin_edges and i in (0, len(self.layers) - 1):
            return [self.widths.index(8)]
        return list(range(len(self.widths)))

    def omegas(self, method: str) -> List[List[float]]:
        def curvature(i: int) -> float:
            if method == "hawq":
                if self.traces is None:
                    raise ValueError("lowbit.hawq: method \"hawq\" needs the traces (analyze with sensitivity=\"trace\")")
                value = self.traces[i].trace
            else:
                if self.eigenvalues is None:
                    raise ValueError("lowbit.hawq: method \"eigenvalue\" needs analyze(..., sensitivity=\"eigenvalue\")")
                value = self.eigenvalues[i].value
            # A negative estimate (a saddle direction, or noise around 0) would reward error;
            # the second-order model then predicts no loss increase, so it counts as 0.
            return max(value, 0.0) / self.layers[i].numel

        out = []
        for i, layer in enumerate(self.layers):
            if method in ("hawq", "eigenvalue"):
                out.append([curvature(i) * e for e in self.squared_error[i]])
            elif method == "weight-error":
                out.append(list(self.squared_error[i]))
            elif method == "size":
                out.append([4.0 ** -b for b in self.widths])
            else:
                raise ValueError(f"lowbit.hawq: method must be one of {', '.join(METHODS)}; got {method!r}")
        return out

    def minimum_bytes(self) -> int:
        return self.fixed_bytes + sum(min(self.bytes[i][j] for j in self.options(i)) for i in range(len(self.layers)))

    def allocate(self, budget_bytes: int, method: str = "hawq") -> Allocation:
        """The allocation of ``method`` (one of ``METHODS``) within ``budget_bytes``."""
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or budget_bytes != budget_bytes:
            raise TypeError(f"lowbit.hawq: budget_bytes must be a number of bytes; got {budget_bytes!r}")
        budget = int(budget_bytes)
        if budget < self.minimum_bytes():
            raise ValueError(f"lowbit.hawq: budget_bytes {budget} is below the smallest model this plan can "
                             f"make, {self.minimum_bytes()} bytes (every layer at {self.widths[0]} bits"
                             f"{', first and last at 8' if self.pin_edges else ''}, plus {self.fixed_bytes} "
                             "bytes of unquantized parameters)")
        idx = [self.options(i) for i in range(len(self.layers))]
        weight_budget = budget - self.fixed_bytes
        if method == "uniform":
            choice = self._uniform(idx, weight_budget)
            omegas = [[float("nan")] * len(self.widths) for _ in self.layers]
        else:
            omegas = self.omegas(method)
            costs = [[self.bytes[i][j] for j in idx[i]] for i in range(len(self.layers))]
            values = [[omegas[i][j] for j in idx[i]] for i in range(len(self.layers))]
            _, _, picked = best_choice(costs, values, weight_budget)
            choice = [idx[i][k] for i, k in enumerate(picked)]
        return Allocation(method, budget, [self._choice(i, j, method, omegas[i][j]) for i, j in enumerate(choice)],
                          self.fixed_bytes, self.scaling, self.block_size, self.mapping,
                          [asdict(t) for t in self.traces] if self.traces else [])

    def _uniform(self, idx: List[List[int]], weight_budget: int) -> List[int]:
        # The widest single width that fits (pinned layers stay at 8).
        for j in reversed(range(len(self.widths))):
            choice = [j if j in options else options[0] for options in idx]
            if sum(self.bytes[i][c] for i, c in enumerate(choice)) <= weight_budget:
                return choice
        return [options[0] for options in idx]  # unreachable: the budget covers the minimum

    def _choice(self, i: int, j: int, method: str, omega: float) -> LayerChoice:
        if method == "eigenvalue" and self.eigenvalues is not None:
            sensitivity = self.eigenvalues[i].value
        else:
            sensitivity = self.traces[i].trace if self.traces is not None else float("nan")
        layer = self.layers[i]
        return LayerChoice(layer.name, layer.numel, sensitivity, self.widths[j], self.bytes[i][j], omega)


def analyze(model: torch.nn.Module, loss_fn: LossFn, batches: Any, widths: Sequence[int] = (3, 4, 8), *,
            sensitivity: str = "trace", pin_edges: bool = True, scaling: str = "block", block_size: int = 64,
            mapping: str = "linear", rel_tol: float = 0.1, confidence: float = 0.95, min_probes: int = 16,
            max_probes: int = 256, seed: int = 0) -> Plan:
    """The layers' curvature and, per width, their bytes and quantization error.

    ``sensitivity``: "trace" (HAWQ-V2, Hutchinson with the stopping rule of ``layer_traces``),
    "eigenvalue" (HAWQ-V1, power iteration), "both", or "none" (for the size-only and
    uniform baselines). ``scaling``: "block" (``block_size`` elements per fp32 absmax scale)
    or "channel" (one scale per output channel). ``pin_edges``: first and last layer at 8 bits.
    """
    layers = quantizable_layers(model)
    widths_list = check_widths(widths)
    if pin_edges and 8 not in widths_list:
        raise ValueError("lowbit.hawq: pin_edges pins the first and last layer to 8 bits, so widths must include 8")
    if sensitivity not in ("trace", "eigenvalue", "both", "none"):
        raise ValueError(f"lowbit.hawq: sensitivity must be \"trace\", \"eigenvalue\", \"both\" or \"none\"; "
                         f"got {sensitivity!r}")
    blocks = [block_size_for(layer, scaling, block_size) for layer in layers]
    costs, errors = [], []
    for layer, block in zip(layers, blocks):
        costs.append([layer_bytes(layer, b, block) for b in widths_list])
        w = layer.weight.detach().double()
        errors.append([float((quantized_weight(layer, b, block, mapping).double() - w).pow(2).sum())
                       for b in widths_list])
    plan = Plan(layers, widths_list, fixed_bytes(model, layers), scaling, block_size, mapping, pin_edges, costs, errors)
    if sensitivity in ("trace", "both"):
        plan.traces = layer_traces(model, loss_fn, batches, layers, rel_tol=rel_tol, confidence=confidence,
                                   min_probes=min_probes, max_probes=max_probes, seed=seed)
    if sensitivity in ("eigenvalue", "both"):
        plan.eigenvalues = top_eigenvalues(model, loss_fn, batches, layers, seed=seed)
    return plan


def allocate(model: torch.nn.Module, loss_fn: LossFn, batches: Any, budget_bytes: int,
             widths: Sequence[int] = (3, 4, 8), **options: Any) -> Allocation:
    """HAWQ-V2's allocation for ``model`` within ``budget_bytes``; ``options`` as for ``analyze``."""
    return analyze(model, loss_fn, batches, widths, **options).allocate(budget_bytes, "hawq")


def apply(model: torch.nn.Module, allocation: Allocation) -> None:
    """Replaces each quantized layer's weight by Q_b(W) (the codec's round trip at its chosen
    width), in place; the model must be the one the allocation was made for."""
    by_name = {layer.name: layer for layer in quantizable_layers(model)}
    for choice in allocation.layers:
        layer = by_name.get(choice.name)
        if layer is None or layer.numel != choice.numel:
            raise ValueError(f"lowbit.hawq.apply: the model has no layer {choice.name} of {choice.numel} parameters")
        block = block_size_for(layer, allocation.scaling, allocation.block_size)
        with torch.no_grad():
            layer.weight.copy_(quantized_weight(layer, choice.bits, block, allocation.mapping))


def evaluate(model: torch.nn.Module, batches: Any) -> float:
    """Top-1 accuracy of ``model`` in eval mode over (inputs, labels) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in batches:
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def save_json(path: str, allocations: Sequence[Allocation]) -> None:
    with open(path, "w") as f:
        json.dump([a.to_json() for a in allocations], f, indent=1)
