"""Rank processes of the distributed tests (test_distributed.py), started with the spawn
method on loopback Gloo. Each scenario writes what the test checks to out_dir/rank{r}.pt."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Dict, List

import torch
import torch.distributed as dist

import lowbit
from conftest import clones, make_params, set_grads

# Blocks of several sizes (max_preconditioner_dim 16 cuts them unevenly), quantized from order 8.
SHAPES = [(20, 30), (8, 3, 3, 3), (17,), (40, 24)]
OPTIONS = dict(lr=0.01, stat_interval=1, root_interval=2, max_preconditioner_dim=16, min_quant_numel=64,
               epsilon=1e-4)
KINDS = {"shampoo4": dict(bits=4), "shampoo32": dict(bits=32), "naive4": dict(bits=4, quantize="matrix")}


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)  # the same kernels as the reference run in this process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _gathered(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """Every rank's flattened parameters."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


def _steps(opt: torch.optim.Optimizer, params: List[torch.Tensor], first: int, last: int) -> None:
    for k in range(first, last):
        set_grads(params, seed=100 + k)  # the same gradients on every rank
        opt.step()


def same_gradients(rank: int, world: int, init_file: str, out_dir: str, kind: str, steps: int,
                   load_from: str = "", save_at: int = 0) -> None:
    """Equal gradients on every rank: the distributed run must equal a single-process run
    (here, in the same process) bit for bit, on every rank."""
    _init(rank, world, init_file)
    options = dict(OPTIONS, **KINDS[kind])
    params = make_params(0, SHAPES)
    reference = clones(params)
    opt = lowbit.Shampoo(params, **options, process_group=dist.group.WORLD)
    reference_opt = lowbit.Shampoo(reference, **options)
    first = 0
    if load_from:
        saved = torch.load(load_from, weights_only=True)
        with torch.no_grad():
            for p, q in zip(params, saved["params"]):
                p.copy_(q)
        opt.load_state_dict(saved["optimizer"])
        first = save_at
        _steps(reference_opt, reference, 0, first)
    for k in range(first, steps):
        _steps(opt, params, k, k + 1)
        _steps(reference_opt, reference, k, k + 1)
        if save_at and k + 1 == save_at and rank == 0:
            torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()},
                       os.path.join(out_dir, "checkpoint.pt"))
    result: Dict[str, Any] = {
        "params": [p.detach() for p in params],
        "reference": [p.detach() for p in reference],
        "gathered": _gathered(params),
        "communication": opt.communication(),
        "root_updates": opt.root_updates(),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def traffic(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    """Bytes this rank's group exchanged for a layer of transformer-like size."""
    _init(rank, world, init_file)
    params = make_params(0, [(256, 192)])
    opt = lowbit.Shampoo(params, **dict(lr=0.01, stat_interval=1, root_interval=1), **KINDS[kind],
                         process_group=dist.group.WORLD)
    _steps(opt, params, 0, 1)
    torch.save({"communication": opt.communication()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def averaged_gradients(rank: int, world: int, init_file: str, out_dir: str, kind: str, steps: int) -> None:
    """Each rank sees its shard of a global batch (shards of unequal size); the optimizer
    averages the gradients. Compared with one process on the whole batch."""
    _init(rank, world, init_file)
    options = dict(OPTIONS, **KINDS[kind])
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(50, 30, generator=g), torch.randn(50, 20, generator=g)
    w = make_params(1, [(20, 30)])
    reference, fp32, equal_weights = clones(w), clones(w), clones(w)
    opt = lowbit.Shampoo(w, **options, process_group=dist.group.WORLD, average_gradients=True)
    reference_opt = lowbit.Shampoo(reference, **options)
    fp32_opt = lowbit.Shampoo(fp32, **dict(options, bits=32))
    equal_weights_opt = lowbit.Shampoo(equal_weights, **options)
    shards = [torch.arange(r, x.shape[0], world) for r in range(world)]  # 17, 17, 16 rows for 3 ranks
    rows = shards[rank]
    for _ in range(steps):
        opt.zero_grad()
        # Scaled so that the mean over ranks is the mean over the whole batch.
        local = ((x[rows] @ w[0].t() - y[rows]) ** 2).sum() * world / x.shape[0]
        local.backward()
        opt.step()
        for single, single_opt in [(reference, reference_opt), (fp32, fp32_opt)]:
            single_opt.zero_grad()
            ((x @ single[0].t() - y) ** 2).mean(0).sum().backward()
            single_opt.step()
        # The mistake a wrong averaging weight makes: each shard's mean weighted 1 / world
        # (17/50 and 16/50 are the right weights).
        equal_weights_opt.zero_grad()
        (sum(((x[s] @ equal_weights[0].t() - y[s]) ** 2).mean(0).sum() for s in shards) / world).backward()
        equal_weights_opt.step()
    torch.save({"params": [p.detach() for p in w], "reference": [p.detach() for p in reference],
                "fp32": [p.detach() for p in fp32], "equal_weights": [p.detach() for p in equal_weights],
                "gathered": _gathered(w)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def failing_rank(rank: int, world: int, init_file: str, out_dir: str, how: str) -> None:
    """Rank 1 stops (exits, raises, or hangs) before step 3; the others must fail with a
    clear error. A hanging rank stays alive until rank 0 has its error, so that error can
    only have come from the optimizer's timeout."""
    _init(rank, world, init_file)
    params = make_params(0, SHAPES)
    opt = lowbit.Shampoo(params, **dict(OPTIONS, bits=4), process_group=dist.group.WORLD,
                         distributed_timeout=3.0)
    _steps(opt, params, 0, 2)
    survivor_result = os.path.join(out_dir, "rank0.pt")
    if rank == 1:
        if how == "exit":
            os._exit(3)
        if how == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        deadline = time.monotonic() + 120  # a safety net for a broken timeout, not a measurement
        while not os.path.exists(survivor_result) and time.monotonic() < deadline:
            time.sleep(0.1)
        torch.save({"hung_until_rank0_failed": os.path.exists(survivor_result)}, os.path.join(out_dir, "rank1.pt"))
        os._exit(0)
    try:
        _steps(opt, params, 2, 4)
        outcome = "no error"
    except RuntimeError as e:
        outcome = str(e)
    torch.save({"error": outcome}, survivor_result + ".tmp")
    os.replace(survivor_result + ".tmp", survivor_result)  # whole, before rank 1 sees it
    os._exit(0)  # the group is broken; do not wait for it on the way out
