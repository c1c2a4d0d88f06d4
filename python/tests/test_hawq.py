"""lowbit.hawq: the per-layer trace and top eigenvalue against dense Hessians of a tiny
network, the allocation against brute-force enumeration, the byte accounting against the
codec's stored bytes, and the errors a user meets."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import lowbit
from lowbit import hawq
from lowbit.hawq._layers import block_size_for


class TinyNet(torch.nn.Module):
    """Two Linear layers with a tanh between them: a Hessian with off-diagonal blocks and
    off-diagonal entries inside the blocks, small enough (12 + 6 weights) for a dense Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 3)
        self.fc2 = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_setup(num_batches: int):
    torch.manual_seed(0)
    model = TinyNet().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g))
               for _ in range(num_batches)]
    return model, torch.nn.functional.cross_entropy, batches


def dense_hessian(model, loss_fn, batch) -> torch.Tensor:
    """The exact fp64 Hessian of one batch's loss in the two weight matrices (flattened, fc1
    then fc2), by torch.autograd.functional.hessian: independent of the HVP path."""
    shapes = [model.fc1.weight.shape, model.fc2.weight.shape]
    sizes = [s.numel() for s in shapes]
    inputs, targets = batch

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        w1, w2 = flat.split(sizes)
        h = torch.tanh(torch.nn.functional.linear(inputs, w1.view(shapes[0]), model.fc1.bias.detach()))
        return loss_fn(torch.nn.functional.linear(h, w2.view(shapes[1]), model.fc2.bias.detach()), targets)

    flat = torch.cat([model.fc1.weight.detach().flatten(), model.fc2.weight.detach().flatten()])
    return torch.autograd.functional.hessian(loss_of, flat)


def layer_slices(model):
    n1, n2 = model.fc1.weight.numel(), model.fc2.weight.numel()
    return [slice(0, n1), slice(n1, n1 + n2)]


def sample_variance(hessian: torch.Tensor, rows: slice) -> float:
    """Variance of one Hutchinson sample z_i^T (H z)_i = z^T M z, M = H's rows of layer i (zero
    elsewhere), z Rademacher. z^T M z = z^T S z with S = (M + M^T)/2, and for Rademacher z,
    Var(z^T S z) = 2 sum_{a != b} S_ab^2 (z_a^2 = 1 removes the diagonal's randomness; the
    off-diagonal pairs z_a z_b are uncorrelated with variance 1, each pair counted twice)."""
    m = torch.zeros_like(hessian)
    m[rows] = hessian[rows]
    s = (m + m.T) / 2
    return float(2 * (s.pow(2).sum() - s.diagonal().pow(2).sum()))


