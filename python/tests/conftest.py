"""Shared helpers of the lowbit Python tests. Run with the freshly built library:

    LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 -m pytest -q python/tests
"""

from __future__ import annotations

import os
from typing import List, Sequence

import pytest
import torch

import lowbit  # noqa: F401  (loads the library; a failure here is the clearest message)

# Shapes that exercise every path: a matrix, a conv kernel viewed as (8, 27), a vector
# (no preconditioner) and a matrix with unit dimensions (viewed as a vector).
SHAPES = [(20, 30), (8, 3, 3, 3), (17,), (1, 70, 1)]


def make_params(seed: int, shapes: Sequence[Sequence[int]] = SHAPES, dtype=torch.float32) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def clones(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def set_grads(params: Sequence[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def quick(**overrides):
    """Options that precondition (and quantize) small test matrices within a few steps."""
    options = dict(lr=0.01, stat_interval=2, root_interval=4, min_quant_numel=256, epsilon=1e-4)
    options.update(overrides)
    return options


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The suite runs on small 2-core machines; one intra-op thread count for every test
    # (LOWBIT_TEST_THREADS overrides it, to check the bounds under other counts).
    torch.set_num_threads(int(os.environ.get("LOWBIT_TEST_THREADS", "2")))
    yield


def pytest_terminal_summary(terminalreporter):
    # The property-based tests count the cases they generate (fuzz_support.CASES); CI shows it.
    import sys

    support = sys.modules.get("fuzz_support")
    if support is not None and support.CASES:
        total = sum(support.CASES.values())
        parts = ", ".join(f"{name}: {n}" for name, n in sorted(support.CASES.items()))
        terminalreporter.write_line(f"hypothesis: {total} generated cases run ({parts})")
