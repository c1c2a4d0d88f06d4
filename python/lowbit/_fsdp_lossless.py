"""FSDP2's lossless mode (``lowbit.Shampoo(..., fsdp_mode="lossless")``): every Shard(0)
parameter is stepped whole by one owner rank, so that the result equals a single process's
step on the whole parameter, bit for bit.

Per step and parameter: the whole parameter and gradient are gathered (``full_tensor``, an
all-gather on every rank), the owner steps them with the parameter's state (which only
the owner keeps), and broadcasts the updated parameter; every rank copies its rows back
into its shard. Owners are chosen from the shapes alone (the same on every rank, no
communication), largest cost first to the least loaded rank, so that the preconditioner
work stays balanced however uneven the shards are.
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Sequence

import torch
import torch.distributed as dist


class Gathered(NamedTuple):
    config: Any
    key: Any            # the DTensor parameter
    full: torch.Tensor  # the whole parameter (updated in place by the owner's step)
    grad: torch.Tensor  # the whole gradient
    owner: int          # mesh rank that steps it


def work_of(shape: Sequence[int], max_dim: int) -> float:
    """The cost of preconditioning a parameter of ``shape`` with blocks of at most
    ``max_dim``: its elements times the orders of the two factors that touch each one."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return float(numel)
    rows, cols = shape[0], numel // max(shape[0], 1)
    return float(numel) * (min(rows, max_dim) + min(cols, max_dim))


def owners(costs: Sequence[float], world: int) -> List[int]:
    """Greedy longest-processing-time assignment: the largest cost first, each to the rank
    with the least work so far (the lowest rank on ties). Deterministic from the costs."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[i] = rank
        load[rank] += costs[i]
    return out


def gather(items: Sequence[Any], max_dims: Sequence[int]) -> List[Gathered]:
    """``items`` are (config, DTensor parameter) pairs, in the same order on every rank."""
    if not items:
        return []
    world = items[0][1].device_mesh.size()
    assigned = owners([work_of(tuple(key.shape), d) for (_, key), d in zip(items, max_dims)], world)
    out = []
    with torch.no_grad():
        for (config, key), owner in zip(items, assigned):
            out.append(Gathered(config, key, key.detach().full_tensor(), key.grad.full_tensor(), owner))
    return out


def is_mine(g: Gathered) -> bool:
    return g.key.device_mesh.get_local_rank() == g.owner


def scatter_back(gathered: Sequence[Gathered]) -> int:
    """Broadcasts each updated parameter from its owner and copies every rank's rows into its
    shard. Returns the bytes this rank received or sent in the broadcasts."""
    moved = 0
    with torch.no_grad():
        for g in gathered:
            mesh = g.key.device_mesh
            group = mesh.get_group()
            dist.broadcast(g.full, src=dist.get_global_rank(group, g.owner), group=group)
            moved += g.full.numel() * g.full.element_size()
            local = g.key.to_local()
            rows = _rows_of(g.full, mesh.get_local_rank(), mesh.size())
            if rows.shape != local.shape:  # not torch.chunk's split: FSDP2 changed its layout
                raise RuntimeError(f"lowbit.Shampoo: fsdp_mode=\"lossless\" expected this rank's shard of a "
                                   f"parameter of shape {list(g.full.shape)} to be {list(rows.shape)} "
                                   f"(torch.chunk on dim 0); it is {list(local.shape)}")
            local.copy_(rows)
    return moved


def _rows_of(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of ``full`` that FSDP2's Shard(0) gives ``rank`` (torch.chunk on dim 0)."""
    chunks = torch.chunk(full, world, dim=0)
    return chunks[rank] if rank < len(chunks) else full[full.shape[0]:]
