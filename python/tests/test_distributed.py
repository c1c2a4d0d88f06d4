"""Distributed Shampoo on loopback Gloo with 2 and 3 ranks (so that factor counts do not
divide evenly): equal to one process, bit-identical across ranks, checkpoints from N
ranks load into M, a failing rank stops the others with a clear error."""

from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist

import lowbit
import distributed_worker as worker
from rank_runner import run_ranks
from conftest import make_params, set_grads

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")


def assert_ranks_agree(results: List[Dict]) -> None:
    for r, result in enumerate(results):
        for other, flat in enumerate(result["gathered"]):
            assert torch.equal(flat, result["gathered"][0]), f"rank {r} sees rank {other} differ"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["shampoo4", "shampoo32", "naive4"])
def test_equal_gradients_give_the_single_process_result_bit_for_bit(tmp_path, world, kind):
    results = run_ranks(tmp_path, world, worker.same_gradients, kind, 5)
    assert all(results), "a rank did not finish"
    assert_ranks_agree(results)
    for result in results:
        assert result["root_updates"] == 2
        for p, q in zip(result["params"], result["reference"]):
            assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["shampoo32", "shampoo4"])
def test_averaged_gradients_match_one_process_on_the_whole_batch(tmp_path, kind):
    results = run_ranks(tmp_path, 3, worker.averaged_gradients, kind, 6)
    assert all(results)
    assert_ranks_agree(results)
    start = make_params(1, [(20, 30)])[0].detach()
    p, q, fp32 = results[0]["params"][0], results[0]["reference"][0], results[0]["fp32"][0]
    moved = (q - start).norm()
    relative = ((p - q).norm() / moved).item()
    if kind == "shampoo32":
        # Gradient sums are rounded in another order (per shard, then across ranks), so the
        # runs agree to float rounding, not bit for bit; a worst-case bound through inverse
        # roots of condition up to 1 / epsilon would be too loose to mean anything. What is
        # asserted is an ordering: the distributed run is closer to the whole batch than a
        # run that weights each shard's mean equally (1/3 instead of 17/50, 17/50, 16/50: the
        # smallest averaging mistake these shards allow), and not equal to it.
        wrong = results[0]["equal_weights"][0]
        mistake = ((wrong - q).norm() / moved).item()
        assert relative < mistake, (relative, mistake)
        assert not torch.equal(p, wrong)
    else:
        # 4-bit codes are rounded to the nearest level, so a last-bit difference in the
        # gradient can flip a code: the distributed run then differs from the single run by
        # less than 4-bit Shampoo itself differs from fp32 Shampoo.
        quantization = ((fp32 - q).norm() / moved).item()
        assert relative < quantization, (relative, quantization)


def test_checkpoint_from_two_ranks_continues_on_three_and_on_one(tmp_path):
    run_ranks(tmp_path, 2, worker.same_gradients, "shampoo4", 3, "", 3)
    checkpoint = tmp_path / "checkpoint.pt"
    assert checkpoint.exists()
    # 3 ranks continue to step 6: equal to the uninterrupted single-process run.
    results = run_ranks(tmp_path, 3, worker.same_gradients, "shampoo4", 6, str(checkpoint), 3)
    assert all(results)
    assert_ranks_agree(results)
    for p, q in zip(results[0]["params"], results[0]["reference"]):
        assert torch.equal(p, q)
    # One process (not distributed) continues the same checkpoint to the same result.
    saved = torch.load(checkpoint, weights_only=True)
    params = [t.clone().requires_grad_(True) for t in saved["params"]]
    opt = lowbit.Shampoo(params, **dict(worker.OPTIONS, bits=4))
    opt.load_state_dict(saved["optimizer"])
    torch.set_num_threads(1)
    worker._steps(opt, params, 3, 6)
    for p, q in zip(params, results[0]["reference"]):
        assert torch.equal(p.detach(), q)


def test_checkpoint_of_other_parameters_is_refused(tmp_path):
    run_ranks(tmp_path, 2, worker.same_gradients, "shampoo4", 2, "", 2)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    params = make_params(0, [(20, 31), (8, 3, 3, 3), (17,), (40, 24)])
    opt = lowbit.Shampoo(params, **dict(worker.OPTIONS, bits=4))
    with pytest.raises(ValueError, match="nothing was loaded"):
        opt.load_state_dict(saved["optimizer"])
    assert len(opt.state) == 0


@pytest.mark.parametrize("how", ["exit", "raise", "hang"])
def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path, how):
    results = run_ranks(tmp_path, 2, worker.failing_rank, how, timeout=60)
    survivor = results[0]
    assert survivor is not None, "rank 0 hung"
    assert "lowbit distributed" in survivor["error"] and "rank 0 of 2" in survivor["error"], survivor["error"]
    if how == "hang":
        # Rank 1 was alive (its sockets open) until rank 0 failed: the timeout did it.
        assert results[1] == {"hung_until_rank0_failed": True}


def test_four_bit_states_travel_in_about_a_seventh_of_the_bytes(tmp_path):
    sent = {}
    for kind in ["shampoo32", "shampoo4"]:
        results = run_ranks(tmp_path, 2, worker.traffic, kind)
        sent[kind] = results[0]["communication"]["state_bytes"]
        assert sent[kind] == results[1]["communication"]["state_bytes"] > 0
    # One root update of a 256 x 192 weight: fp32 sends statistic + root, 8 n^2 bytes per
    # factor; 4-bit sends the codes of U and of the root (n^2 / 2 each), their fp32 block
    # scales (1/16 byte per element each at block 64), eigenvalues and the root's diagonal
    # (4 n each) and each quantized matrix's 7 int64 of metadata: 8 / 1.125 = 7.1 up to
    # the O(n) terms.
    expected_fp32 = sum(8 * n * n for n in (256, 192))
    expected_4bit = sum(n * n * 9 // 8 + 8 * n + 2 * 56 for n in (256, 192))
    assert sent["shampoo32"] == expected_fp32
    assert sent["shampoo4"] == expected_4bit
    # Per factor 8 n^2 / (9 n^2 / 8 + 8 n + 112): below 64 / 9 = 7.11, and for n >= 192 above
    # 8 / (9/8 + 8/192 + 112/192^2) = 6.84 ("about a seventh").
    assert 8 / (9 / 8 + 8 / 192 + 112 / 192 ** 2) <= sent["shampoo32"] / sent["shampoo4"] < 64 / 9


def test_bad_distributed_arguments_are_named():
    params = make_params(0, [(4, 4)])
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lowbit.Shampoo(params, process_group="world")
    with pytest.raises(ValueError, match="average_gradients needs a process_group"):
        lowbit.Shampoo(params, average_gradients=True)
    with pytest.raises(ValueError, match="distributed_timeout"):
        lowbit.Shampoo(params, distributed_timeout=0)
    assert lowbit.Shampoo(params).communication() == {"exchanges": 0, "state_bytes": 0, "gradient_bytes": 0,
                                                      "fsdp_bytes": 0}


def test_torchrun_ddp_example_keeps_ranks_identical(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
         "--limit", "512", "--max-steps", "4", "--stat-interval", "1", "--root-interval", "2",
         "--data", str(tmp_path)],  # no dataset there: the example's synthetic data
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "parameters bit-identical on every rank: yes" in run.stdout, run.stdout
