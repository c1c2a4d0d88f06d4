"""lowbit's optimizers on FSDP2 models (fully_shard, DTensor parameters sharded on dim 0),
on loopback Gloo with 2 and 3 ranks (3: uneven shards). Default mode: each rank
preconditions its local shard as a plain tensor (docs/distributed.md, "FSDP2")."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fsdp2_worker as worker
from rank_runner import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")


def _all_ranks(results):
    assert all(r is not None for r in results), "a rank did not finish"
    return results


KINDS = ["shampoo4", "shampoo32", "shampoo8", "naive4", "shampoo4-sgdm", "shampoo4-graft4", "caspr4", "soap4",
         "cholesky4", "adamw4", "adamw8", "mfac4", "naggs", "sophia-gnb"]


@pytest.mark.parametrize("world", [2, 3])
def test_each_shard_moves_as_a_plain_optimizer_on_it(tmp_path, world):
    # The same local gradients given to a plain optimizer over clones of the local shards:
    # bit for bit, since both run the same kernels on the same tensors in one process.
    results = _all_ranks(run_ranks(tmp_path, world, worker.local_shards_equal_plain_optimizer, KINDS, 5))
    for rank, r in enumerate(results):
        for kind in KINDS:
            assert r[kind]["finite"], kind
            for i, (got, want) in enumerate(zip(r[kind]["got"], r[kind]["want"])):
                assert torch.equal(got, want), f"{kind}, rank {rank}, parameter {i}: the FSDP2 step differs"


@pytest.mark.parametrize("bits", [4, 32])
def test_state_per_rank_is_one_nth_of_one_process(tmp_path, bits):
    # Widths that divide by 2 and blocks of 8: the shards' blocks are exactly the blocks of
    # one process, split between the ranks, so each rank holds exactly half the state.
    one = run_ranks(tmp_path, 1, worker.state_bytes_per_rank, bits)[0]
    two = _all_ranks(run_ranks(tmp_path, 2, worker.state_bytes_per_rank, bits))
    for key in ("preconditioner", "first_order"):
        assert one[key] > 0
        assert [r[key] for r in two] == [one[key] // 2] * 2, key


@pytest.mark.parametrize("kind", ["shampoo4", "shampoo32", "adamw4"])
def test_a_dcp_checkpoint_resumes_exactly_on_the_same_ranks(tmp_path, kind):
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = _all_ranks(run_ranks(tmp_path, 2, worker.checkpoint_round_trip, kind, ckpt, "save"))
    resumed = _all_ranks(run_ranks(tmp_path, 2, worker.checkpoint_round_trip, kind, ckpt, "resume"))
    for rank, (a, b) in enumerate(zip(uninterrupted, resumed)):
        assert "error" not in b, b.get("error")
        for i, (x, y) in enumerate(zip(a["params"], b["params"])):
            assert torch.equal(x, y), f"rank {rank}, parameter {i}: the resumed run differs"


def test_a_shampoo_checkpoint_of_two_ranks_is_refused_on_three_by_name(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _all_ranks(run_ranks(tmp_path, 2, worker.checkpoint_round_trip, "shampoo4", ckpt, "save"))
    resumed = _all_ranks(run_ranks(tmp_path, 3, worker.checkpoint_round_trip, "shampoo4", ckpt, "resume"))
    for r in resumed:
        assert "error" in r
        # DCP looks for this rank's blocks, whose names record the rank and the rank count.
        assert "of3" in r["error"], r["error"]


def test_an_fp32_adamw_checkpoint_of_two_ranks_resumes_on_three(tmp_path):
    # Elementwise state is saved as DTensors, which DCP reshards.
    ckpt = str(tmp_path / "ckpt")
    _all_ranks(run_ranks(tmp_path, 2, worker.checkpoint_round_trip, "adamw32", ckpt, "save"))
    resumed = _all_ranks(run_ranks(tmp_path, 3, worker.checkpoint_round_trip, "adamw32", ckpt, "resume"))
    for r in resumed:
        assert "error" not in r, r["error"]
        assert all(bool(p.isfinite().all()) for p in r["params"])


def test_unsupported_placements_are_refused_naming_parameter_and_placement(tmp_path):
    for r in _all_ranks(run_ranks(tmp_path, 2, worker.refused_placements)):
        assert "layer.shard1" in r["shard1"] and "Shard(dim=1)" in r["shard1"], r["shard1"]
        assert "layer.mesh2d" in r["mesh2d"] and "2-D device mesh" in r["mesh2d"], r["mesh2d"]
        assert "drop process_group" in r["process_group"], r["process_group"]
        assert "was saved by rank" in r["other_ranks"] and "resume on 3 ranks" in r["other_ranks"], r["other_ranks"]


def test_fsdp2_and_plain_groups_with_other_bits_in_one_optimizer(tmp_path):
    for rank, r in enumerate(_all_ranks(run_ranks(tmp_path, 2, worker.mixed_groups))):
        for i, (got, want) in enumerate(zip(r["got"], r["want"])):
            assert torch.equal(got, want), f"rank {rank}, parameter {i}"


def test_a_nan_in_one_shard_is_refused_on_every_rank(tmp_path):
    results = _all_ranks(run_ranks(tmp_path, 2, worker.nonfinite_gradient_on_one_rank))
    for r in results:
        assert "NaN or Inf" in r["message"] or "nan" in r["message"].lower(), r["message"]
        assert r["unchanged"]


@pytest.mark.parametrize("world", [2, 3])
def test_hutchinson_on_fsdp2_by_differences_matches_the_exact_diagonal(tmp_path, world):
    # FSDP2 gradients carry no graph, so AdaHessian and Sophia's Hutchinson take H z as
    # (g(theta + eps z) - g(theta)) / eps. On 1/2 sum c w^2 that is c z up to rounding, and
    # z * (H z) = c. Rounding: w + eps z rounds by u |w + eps z|; each gradient c w by u, and
    # FSDP2's average over N ranks by (N - 1) u more; the difference of the two gradients
    # then errs by at most c ((|w| + eps) (2 + N) u + |w| (1 + N) u), over eps:
    #   |estimate - c| / c <= (2 N + 3) u (max|w| + eps) / eps,   u = 2^-24,
    # with eps = sqrt(2^-23) (1 + ||w||) / sqrt(numel) as lowbit/_fsdp_hessian.py sets it.
    from lowbit._fsdp_hessian import step_size

    results = _all_ranks(run_ranks(tmp_path, world, worker.hessian_by_differences))
    for rank, r in enumerate(results):
        for name in ("adahessian", "sophia"):
            got, exact, theta = r[name]["estimate"], r[name]["exact"], r[name]["theta"]
            eps = step_size(float(theta.double().square().sum()), theta.numel())
            bound = (2 * world + 3) * 2.0 ** -24 * (float(theta.abs().max()) + eps) / eps
            assert got.shape == exact.shape
            worst = float(((got - exact).abs() / exact).max()) if exact.numel() else 0.0
            assert worst <= bound, f"{name}, rank {rank}: relative error {worst:.3g} above the bound {bound:.3g}"


def test_a_rank_that_stops_makes_the_others_raise_a_clear_error(tmp_path):
    results = _all_ranks(run_ranks(tmp_path, 2, worker.a_rank_stops_stepping, timeout=60))
    assert results[1]["stopped"]
    assert "all-reduce of the FSDP2 shards' gradient norms" in results[0]["message"], results[0]["message"]
    assert "another rank has failed" in results[0]["message"]
    assert results[0]["unchanged"]


@pytest.mark.parametrize("world,bits", [(2, 4), (3, 4), (3, 32)])
def test_lossless_mode_equals_one_process_on_the_whole_parameters(tmp_path, world, bits):
    results = _all_ranks(run_ranks(tmp_path, world, worker.lossless_equals_one_process, bits, 5))
    for rank, r in enumerate(results):
        for i, (got, want) in enumerate(zip(r["got"], r["want"])):
            assert torch.equal(got, want), f"rank {rank}, parameter {i}: lossless differs from one process"
        assert r["fsdp_bytes"] > 0
    # Each parameter's state lives on one rank: the ranks' states add up to one process's.
    assert all(r["state_bytes"] < sum(x["state_bytes"] for x in results) for r in results)


def test_lossless_mode_resumes_exactly_from_a_dcp_checkpoint(tmp_path):
    results = _all_ranks(run_ranks(tmp_path, 2, worker.lossless_equals_one_process, 4, 5,
                                   str(tmp_path / "ckpt")))
    for rank, r in enumerate(results):
        for i, (got, want) in enumerate(zip(r["got"], r["want"])):
            assert torch.equal(got, want), f"rank {rank}, parameter {i}: the resumed lossless run differs"


def test_lossless_owners_balance_the_work_however_uneven():
    # Greedy largest-first: no rank gets more than the mean load plus the largest single
    # parameter's (Graham's bound for LPT), and the assignment depends only on the costs.
    from lowbit._fsdp_lossless import owners, work_of

    shapes = [(1024, 1024), (4096, 1024), (1024, 4096), (17, 3), (1000, 7), (512,), (333, 333), (2048, 2048)]
    costs = [work_of(s, 1200) for s in shapes]
    for world in (2, 3, 4, 8):
        assigned = owners(costs, world)
        assert assigned == owners(costs, world)
        load = [sum(c for c, r in zip(costs, assigned) if r == rank) for rank in range(world)]
        assert max(load) <= sum(costs) / world + max(costs)
        assert sorted(set(assigned)) == list(range(min(world, len(costs))))


@pytest.mark.parametrize("mode", ["local", "lossless"])
def test_the_torchrun_fsdp2_example_matches_one_process(mode):
    # The example's own check: its loss curve against one process on the whole batch,
    # within the tolerance it states (exit status 1 otherwise).
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train_fsdp2.py"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
         "--mode", mode, "--steps", "30"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MATCH" in run.stdout and "rank 1: optimizer state" in run.stdout, run.stdout