@pytest.mark.parametrize("num_batches", [1, 2])
def test_trace_matches_the_exact_hessian_trace_within_its_confidence(num_batches):
    model, loss_fn, batches = tiny_setup(num_batches)
    probes = 400  # a multiple of the batch count: whole rounds
    traces = hawq.layer_traces(model, loss_fn, batches, hawq.quantizable_layers(model), rel_tol=1e-12,
                               confidence=0.9999, min_probes=probes, max_probes=probes, seed=3)
    hessians = [dense_hessian(model, loss_fn, b) for b in batches]
    for trace, rows in zip(traces, layer_slices(model)):
        exact = sum(float(h[rows, rows].diagonal().sum()) for h in hessians) / num_batches
        # Probe k uses batch k mod B, so with R = probes / B rounds the mean is
        # (1/B) sum_b (mean of R samples of batch b): variance sum_b Var_b / (B^2 R).
        variance = sum(sample_variance(h, rows) for h in hessians) / (num_batches ** 2 * (probes // num_batches))
        # 400 samples: the mean is normal to a good approximation (CLT); a deviation beyond
        # 4.5 standard deviations has probability 7e-6. The seed is fixed; the bound is not fitted.
        assert abs(trace.trace - exact) <= 4.5 * math.sqrt(variance), (trace, exact, variance)
        # And the estimator's own 99.99% interval (from the sample variance) holds the exact value.
        assert trace.low <= exact <= trace.high, (trace, exact)
        assert trace.probes == probes and not trace.converged


def test_stopping_rule_stops_after_whole_rounds_once_every_layer_is_tight():
    model, loss_fn, batches = tiny_setup(3)
    layers = hawq.quantizable_layers(model)
    # Any spread passes a huge tolerance: the first whole round at or after min_probes (6 = 2 rounds of 3).
    loose = hawq.layer_traces(model, loss_fn, batches, layers, rel_tol=1e9, min_probes=4, max_probes=100)
    assert all(t.probes == 6 and t.converged for t in loose)
    # No spread passes a tolerance of 1e-12: it runs to max_probes and says it did not converge.
    tight = hawq.layer_traces(model, loss_fn, batches, layers, rel_tol=1e-12, min_probes=4, max_probes=20)
    assert all(t.probes == 20 and not t.converged for t in tight)
    # In between, a converged estimate meets the rule it states.
    mid = hawq.layer_traces(model, loss_fn, batches, layers, rel_tol=0.5, confidence=0.9, min_probes=4,
                            max_probes=3000)
    for t in mid:
        assert t.converged and t.probes % 3 == 0
        assert (t.high - t.low) / 2 <= 0.5 * abs(t.trace) * (1 + 1e-12)


def test_top_eigenvalue_matches_the_dense_block():
    model, loss_fn, batches = tiny_setup(2)
    eig = hawq.top_eigenvalues(model, loss_fn, batches, hawq.quantizable_layers(model), rel_tol=1e-6,
                               max_iterations=5000, seed=1)
    hessian = sum(dense_hessian(model, loss_fn, b) for b in batches) / len(batches)
    for e, rows in zip(eig, layer_slices(model)):
        values = torch.linalg.eigvalsh(hessian[rows, rows])
        top = float(values[values.abs().argmax()])
        # Krylov-Weinstein: for a unit v and rho = v^T H v, some eigenvalue of H lies within
        # ||H v - rho v|| of rho; power iteration from a random start converges to the one of
        # largest magnitude. The fp64 products add rounding far below the residual's 1e-6 scale.
        assert abs(e.value - top) <= e.residual + 1e-12 * abs(top), (e, values)
        assert e.residual <= 1e-6 * abs(e.value)


def brute_force(costs, omegas, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        size = sum(c[j] for c, j in zip(costs, choice))
        value = sum(o[j] for o, j in zip(omegas, choice))
        if size <= budget and (best is None or value < best):
            best = value
    return best


def test_allocation_is_optimal_by_brute_force():
    rng = random.Random(0)
    for case in range(40):
        layers = rng.randint(1, 6)
        costs = [sorted(rng.randint(1, 200) for _ in range(3)) for _ in range(layers)]
        # Omega decreasing in bytes, as quantization error is, but with random gaps.
        omegas = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(layers)]
        smallest, largest = sum(c[0] for c in costs), sum(c[-1] for c in costs)
        for budget in (smallest, rng.randint(smallest, largest), largest):
            size, value, choice = hawq.best_choice(costs, omegas, budget)
            assert size <= budget
            assert size == sum(c[j] for c, j in zip(costs, choice))
            assert value == pytest.approx(brute_force(costs, omegas, budget), rel=1e-12, abs=0)
    # The whole frontier: no choice of the enumeration beats it at its own size.
    costs, omegas = [[3, 5, 9], [2, 4, 8], [7, 8, 20]], [[0.9, 0.5, 0.1], [0.4, 0.3, 0.0], [2.0, 1.0, 0.5]]
    frontier = hawq.pareto_frontier(costs, omegas)
    for choice in itertools.product(range(3), repeat=3):
        size = sum(c[j] for c, j in zip(costs, choice))
        value = sum(o[j] for o, j in zip(omegas, choice))
        best_within = min(o for b, o, _ in frontier if b <= size)
        assert best_within <= value + 1e-15


class SmallCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 20)
        self.fc2 = torch.nn.Linear(20, 3)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def cnn_setup():
    torch.manual_seed(0)
    model = SmallCnn()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    return model, torch.nn.functional.cross_entropy, batches


@pytest.mark.parametrize("scaling", ["block", "channel"])
def test_budget_accounting_is_the_codecs_stored_bytes(scaling):
    model, loss_fn, batches = cnn_setup()
    plan = hawq.analyze(model, loss_fn, batches, (3, 4, 8), scaling=scaling, block_size=16, min_probes=2, max_probes=4)
    for layer, costs in zip(plan.layers, plan.bytes):
        block = block_size_for(layer, scaling, 16)
        for bits, cost in zip(plan.widths, costs):
            assert cost == lowbit.quantize(layer.weight.detach(), bits, "linear", block).nbytes
    others = [p for n, p in model.named_parameters() if n not in ("conv1.weight", "conv2.weight", "fc1.weight",
                                                                    "fc2.weight")]
    assert plan.fixed_bytes == sum(4 * p.numel() for p in others)
    for budget in (plan.minimum_bytes(), plan.minimum_bytes() + 300, 10 ** 6):
        for method in ("hawq", "size", "uniform", "weight-error"):
            a = plan.allocate(budget, method)
            stored = {layer.name: lowbit.quantize(layer.weight.detach(), c.bits, "linear",
                                                  block_size_for(layer, scaling, 16)).nbytes
                      for layer, c in zip(plan.layers, a.layers)}
            assert a.total_bytes == sum(stored.values()) + plan.fixed_bytes <= budget
            assert a.layers[0].bits == a.layers[-1].bits == 8  # pinned edges
    # apply() stores exactly what the codec decodes at the chosen widths.
    a = plan.allocate(plan.minimum_bytes() + 300)
    expected = {c.name: lowbit.dequantize(lowbit.quantize(dict(model.named_modules())[c.name].weight.detach(),
                                                          c.bits, "linear", block_size_for(layer, scaling, 16)))
                for layer, c in zip(plan.layers, a.layers)}
    hawq.apply(model, a)
    for name, w in expected.items():
        assert torch.equal(dict(model.named_modules())[name].weight.detach(), w)


def test_plan_allocations_are_optimal_by_brute_force_with_pins():
    model, loss_fn, batches = cnn_setup()
    plan = hawq.analyze(model, loss_fn, batches, (3, 4, 8), sensitivity="both", block_size=16, min_probes=2,
                        max_probes=4)
    assert all(t.trace == t.trace for t in plan.traces) and len(plan.eigenvalues) == 4
    for method in ("hawq", "eigenvalue", "size", "weight-error"):
        omegas = plan.omegas(method)
        costs = [[plan.bytes[i][j] for j in plan.options(i)] for i in range(len(plan.layers))]
        values = [[omegas[i][j] for j in plan.options(i)] for i in range(len(plan.layers))]
        for extra in (0, 150, 600, 5000):
            budget = plan.minimum_bytes() + extra
            a = plan.allocate(budget, method)
            best = brute_force(costs, values, budget - plan.fixed_bytes)
            assert sum(c.omega for c in a.layers) == pytest.approx(best, rel=1e-12, abs=0)
    # Uniform: the widest single width within the budget.
    four = plan.fixed_bytes + sum(plan.bytes[i][plan.widths.index(8 if i in (0, 3) else 4)] for i in range(4))
    assert [c.bits for c in plan.allocate(four, "uniform").layers] == [8, 4, 4, 8]
    assert [c.bits for c in plan.allocate(four - 1, "uniform").layers] == [8, 3, 3, 8]


def test_bad_input_is_named():
    model, loss_fn, batches = cnn_setup()
    plan = hawq.analyze(model, loss_fn, batches, (3, 4, 8), sensitivity="none")
    with pytest.raises(ValueError, match=r"budget_bytes \d+ is below the smallest model .* \d+ bytes"):
        plan.allocate(plan.minimum_bytes() - 1)
    with pytest.raises(ValueError, match="widths: 2 is not a width of lowbit's codec"):
        hawq.analyze(model, loss_fn, batches, (2, 4, 8))
    with pytest.raises(ValueError, match="widths: 16 is not a width"):
        hawq.allocate(model, loss_fn, batches, 10 ** 6, widths=(4, 16))
    with pytest.raises(ValueError, match="no quantizable layer"):
        hawq.allocate(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm1d(3)), loss_fn, batches, 10 ** 6)
    with pytest.raises(ValueError, match="widths must include 8"):
        hawq.analyze(model, loss_fn, batches, (3, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        plan.allocate(10 ** 6, "greedy")
    with pytest.raises(ValueError, match="needs the traces"):
        plan.allocate(10 ** 6, "hawq")
    with pytest.raises(ValueError, match="batches is empty"):
        hawq.allocate(model, loss_fn, [], 10 ** 6)


def test_evaluate_counts_correct_top1_predictions_and_keeps_the_mode():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    inputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 0, 0])  # 3 of 5 right
    model.train()
    assert hawq.evaluate(model, [(inputs[:2], labels[:2]), (inputs[2:], labels[2:])]) == pytest.approx(3 / 5)
    assert model.training
