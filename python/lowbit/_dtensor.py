"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and other DTensor parameters.

lowbit's default for a DTensor parameter is Meta Distributed Shampoo's fully_shard mode:
each rank preconditions its local shard (``p.to_local()``) as if it were a plain tensor,
with its own state, so optimizer memory per rank falls as 1/N and the optimizer itself
sends nothing but one all-reduce of the gradients' squared norms per step (so that every
rank reaches the same overflow verdict; docs/distributed.md, "FSDP2").

In state dicts, the entries shaped like the local shard (the first-order moments) become
DTensors with the parameter's mesh and placements, so that torch.distributed.checkpoint
saves them sharded and can reshard them. The other entries (preconditioner blocks, which
exist only for that rank's shard) are plain tensors under a name that records the rank
and the number of ranks (``name@rank{r}of{n}``): DCP keeps one copy per rank, and a state
dict from another number of ranks is refused by name.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

try:  # torch.distributed may be absent (some builds) or lack DTensor (old torch)
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - exercised only on such builds
    DTensor = None  # type: ignore[assignment,misc]

# The state entries of lowbit's optimizers that are shaped like their parameter: moments,
# momentum, velocity, Hessian diagonals. For an FSDP2 parameter they are saved as DTensors.
ELEMENTWISE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "hessian", "exp_hessian_diag_sq", "hessian_diag",
               "velocity")

_RANK_TAG = re.compile(r"^(?P<name>.+)@rank(?P<rank>\d+)of(?P<world>\d+)$")


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Iterable[Any]) -> bool:
    return any(map(is_dtensor, tensors))


def placement_problem(p: Any) -> Optional[str]:
    """Why lowbit cannot take DTensor parameter ``p`` (None when it can): a 1-D mesh with
    Shard(0) (FSDP2) or Replicate is supported."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        return (f"is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with placements {placements}; "
                "lowbit supports 1-D meshes (FSDP2's fully_shard, Shard(0)), not HSDP or tensor parallelism")
    if placements not in ((Shard(0),), (Replicate(),)):
        return (f"is a DTensor with placements {placements}; lowbit supports Shard(0) (FSDP2's fully_shard) and "
                "Replicate() on a 1-D mesh")
    return None


def first_unsupported(params: Iterable[Any]) -> Optional[Tuple[int, str]]:
    """(index, why) of the first DTensor of ``params`` lowbit cannot take, or None."""
    for i, p in enumerate(params):
        problem = placement_problem(p) if is_dtensor(p) else None
        if problem:
            return i, problem
    return None


def check_gradient(p: Any, g: Any) -> Optional[str]:
    """Why gradient ``g`` of DTensor parameter ``p`` cannot be used (None when it can)."""
    if not is_dtensor(g):
        return f"is a DTensor but its gradient is a plain {type(g).__name__}"
    if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
        return (f"has placements {tuple(p.placements)} but its gradient {tuple(g.placements)}; expected a gradient "
                "sharded like its parameter (FSDP2 reduce-scatters it so)")
    return None


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage: in-place updates reach ``t``), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(p: Any) -> bool:
    """A DTensor parameter split across ranks (Shard(0)), whose gradient norms must be summed."""
    return is_dtensor(p) and tuple(p.placements) == (Shard(0),)


def summed_over_shards(norms: torch.Tensor, params: List[Any], who: str) -> torch.Tensor:
    """``norms`` (one squared norm per entry of ``params``, of the local gradients) with the
    entries of Shard(0) parameters summed over their mesh: the squared norm of the whole
    gradient. One all-reduce per mesh; every rank calls it with the same parameters (an
    empty shard contributes 0), so every rank reaches the same verdict."""
    import torch.distributed as dist

    by_mesh: Dict[Any, List[int]] = {}
    for i, p in enumerate(params):
        if is_sharded(p):
            by_mesh.setdefault(p.device_mesh, []).append(i)
    out = norms.clone()
    for mesh, indices in by_mesh.items():
        index = torch.tensor(indices, device=norms.device)
        part = out.index_select(0, index)
        try:
            dist.all_reduce(part, group=mesh.get_group())
        except (RuntimeError, dist.DistBackendError) as e:
            raise RuntimeError(
                f"{who}: the all-reduce of the FSDP2 shards' gradient norms over {mesh} failed; another rank has "
                f"failed, or is not stepping (timed out after the process group's timeout); nothing was updated "
                f"on this rank. ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        out.index_copy_(0, index, part)
    return out


def _rank_and_world(p: Any) -> Tuple[int, int]:
    mesh = p.device_mesh
    return mesh.get_local_rank(), mesh.size()


def to_saved(p: Any, entries: Dict[str, torch.Tensor], elementwise: Iterable[str]) -> Dict[str, Any]:
    """The state-dict form of DTensor parameter ``p``'s local state ``entries``: the
    ``elementwise`` entries shaped like the local shard as DTensors placed like ``p``, 0-d
    counters as they are (equal on every rank), everything else tagged with the rank."""
    rank, world = _rank_and_world(p)
    shard_shape = p.to_local().shape
    out: Dict[str, Any] = {}
    for name, t in entries.items():
        if name in elementwise and t.shape == shard_shape:
            out[name] = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())
        elif t.dim() == 0:
            out[name] = t
        else:
            out[f"{name}@rank{rank}of{world}"] = t
    return out


def from_saved(p: Any, entries: Dict[str, Any], who: str, what: str) -> Dict[str, torch.Tensor]:
    """The local state of DTensor parameter ``p`` from its state-dict form (see
    :func:`to_saved`). Raises ValueError naming the parameter when the entries were saved
    by another rank or another number of ranks, or are placed unlike ``p``."""
    rank, world = _rank_and_world(p)
    out: Dict[str, torch.Tensor] = {}
    for name, t in entries.items():
        tag = _RANK_TAG.match(name)
        if tag:
            saved_rank, saved_world = int(tag["rank"]), int(tag["world"])
            if (saved_rank, saved_world) != (rank, world):
                raise ValueError(
                    who + f"the state of {what} was saved by rank {saved_rank} of {saved_world}; this is rank {rank} "
                    f"of {world}. Its entry \"{tag['name']}\" belongs to that rank's local shard of an FSDP2 "
                    f"parameter (lowbit preconditions local shards), so it cannot move to another sharding: "
                    f"resume on {saved_world} ranks; nothing was loaded")
            out[tag["name"]] = t
        elif is_dtensor(t):
            if tuple(t.placements) != tuple(p.placements) or t.shape != p.shape:
                raise ValueError(who + f"entry \"{name}\" of the state of {what} is a DTensor of shape {list(t.shape)} "
                                 f"with placements {tuple(t.placements)}; expected shape {list(p.shape)} placed "
                                 f"{tuple(p.placements)}, like its parameter; nothing was loaded")
            out[name] = t.to_local()
        elif t.dim() == 0:
            out[name] = t
        else:
            raise ValueError(who + f"entry \"{name}\" of the state of {what} is a plain tensor; the state of an "
                             f"FSDP2 (DTensor) parameter names its rank (\"{name}@rank{rank}of{world}\") or is a "
                             "DTensor; was it saved from a model that was not sharded? nothing was loaded")
    return out


def refuse_rank_tags(entries: Dict[str, Any], who: str, what: str) -> None:
    """ValueError when a plain parameter is given state saved for an FSDP2 shard."""
    for name, t in entries.items():
        if _RANK_TAG.match(name) or is_dtensor(t):
            raise ValueError(who + f"entry \"{name}\" of the state of {what} was saved for an FSDP2 (DTensor) "
                             "parameter's local shard; this parameter is a plain tensor; nothing was loaded")
