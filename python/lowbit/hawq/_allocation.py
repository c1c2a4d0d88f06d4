"""The exact choice of one width per layer: minimize sum_i Omega_i(b_i) subject to
sum_i bytes_i(b_i) <= budget, by the Pareto frontier of (bytes, Omega) over the layers.

After layer i the frontier holds, for every reachable byte count, the least Omega, and only
the counts whose Omega is lower than that of every smaller count (a dominated partial choice
can never become the best one: adding the same later choices keeps it dominated). So the
frontier after the last layer contains an optimal choice for every budget, exactly (no
rounding of bytes), and its size is bounded by the number of distinct byte sums.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

Point = Tuple[int, float, Tuple[int, ...]]  # (bytes, Omega, index of the chosen option per layer)


def pareto_frontier(costs: Sequence[Sequence[int]], omegas: Sequence[Sequence[float]],
                    budget: Optional[int] = None) -> List[Point]:
    """Every non-dominated choice, sorted by bytes (Omega strictly decreasing); with
    ``budget``, only those within it. ``costs[i][j]`` / ``omegas[i][j]``: option j of layer i."""
    if len(costs) != len(omegas):
        raise ValueError("pareto_frontier: costs and omegas need one entry per layer")
    frontier: List[Point] = [(0, 0.0, ())]
    for layer_costs, layer_omegas in zip(costs, omegas):
        if len(layer_costs) != len(layer_omegas) or not layer_costs:
            raise ValueError("pareto_frontier: each layer needs as many costs as omegas, and at least one")
        candidates = [(b + c, o + w, choice + (j,)) for b, o, choice in frontier
                      for j, (c, w) in enumerate(zip(layer_costs, layer_omegas))
                      if budget is None or b + c <= budget]
        candidates.sort(key=lambda p: (p[0], p[1]))
        frontier = []
        for point in candidates:
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
    return frontier


def best_choice(costs: Sequence[Sequence[int]], omegas: Sequence[Sequence[float]], budget: int) -> Point:
    """The choice of least Omega within ``budget`` (the fewest bytes among equal Omegas).
    Raises ValueError when even the cheapest choice exceeds the budget."""
    frontier = pareto_frontier(costs, omegas, budget)
    if not frontier:
        raise ValueError(f"budget {budget} bytes is below the smallest possible size "
                         f"{sum(min(c) for c in costs)} bytes")
    return frontier[-1]
