"""Rank processes of test_fsdp2.py: models sharded with FSDP2 (``fully_shard``) on loopback
Gloo, started with the spawn method. Each scenario writes what the test checks to
out_dir/rank{r}.pt (tensors and plain values only)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lowbit

# Small blocks (max_preconditioner_dim 8) and quantization from 16 elements, so that a few
# steps exercise every kind of state; stat_interval 1 and root_interval 2 refresh often.
SHAMPOO = dict(lr=0.01, stat_interval=1, root_interval=2, max_preconditioner_dim=8, min_quant_numel=16,
               quant_block_size=16, epsilon=1e-4)
KINDS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "shampoo4": lambda ps: lowbit.Shampoo(ps, bits=4, **SHAMPOO),
    "shampoo32": lambda ps: lowbit.Shampoo(ps, bits=32, **SHAMPOO),
    "shampoo8": lambda ps: lowbit.Shampoo(ps, bits=8, **SHAMPOO),
    "naive4": lambda ps: lowbit.Shampoo(ps, bits=4, quantize="matrix", **SHAMPOO),
    "shampoo4-sgdm": lambda ps: lowbit.Shampoo(ps, bits=4, **dict(SHAMPOO, graft="sgdm")),
    "shampoo4-graft4": lambda ps: lowbit.Shampoo(ps, bits=4, graft_bits=4, **SHAMPOO),
    "caspr4": lambda ps: lowbit.Shampoo(ps, bits=4, preconditioner="caspr", **SHAMPOO),
    "soap4": lambda ps: lowbit.Shampoo(ps, bits=4, preconditioner="soap", graft_bits=4, **SHAMPOO),
    "cholesky4": lambda ps: lowbit.Shampoo(ps, bits=4, quantize="cholesky", **SHAMPOO),
    "adamw4": lambda ps: lowbit.AdamW(ps, lr=0.01, bits=4, min_quant_numel=16, block_size=16),
    "adamw8": lambda ps: lowbit.AdamW(ps, lr=0.01, bits=8, min_quant_numel=16, block_size=16),
    "adamw32": lambda ps: lowbit.AdamW(ps, lr=0.01, bits=32),
    "mfac4": lambda ps: lowbit.MFAC(ps, lr=0.01, window=3, damping=0.1, bits=4, quant_block_size=16),
    "naggs": lambda ps: lowbit.NagGS(ps, lr=0.05),
    "sophia-gnb": lambda ps: lowbit.Sophia(ps, lr=0.01, hessian_interval=2),
}


def _init(rank: int, world: int, init_file: str, timeout: float = 60) -> Any:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return init_device_mesh("cpu", (world,))


def _model(mesh: Any, widths: List[int], seed: int = 0) -> torch.nn.Module:
    """An MLP whose layers and root are sharded with fully_shard (rows split unevenly
    unless they divide by the number of ranks)."""
    torch.manual_seed(seed)
    layers: List[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _backward(model: torch.nn.Module, width: int, step: int) -> None:
    """The same batch on every rank (so FSDP2's averaged gradient is the batch's)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, width, generator=g)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _locals(model: torch.nn.Module) -> List[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _refused_step(opt: torch.optim.Optimizer, model: torch.nn.Module, before: List[torch.Tensor]) -> Dict[str, Any]:
    """A step expected to raise: its message, and whether the shards stayed as ``before``."""
    message = ""
    try:
        opt.step()
    except RuntimeError as e:
        message = str(e)
    return {"message": message, "unchanged": all(torch.equal(a, b) for a, b in zip(before, _locals(model)))}


def _save(out_dir: str, rank: int, result: Dict[str, Any]) -> None:
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def local_shards_equal_plain_optimizer(rank: int, world: int, init_file: str, out_dir: str, kinds: List[str],
                                       steps: int) -> None:
    """The default mode, for each of ``kinds``: every rank's shard moves exactly as a plain
    optimizer's step on that shard with the same local gradients (bit for bit)."""
    mesh = _init(rank, world, init_file)
    widths = [12, 9, 5]
    result: Dict[str, Any] = {}
    for kind in kinds:
        model = _model(mesh, widths)
        reference = [torch.nn.Parameter(t) for t in _locals(model)]
        opt, reference_opt = KINDS[kind](model.parameters()), KINDS[kind](reference)
        for step in range(steps):
            _backward(model, widths[0], step)
            for q, p in zip(reference, model.parameters()):
                q.grad = p.grad.to_local().detach().clone()
            if hasattr(opt, "update_hessian") and opt.hessian_due():  # Sophia-G: the gradient stands in
                opt.update_hessian(16)  # for the sampled-label one
                reference_opt.update_hessian(16)
            opt.step()
            reference_opt.step()
        result[kind] = {"got": _locals(model), "want": [q.detach().clone() for q in reference],
                        "finite": all(bool(p.to_local().isfinite().all()) for p in model.parameters())}
    _save(out_dir, rank, result)


def state_bytes_per_rank(rank: int, world: int, init_file: str, out_dir: str, bits: int) -> None:
    """The state each rank keeps (lowbit's own count), to compare with one process."""
    mesh = _init(rank, world, init_file)
    widths = [32, 64, 16]
    model = _model(mesh, widths)
    opt = lowbit.Shampoo(model.parameters(), bits=bits, **SHAMPOO)
    _backward(model, widths[0], 0)
    opt.step()
    b = opt.state_bytes()
    _save(out_dir, rank, {"preconditioner": b.preconditioner, "first_order": b.first_order})


def checkpoint_round_trip(rank: int, world: int, init_file: str, out_dir: str, kind: str, ckpt: str,
                          phase: str) -> None:
    """phase "save": 3 steps, a DCP checkpoint, 3 more (the uninterrupted run).
    phase "resume": a fresh model and optimizer, the checkpoint loaded, the same 3 steps; or,
    on another number of ranks, what loading raised."""
    mesh = _init(rank, world, init_file)
    widths = [12, 9, 5]
    model = _model(mesh, widths, seed=0 if phase == "save" else 7)  # resume: other values until loaded
    opt = KINDS[kind](model.parameters())
    result: Dict[str, Any] = {}
    if phase == "save":
        for step in range(3):
            _backward(model, widths[0], step)
            opt.step()
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
    else:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        try:
            dcp.load(state, checkpoint_id=ckpt)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            result["error"] = f"{type(e).__name__}: {e}"
            _save(out_dir, rank, result)
            return
    for step in range(3, 6):
        _backward(model, widths[0], step)
        opt.step()
    result["params"] = _locals(model)
    _save(out_dir, rank, result)


def refused_placements(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Placements lowbit does not support are refused by name when the optimizer is made."""
    mesh = _init(rank, world, init_file)
    errors: Dict[str, str] = {}
    columns = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    hsdp = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh2, [Replicate(), Shard(0)]))
    for name, p in [("shard1", columns), ("mesh2d", hsdp)]:
        try:
            lowbit.Shampoo([{"params": [p], "param_names": [f"layer.{name}"]}], bits=4)
            errors[name] = ""
        except ValueError as e:
            errors[name] = str(e)
    row = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    try:
        lowbit.Shampoo([row], bits=4, process_group=dist.group.WORLD)
        errors["process_group"] = ""
    except ValueError as e:
        errors["process_group"] = str(e)
    # A state dict of this rank's blocks, relabelled as if saved on world + 1 ranks.
    opt = lowbit.Shampoo([row], bits=4, **SHAMPOO)
    row.grad = distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)])
    opt.step()
    sd = opt.state_dict()
    sd["state"][0] = {k.replace(f"of{world}", f"of{world + 1}"): v for k, v in sd["state"][0].items()}
    try:
        lowbit.Shampoo([row], bits=4, **SHAMPOO).load_state_dict(sd)
        errors["other_ranks"] = ""
    except ValueError as e:
        errors["other_ranks"] = str(e)
    _save(out_dir, rank, errors)


def mixed_groups(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """An FSDP2 group at 4 bits and a plain (replicated) group at 32 bits in one optimizer."""
    mesh = _init(rank, world, init_file)
    widths = [12, 9, 5]
    model = _model(mesh, widths)
    torch.manual_seed(3)
    plain = torch.nn.Parameter(torch.randn(6, 5))
    opt = lowbit.Shampoo([{"params": list(model.parameters()), "bits": 4},
                          {"params": [plain], "bits": 32}], **{k: v for k, v in SHAMPOO.items()})
    reference = [torch.nn.Parameter(t) for t in _locals(model)]
    plain_ref = torch.nn.Parameter(plain.detach().clone())
    reference_opt = lowbit.Shampoo([{"params": reference, "bits": 4}, {"params": [plain_ref], "bits": 32}],
                                   **SHAMPOO)
    for step in range(4):
        _backward(model, widths[0], step)
        g = torch.Generator().manual_seed(step)
        plain.grad = torch.randn(6, 5, generator=g)
        plain_ref.grad = plain.grad.clone()
        for q, p in zip(reference, model.parameters()):
            q.grad = p.grad.to_local().detach().clone()
        opt.step()
        reference_opt.step()
    _save(out_dir, rank, {"got": _locals(model) + [plain.detach().clone()],
                          "want": [q.detach().clone() for q in reference] + [plain_ref.detach().clone()]})


def nonfinite_gradient_on_one_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A NaN in one rank's shard of a gradient: every rank refuses the step (the squared
    norms are summed over the shards), and no shard changes."""
    mesh = _init(rank, world, init_file)
    widths = [12, 9, 5]
    model = _model(mesh, widths)
    opt = lowbit.Shampoo(model.parameters(), bits=4, **SHAMPOO)
    _backward(model, widths[0], 0)
    opt.step()
    before = _locals(model)
    _backward(model, widths[0], 1)
    if rank == world - 1:
        next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
    _save(out_dir, rank, _refused_step(opt, model, before))


class _DiagonalQuadratic(torch.nn.Module):
    """loss = 1/2 sum c w^2: a diagonal Hessian c, so Hutchinson's z * (H z) = c exactly for
    every Rademacher z, and a forward difference of gradients is exact up to rounding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(9, 6))
        self.register_buffer("c", torch.linspace(0.5, 2.0, 54).reshape(9, 6))

    def forward(self) -> torch.Tensor:
        return 0.5 * (self.c * self.w * self.w).sum()


def hessian_by_differences(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """AdaHessian and Sophia (Hutchinson) on FSDP2: the Hessian diagonal each keeps after a
    step, against the exact one (c, this rank's rows), and the bound the test derives."""
    mesh = _init(rank, world, init_file)
    result: Dict[str, Any] = {}
    for name in ("adahessian", "sophia"):
        model = _DiagonalQuadratic()
        fully_shard(model, mesh=mesh)
        theta = model.w.detach().full_tensor().clone()
        if name == "adahessian":
            opt = lowbit.AdaHessian(model.parameters(), lr=0.01)
        else:
            opt = lowbit.Sophia(model.parameters(), lr=0.01, estimator="hutchinson", hessian_interval=1)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = model()
            loss.backward(create_graph=True)
            return loss

        opt.step(closure)
        state = opt.state[model.w]
        estimate = state["hessian_diag"] if name == "adahessian" else state["hessian"] / (1 - 0.99)
        rows = torch.chunk(torch.arange(9), world)[rank] if rank < len(torch.chunk(torch.arange(9), world)) else []
        result[name] = {"estimate": estimate.detach().clone(), "exact": model.c[rows].clone(), "theta": theta}
    _save(out_dir, rank, result)


def a_rank_stops_stepping(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The last rank stops before a step (it failed elsewhere); the others' step raises a
    clear error within the process group's timeout (5 s here) and changes nothing."""
    mesh = _init(rank, world, init_file, timeout=5)
    widths = [12, 9, 5]
    model = _model(mesh, widths)
    opt = lowbit.Shampoo(model.parameters(), bits=4, **SHAMPOO)
    _backward(model, widths[0], 0)
    opt.step()
    _backward(model, widths[0], 1)
    if rank == world - 1:
        _save(out_dir, rank, {"stopped": True})
        return
    _save(out_dir, rank, _refused_step(opt, model, _locals(model)))


def lossless_equals_one_process(rank: int, world: int, init_file: str, out_dir: str, bits: int, steps: int,
                                ckpt: str = "") -> None:
    """fsdp_mode="lossless": the whole parameters equal a single process's lowbit.Shampoo on
    whole clones given the same (gathered) gradients, bit for bit. With ``ckpt``: a DCP
    checkpoint after 2 steps, loaded into a fresh optimizer, continues identically."""
    mesh = _init(rank, world, init_file)
    widths = [12, 9, 5]
    model = _model(mesh, widths)
    options = dict(SHAMPOO, bits=bits)
    opt = lowbit.Shampoo(model.parameters(), fsdp_mode="lossless", **options)
    reference = [torch.nn.Parameter(p.detach().full_tensor().clone()) for p in model.parameters()]
    reference_opt = lowbit.Shampoo(reference, **options)
    for step in range(steps):
        _backward(model, widths[0], step)
        for q, p in zip(reference, model.parameters()):
            q.grad = p.grad.full_tensor().clone()
        opt.step()
        reference_opt.step()
        if ckpt and step == 1:
            dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
            opt = lowbit.Shampoo(model.parameters(), fsdp_mode="lossless", **options)
            model.zero_grad(set_to_none=True)  # as in a fresh process: DCP then makes the state to load into
            state = {"optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=ckpt)
            set_optimizer_state_dict(model, opt, state["optim"])
    _save(out_dir, rank, {"got": [p.detach().full_tensor().clone() for p in model.parameters()],
                          "want": [q.detach().clone() for q in reference],
                          "state_bytes": opt.state_bytes().total, "fsdp_bytes": opt.communication()["fsdp_bytes"]})
