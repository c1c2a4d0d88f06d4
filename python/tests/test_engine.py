"""The structure that decides lowbit.Shampoo's speed on a GPU, read from torch.profiler on
the CPU (the same operators run there; docs/shampoo.md, "Execution"):

- a plain step (no refresh) makes no scalar read (aten::item / aten::_local_scalar_dense)
  and exactly one read of the device, lowbit::read_to_host (the gradients' squared norms
  of the overflow rule, all parameters in one tensor);
- an update step makes as many QR / eigh calls as there are distinct factor orders, and as
  many host reads with one parameter as with six.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lowbit

from conftest import set_grads

SCALAR_READS = ("aten::item", "aten::_local_scalar_dense")
HOST_READS = SCALAR_READS + ("aten::nonzero", "aten::equal", "lowbit::read_to_host")
# QR: linalg_qr, or geqrf + linalg_householder_product (Q alone), counted by the latter.
FACTORIZATIONS = ("aten::linalg_qr", "aten::linalg_householder_product", "aten::_linalg_eigh",
                  "aten::linalg_cholesky_ex")

ONE = [(64, 40)]
SIX = [(64, 40)] * 6
DISTINCT_ORDERS = 2  # 64 and 40


def refreshing(bits: int, interval: int = 1) -> Dict:
    # Every factor of these shapes is quantized at 4 bits (min_quant_numel 256 < 40 * 40).
    return dict(lr=0.01, bits=bits, stat_interval=interval, root_interval=interval, min_quant_numel=256,
                epsilon=1e-4)


def counts_of_step(shapes: List, options: Dict, step: int) -> Counter:
    """Operator counts of the `step`-th step (earlier steps run unprofiled)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(*s, generator=g).requires_grad_(True) for s in shapes]
    opt = lowbit.Shampoo(params, **options)
    for k in range(1, step):
        set_grads(params, 100 + k)
        opt.step()
    set_grads(params, 100 + step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return Counter(e.name for e in prof.events())


def total(counts: Counter, names) -> int:
    return sum(counts[n] for n in names)


@pytest.mark.parametrize("bits", [32, 4])
def test_a_plain_step_makes_no_scalar_read_and_one_device_read(bits):
    for shapes in (ONE, SIX):
        counts = counts_of_step(shapes, refreshing(bits, interval=100), 2)
        assert total(counts, SCALAR_READS) == 0, {n: counts[n] for n in SCALAR_READS}
        assert counts["lowbit::read_to_host"] == 1
        assert total(counts, FACTORIZATIONS) == 0


@pytest.mark.parametrize("bits, factorization",
                         [(4, "aten::linalg_householder_product"), (32, "aten::_linalg_eigh")])
def test_an_update_step_factorizes_once_per_order(bits, factorization):
    # 4-bit: the statistics update is one QR subspace step per order (the paper's) and the
    # root update needs none; fp32: one eigh per order. Step 2: the first refresh already ran.
    for shapes in (ONE, SIX):
        counts = counts_of_step(shapes, refreshing(bits), 2)
        assert total(counts, FACTORIZATIONS) == DISTINCT_ORDERS, {n: counts[n] for n in FACTORIZATIONS}
        assert counts[factorization] == DISTINCT_ORDERS


def test_the_refresh_tells_the_codec_its_candidates_are_finite():
    # On a GPU the codec's NaN/Inf check is a host read per call. The refresh makes what it
    # codes finite first (a rejected factor keeps its old state), so it passes
    # check_finite=False: read from the profiler's record of each call's last argument.
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(*s, generator=g).requires_grad_(True) for s in SIX]
    opt = lowbit.Shampoo(params, **refreshing(4))
    set_grads(params, 101)
    opt.step()
    set_grads(params, 102)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    flags = [e.concrete_inputs[-1] for e in prof.events() if e.name == "lowbit::quantize_blockwise"]
    assert len(flags) >= DISTINCT_ORDERS, flags  # eigenvectors and roots, one call per order at least
    assert all(flag is False for flag in flags), flags


@pytest.mark.parametrize("bits", [32, 4])
def test_host_reads_of_an_update_step_do_not_grow_with_the_factors(bits):
    one, six = (counts_of_step(shapes, refreshing(bits), 2) for shapes in (ONE, SIX))
    assert total(six, HOST_READS) == total(one, HOST_READS), (
        {n: one[n] for n in HOST_READS}, {n: six[n] for n in HOST_READS})


# ---------------------------------------------------------------- gradient_check="deferred"
# Statistics every 4 steps, roots every 8: steps 2, 3, 5, 6, 7 are plain.
DEFERRED = dict(refreshing(4, interval=4), root_interval=8, gradient_check="deferred")


def test_a_deferred_plain_step_reads_nothing_from_the_device():
    for shapes in (ONE, SIX):
        counts = counts_of_step(shapes, DEFERRED, 3)
        assert total(counts, HOST_READS) == 0, {n: counts[n] for n in HOST_READS}


def test_a_bad_gradient_in_a_deferred_step_changes_nothing_and_raises_at_the_next_refresh():
    g = torch.Generator().manual_seed(2)
    start = [torch.randn(*s, generator=g) for s in SIX[:2]]
    params = [t.clone().requires_grad_(True) for t in start]
    twin = [t.clone().requires_grad_(True) for t in start]
    opt = lowbit.Shampoo(params, **DEFERRED)
    twin_opt = lowbit.Shampoo(twin, **dict(DEFERRED, gradient_check="immediate"))
    for k in range(1, 5):
        set_grads(params, k)
        set_grads(twin, k)
        opt.step()
        twin_opt.step()
    set_grads(params, 5)
    params[1].grad[2, 3] = float("nan")
    opt.step()  # no read, no error yet
    for k in (6, 7):
        set_grads(params, k)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    set_grads(params, 8)
    with pytest.raises(RuntimeError, match=r"parameter 1 of group 0 has a NaN or Inf gradient.*deferred gradient "
                                           r"check 2 steps later"):
        opt.step()
    # Exactly the twin's state: the next steps agree bit for bit.
    for k in range(5, 13):
        set_grads(params, k)
        set_grads(twin, k)
        opt.step()
        twin_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    assert [opt.state[p].steps for p in params] == [twin_opt.state[p].steps for p in twin]


def test_state_dict_and_settle_raise_the_deferred_error():
    params = [torch.randn(64, 40).requires_grad_(True)]
    opt = lowbit.Shampoo(params, **DEFERRED)
    set_grads(params, 1)
    opt.step()
    params[0].grad = torch.full((64, 40), float("inf"))
    opt.step()
    with pytest.raises(RuntimeError, match="NaN or Inf gradient"):
        opt.state_dict()
    opt.settle()  # settled: nothing pending
    opt.step()
    with pytest.raises(RuntimeError, match="NaN or Inf gradient"):
        opt.settle()
