"""Sophia, AdaHessian, M-FAC and NAG-GS as torch.optim optimizers, and the curvature helpers
they share (Hessian-vector products, Hutchinson's diagonal estimate).

The update rules are the C++ library's (``src/optim/second_order/update_rules.cpp`` and
``gradient_window.cpp``, the code the C++ ``lowbit::Sophia`` & co. run), reached as
``torch.ops.lowbit.*`` ops that update the state in place; the options are validated by the
C++ ``*Options::validate``. This module does what a torch optimizer does in Python: param
groups, gradient checks, the closure and the double backward, and state dicts of plain
tensors in ``optimizer.state[p]``.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from itertools import chain
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from . import _dtensor, _fsdp_hessian
from ._library import load as _load_library

_load_library()

from .optim import (  # noqa: E402
    ParamsT, StateBytes, _check_entries, _convert, _describe, _matched_state_dict, _message, _require_floating)

__all__ = ["Sophia", "AdaHessian", "MFAC", "NagGS", "hessian_vector_product", "hutchinson_diagonal"]

_ops = torch.ops.lowbit
_UINT64 = (1 << 64) - 1
# Counters kept as one-element CPU tensors, like torch's `step`; the rest follows the parameter.
_COUNTERS = ("step", "count", "gamma")


# ---------------------------------------------------------------------------- curvature helpers

def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           vectors: Sequence[torch.Tensor], *, retain_graph: bool = True) -> List[torch.Tensor]:
    """``H v`` for the Hessian ``H`` of the loss whose gradients with respect to ``params`` are
    ``grads``: the gradient of ``<grads, vectors>`` (Pearlmutter's trick, one extra backward).

    ``grads`` must carry a graph: compute them with ``create_graph=True``
    (``loss.backward(create_graph=True)`` then ``[p.grad for p in params]``, or
    ``torch.autograd.grad(loss, params, create_graph=True)``). The graph is kept unless
    ``retain_graph=False``, so several products can be taken from one backward. A gradient
    without a graph among gradients with one is a constant (its parameter enters the loss
    linearly): its rows of ``H`` are zero, and so is its part of ``H v``.

    Returns one tensor per parameter, without a graph. The Python twin of the C++
    ``lowbit::hessian_vector_products`` (``include/lowbit/hessian.h``).
    """
    grads, params, vectors = list(grads), list(params), list(vectors)
    who = "lowbit.hessian_vector_product"
    if not len(grads) == len(params) == len(vectors):
        raise ValueError(f"{who}: needs as many gradients, parameters and vectors; got {len(grads)}, "
                         f"{len(params)} and {len(vectors)}")
    for i, (g, p, v) in enumerate(zip(grads, params, vectors)):
        for name, t in (("gradient", g), ("parameter", p), ("vector", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{who}: {name} {i} must be a tensor; got {type(t).__name__}")
        if g.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"{who}: parameter {i} has shape {list(p.shape)} but its gradient has shape "
                             f"{list(g.shape)} and its vector {list(v.shape)}")
    if not grads:
        return []
    carrying = [i for i, g in enumerate(grads) if g.requires_grad]
    if not carrying:
        raise RuntimeError(f"{who}: the gradients carry no graph; compute them with create_graph=True "
                           "(loss.backward(create_graph=True), or torch.autograd.grad(loss, params, "
                           "create_graph=True))")
    products = torch.autograd.grad([grads[i] for i in carrying], params, [vectors[i] for i in carrying],
                                   retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if hv is None else hv for hv, p in zip(products, params)]


def _rademacher_like(t: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    # The draw of lowbit::rademacher_like: randint(0, 2) * 2 - 1 in t's dtype, on t's device.
    return torch.randint(0, 2, t.shape, generator=generator, dtype=t.dtype, device=t.device).mul_(2).sub_(1)


def hutchinson_diagonal(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], probes: int = 1, *,
                        generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Hutchinson's estimate of the Hessian diagonal: the mean over ``probes`` Rademacher
    vectors ``z`` (entries +-1) of ``z * (H z)``. Unbiased (``E[z z^T] = I``), exact for a
    diagonal ``H``; the variance of an entry is ``sum_{j != i} H_ij^2 / probes``.

    ``grads`` as for :func:`hessian_vector_product`; ``generator`` (on the parameters'
    device) makes the probes reproducible. The Python twin of ``lowbit::hutchinson_diagonal``.
    """
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
        raise ValueError(f"lowbit.hutchinson_diagonal: probes must be an int >= 1; got {probes!r}")
    params = list(params)
    total: List[torch.Tensor] = []
    for k in range(int(probes)):
        z = [_rademacher_like(p.detach(), generator) for p in params]
        hz = hessian_vector_product(grads, params, z)
        if k == 0:
            total = [zi * hi for zi, hi in zip(z, hz)]
        else:
            for t, zi, hi in zip(total, z, hz):
                t.add_(zi * hi)
    return [t.div_(float(probes)) for t in total]


# ---------------------------------------------------------------------------- the optimizers

class _Option(NamedTuple):
    default: Any
    kind: str      # "number", "int", "str", "number pair"
    meaning: str   # paper symbol / meaning
    allowed: str


class _SecondOrderOptimizer(Optimizer):
    """What the four optimizers share: options checked by the C++ validation, gradient checks
    before anything changes, state of plain tensors, validated state dicts."""

    _NAME = ""                                # lowbit.<_NAME> in messages
    _CPP = ""                                 # the name torch.ops.lowbit.second_order_options knows
    _TABLE: Dict[str, _Option] = {}           # the options, in the C++ Options' order and defaults
    _LAYOUT: Tuple[str, ...] = ()             # options that decide the layout of the state
    _SEEDED = False                           # draws Hutchinson probes: counts steps, one seed
    _REQUIRED: Tuple[str, ...] = ()           # state entries besides "step", shaped like the parameter
    _OPTIONAL: Tuple[str, ...] = ()
    _PRECONDITIONER: Tuple[str, ...] = ()     # which entries state_bytes() counts where
    _FIRST_ORDER: Tuple[str, ...] = ()
    _OVERFLOW_KEY = ""                        # what a gradient beyond the overflow rule would overflow

    def __init__(self, params: ParamsT, options: Dict[str, Any]) -> None:
        # Per param group: (option values the check ran on, the checked options).
        self._validated: List[Tuple[Tuple[Any, ...], Optional[Dict[str, Any]]]] = []
        self._steps = 0  # step() calls so far: the schedule of Hessian refreshes and the probes' seed
        self._where: Dict[int, Tuple[int, int]] = {}  # id(p) -> (group, index) of this step's parameters
        self._keys: Dict[int, torch.Tensor] = {}  # id(local shard) -> its FSDP2 (DTensor) parameter, this step
        self.skipped_steps = 0  # steps skipped by skip_nonfinite
        defaults = self._checked(options, " (defaults)")
        super().__init__(params, defaults)

    @property
    def _who(self) -> str:
        return "lowbit." + self._NAME

    # ------------------------------------------------------------------ options
    def _checked(self, values: Mapping, where: str) -> Dict[str, Any]:
        """The options of ``values`` (a group), converted (TypeError) and validated by the C++
        Options (ValueError), both naming the option."""
        converted = {name: _convert(self._who, name, row.kind, values[name], where)
                     for name, row in self._TABLE.items()}
        try:
            return dict(_ops.second_order_options(self._CPP, converted))
        except RuntimeError as e:
            raise ValueError(_message(e) + where) from None

    def _values(self, group: Mapping) -> Tuple[Any, ...]:
        return tuple(group[name] for name in self._TABLE)

    def _check_seed(self, options: Dict[str, Any], where: str) -> None:
        if self._SEEDED and options["seed"] != self.defaults["seed"]:
            raise ValueError(f"{self._who}: seed is a setting of the whole optimizer (one stream of probes "
                             f"for all groups, as in C++); got {options['seed']}{where} but "
                             f"{self.defaults['seed']} for the optimizer")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group; its options (missing ones from the defaults) are checked first."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            _require_floating(self._who, self._NAME, index, group["params"], group)
            options = self._checked(group, f" (param group {index})")
            self._check_seed(options, f" (param group {index})")
            self._check_dtensors(index, group)
        except Exception:
            self.param_groups.pop()
            raise
        group.update(options)
        self._validated.append((self._values(group), options))

    def _check_dtensors(self, index: int, group: Dict[str, Any]) -> None:
        """ValueError naming the first DTensor parameter of the group lowbit cannot take (an
        unsupported placement: lowbit/_dtensor.py)."""
        found = _dtensor.first_unsupported(group["params"])
        if found:
            raise ValueError(f"{self._who}: {_describe(index, found[0], group['params'][found[0]], group)} {found[1]}")

    def _group_options(self, index: int, group: Dict[str, Any]) -> Dict[str, Any]:
        """A group's checked options, checked again when the group was edited (schedulers,
        users): a bad value raises before any group is stepped."""
        values = self._values(group)
        cached_values, options = self._validated[index]
        if options is not None and values == cached_values:
            return options
        where = f" (param group {index})"
        checked = self._checked(group, where)
        self._check_seed(checked, where)
        changed = [n for n in self._LAYOUT if options is not None and options[n] != checked[n]]
        if changed and any(self.state.get(p) for p in group["params"]):
            raise ValueError(f"{self._who}: cannot change {', '.join(changed)} of param group {index} after its "
                             "first step (they decide the layout of the state); make a new optimizer, or load "
                             "a state dict into one built with the new options")
        group.update(checked)
        self._validated[index] = (self._values(group), checked)
        return checked

    def _all_options(self) -> List[Dict[str, Any]]:
        return [self._group_options(i, g) for i, g in enumerate(self.param_groups)]

    # ------------------------------------------------------------------ gradients and state
    def _gradients(self, key: str = "") -> Optional[List[List[Tuple[torch.Tensor, torch.Tensor]]]]:
        """(parameter, gradient) of each group, every gradient checked (dense, floating, shaped
        and placed like its parameter, and the overflow rule: see :meth:`_accept`) before
        anything is written; None when the step is to be skipped (``skip_nonfinite``).
        An FSDP2 (DTensor) parameter comes as its local shard and gradient (lowbit/_dtensor.py);
        its state stays keyed by the parameter (:meth:`_key`). A shard without rows on this
        rank is checked (its norm is part of the sum) but not stepped."""
        work: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []
        checked: List[torch.Tensor] = []
        flat: List[torch.Tensor] = []
        self._where, self._keys = {}, {}
        for gi, group in enumerate(self.param_groups):
            items = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if _dtensor.is_dtensor(p):
                    problem = _dtensor.check_gradient(p, g)
                    if problem:
                        raise RuntimeError(f"{self._who}: {_describe(gi, pi, p, group)} {problem}")
                    owner, p, g = p, _dtensor.local(p), _dtensor.local(g)
                    self._keys[id(p)] = owner
                if g.layout != torch.strided:
                    raise RuntimeError(f"{self._who}: {_describe(gi, pi, p, group)} has a sparse gradient; "
                                       f"{self._NAME} needs dense gradients")
                if not g.is_floating_point():
                    raise RuntimeError(f"{self._who}: {_describe(gi, pi, p, group)} has a {g.dtype} gradient; "
                                       "expected a floating type")
                if g.shape != p.shape or g.device != p.device:
                    raise RuntimeError(f"{self._who}: {_describe(gi, pi, p, group)} on {p.device} has a gradient "
                                       f"of shape {list(g.shape)} on {g.device}")
                if p.numel() > 0:
                    items.append((p, g))
                checked.append(p)
                flat.append(g)
                self._where[id(p)] = (gi, pi)
            work.append(items)
        if not self._accept(checked, flat, key or self._OVERFLOW_KEY):
            return None
        return work

    def _key(self, p: torch.Tensor) -> torch.Tensor:
        """The parameter whose state ``p`` uses: p itself, or the FSDP2 parameter p is the
        local shard of (in this step)."""
        return self._keys.get(id(p), p)

    # ------------------------------------------------------------------ the overflow rule
    # docs/second_order.md: gradients and Hessian estimates of squared norm beyond 2^104 (or
    # NaN / Inf) are refused, and steps no bound guarantees (fp16 parameters, extreme options,
    # NAG-GS's state) are tried on copies first; nothing is written before every check passed.
    # The rule, its bounds and its messages are the C++ ones (optim/gradient_health.h).
    def _what(self, p: torch.Tensor) -> Tuple[int, str]:
        gi, pi = self._where[id(p)]
        group = self.param_groups[gi]
        return gi, _describe(gi, pi, group["params"][pi], group)

    def _refuse(self, group_index: int, problem: str) -> bool:
        """False (the step is skipped and counted) with the group's ``skip_nonfinite``; raises
        otherwise."""
        if self.param_groups[group_index]["skip_nonfinite"]:
            self.skipped_steps += 1
            return False
        raise RuntimeError(f"{self._who}: {problem}; nothing was updated (set skip_nonfinite=True to skip such "
                           "steps)")

    def _accept(self, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], key: str) -> bool:
        """The rule on ``tensors`` (gradients, or Hessian estimates, of ``params``): one batched
        fp64 squared norm each, read once. True when all pass. The norms of FSDP2 shards are
        summed over their ranks first: every rank judges the whole tensor, and all agree."""
        norms = _ops.squared_norms(list(tensors))
        keys = [self._key(p) for p in params]
        if any(_dtensor.is_sharded(k) for k in keys):
            norms = _dtensor.summed_over_shards(norms, keys, self._who)
        index, value = _ops.first_offence(norms)
        if index < 0:
            return True
        gi, what = self._what(params[index])
        return self._refuse(gi, _ops.offence_message(what, key, value))

    def _trial(self, p: torch.Tensor, writes: Sequence[Optional[torch.Tensor]], names: Sequence[str],
               run: Callable[[List[Optional[torch.Tensor]]], None]) -> bool:
        """``run`` (p's update) applied to copies of ``writes`` (what it writes in place); True when
        every copy stayed finite. Nothing of p or its state changes."""
        copies = [None if t is None else t.detach().to(p.device, copy=True) for t in writes]
        run(copies)
        checked = [(i, c) for i, c in enumerate(copies) if c is not None and c.is_floating_point()]
        index, _ = _ops.first_offence(_ops.squared_norms([c for _, c in checked]), math.inf)
        if index < 0:
            return True
        i, c = checked[index]
        gi, what = self._what(p)
        return self._refuse(gi, f"{what}: {_ops.overflow_problem(names[i], c.dtype)}")

    def _needs_trial(self, p: torch.Tensor, bounded: bool) -> bool:
        """fp16 parameters, and parameters whose options bound nothing (``bounded`` False)."""
        return p.dtype == torch.float16 or not bounded

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _trial_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """p's state for the checks before a step (bounds, trials on copies): the stored one, or
        a fresh one that is not kept."""
        return self.state.get(self._key(p)) or self._new_state(p, options)

    def _state_for(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """p's state, created on its first step, on p's device (it follows ``model.to(...)``)."""
        state = self.state.get(self._key(p))
        if not state:
            state = self.state[self._key(p)] = self._new_state(p, options)
        for name, t in state.items():
            if name not in _COUNTERS and t.device != p.device:
                state[name] = t.to(p.device)
        return state

    @staticmethod
    def _release_graphs(items: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> List[torch.Tensor]:
        """The gradients without their graph; a gradient from backward(create_graph=True) is
        replaced by its detached self, which frees the double-backward graph."""
        grads = []
        for p, g in items:
            if g.requires_grad:
                p.grad = g = g.detach()
            grads.append(g)
        return grads

    def _probe_generators(self) -> Callable[[torch.device], torch.Generator]:
        """Generators for the probes of this step: seeded from (seed, step) only, so a resumed
        run draws what an uninterrupted one would (the C++ seed function, probe_seed)."""
        seed = _ops.probe_seed(self.defaults["seed"], self._steps) & _UINT64
        generators: Dict[torch.device, torch.Generator] = {}

        def on(device: torch.device) -> torch.Generator:
            if device not in generators:
                g = torch.Generator(device=device)
                g.manual_seed((seed + len(generators)) & _UINT64)  # one stream per device
                generators[device] = g
            return generators[device]

        return on

    def _hutchinson(self, due: List[Tuple[torch.Tensor, torch.Tensor]], what: str,
                    closure: Optional[Callable[[], Any]]) -> List[torch.Tensor]:
        """z * (H z) for the (parameter, gradient) pairs due, one Rademacher probe each. H z
        comes from a second backward, or on FSDP2 models from one more call of ``closure``
        (a finite difference of gradients; lowbit/_fsdp_hessian.py)."""
        every = [p for group in self.param_groups for p in group["params"]]
        sharded = [p for p in every if _dtensor.is_dtensor(p)]
        if sharded:
            return self._hutchinson_by_differences(due, every, sharded[0].device_mesh.get_group(), closure)
        if not due:
            return []
        params = [p for p, _ in due]
        grads = [g for _, g in due]
        if not any(g.requires_grad for g in grads):
            raise RuntimeError(f"{self._who}: {what} needs gradients with a graph: the closure must compute the "
                               "loss and call loss.backward(create_graph=True) (then return the loss); "
                               "nothing was updated")
        on = self._probe_generators()
        z = [_rademacher_like(p.detach(), on(p.device)) for p in params]
        hz = hessian_vector_product(grads, params, z)
        return [zi * hi for zi, hi in zip(z, hz)]

    def _hutchinson_by_differences(self, due: List[Tuple[torch.Tensor, torch.Tensor]], every: List[torch.Tensor],
                                   group: Any, closure: Optional[Callable[[], Any]]) -> List[torch.Tensor]:
        """_hutchinson on an FSDP2 model: every rank takes part when any rank has a due shard."""
        if not _fsdp_hessian.anywhere(bool(due), group):
            return []
        assert closure is not None  # step() required it
        on = self._probe_generators()
        params = [p for p, _ in due]
        z = [_rademacher_like(p.detach(), on(p.device)) for p in params]
        hz = _fsdp_hessian.hessian_times_probe(params, [g for _, g in due], [self._key(p) for p in params], every,
                                               z, closure, group)
        return [zi * hi for zi, hi in zip(z, hz)]

    def _require_closure(self, closure: Optional[Callable[[], Any]], what: str) -> None:
        if closure is None:
            raise RuntimeError(f"{self._who}: {what} needs step(closure), a closure that computes the loss, calls "
                               "loss.backward(create_graph=True) and returns the loss: e.g.\n"
                               "    def closure():\n"
                               "        opt.zero_grad()\n"
                               "        loss = loss_fn(model(x), y)\n"
                               "        loss.backward(create_graph=True)\n"
                               "        return loss\n"
                               "    opt.step(closure)")

    @staticmethod
    def _evaluate(closure: Optional[Callable[[], Any]]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # ------------------------------------------------------------------ introspection
    def state_bytes(self) -> StateBytes:
        """Bytes of curvature state (``preconditioner``: Hessian estimates, M-FAC windows) and of
        first-order state (``first_order``: momentum, NAG-GS velocity)."""
        def size(state: Mapping, names: Sequence[str]) -> int:
            return sum(state[n].numel() * state[n].element_size() for n in names if n in state)
        pre = first = 0
        for state in self.state.values():
            pre += size(state, self._PRECONDITIONER)
            first += size(state, self._FIRST_ORDER)
        return StateBytes(pre, first)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> Dict[str, Any]:
        """torch's ``{"state": {index: {name: tensor}}, "param_groups": [...]}`` (plain tensors
        and numbers; the tensors are the live state, as in torch), plus ``"lowbit_steps"``
        (steps taken; the schedule of Hessian refreshes and the probes) for Sophia and
        AdaHessian."""
        live = self.state
        self.state = {k: (_dtensor.to_saved(k, v, _dtensor.ELEMENTWISE) if _dtensor.is_dtensor(k) else v)
                      for k, v in live.items()}  # type: ignore[assignment]
        try:
            sd = super().state_dict()
        finally:
            self.state = live
        if self._SEEDED:
            sd["lowbit_steps"] = self._steps
        return sd

    def _load_state(self, p: torch.Tensor, entries: Dict[str, torch.Tensor], options: Dict[str, Any],
                    what: str) -> Dict[str, torch.Tensor]:
        """Checked copies of a parameter's saved state on p's device; ValueError naming the entry."""
        allowed = ("step",) + self._REQUIRED + self._OPTIONAL
        unknown = sorted(set(entries) - set(allowed))
        if unknown:
            raise ValueError(f"{what} has unknown state {', '.join(unknown)} (a {self._NAME} state has "
                             f"{', '.join(allowed)})")
        state = {"step": _counter(entries, "step", what)}
        for name in self._REQUIRED + self._OPTIONAL:
            if name in entries:
                state[name] = _like(entries[name], p, name, what)
            elif name in self._REQUIRED:
                raise ValueError(f"{what} has no \"{name}\" state")
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`. Everything is checked first (group and parameter counts,
        every option, the layout options, every entry's name, dtype and shape); on a mismatch
        ``ValueError`` is raised and the optimizer is unchanged. Tensors are copied to their
        parameter's device (counters stay on the CPU)."""
        who = f"{self._who}.load_state_dict: "
        state_dict, groups, saved_groups, id_map = _matched_state_dict(self, state_dict, who)
        position = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}

        def failed(e: BaseException) -> ValueError:
            message = _message(e)
            if message.startswith(self._who + ": "):
                message = message[len(self._who) + 2:]
            return ValueError(who + message + "; nothing was loaded")

        new_groups, validated = [], []
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            for name in self._TABLE:
                sg.setdefault(name, g[name])
            try:
                options = self._checked(sg, f" (saved param group {gi})")
            except (TypeError, ValueError) as e:
                raise failed(e) from None
            differ = [n for n in self._LAYOUT if options[n] != g[n]]
            if differ:
                raise ValueError(who + f"the state dict's param group {gi} was saved with different "
                                 f"{', '.join(differ)} than this optimizer uses; nothing was loaded")
            sg.update(options)
            new_groups.append(sg)
            validated.append((self._values(sg), options))
        if self._SEEDED and len({sg["seed"] for sg in new_groups}) > 1:
            raise ValueError(who + "the state dict's param groups have different seeds "
                             f"({[sg['seed'] for sg in new_groups]}); nothing was loaded")

        new_state: Dict[Any, Any] = defaultdict(dict)
        for key, entries in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(who + f"the state dict has state for parameter {key!r}, which is in no param "
                                 "group; nothing was loaded")
            p = id_map[key]
            gi, pi = position[id(p)]
            what = _describe(gi, pi, p, groups[gi])
            _check_entries(entries, who, what)
            if not entries:
                continue
            if _dtensor.is_dtensor(p):  # FSDP2: this rank's shard of the state
                entries = _dtensor.from_saved(p, entries, who, what)
            else:
                _dtensor.refuse_rank_tags(entries, who, what)
            nonfinite = [k for k, v in entries.items()
                         if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
            if nonfinite:
                # No state of these optimizers holds NaN or Inf after a step (NaN/Inf gradients
                # are refused): a checkpoint that does is corrupt, and would make the parameters NaN.
                raise ValueError(who + f"{what}: state \"{nonfinite[0]}\" holds NaN or Inf; nothing was loaded")
            try:
                new_state[p] = self._load_state(_dtensor.local(p), dict(entries), validated[gi][1], what)
            except (RuntimeError, ValueError) as e:
                raise failed(e) from None

        steps = 0
        if self._SEEDED:
            steps = state_dict.get("lowbit_steps")
            if steps is None:  # a dict from elsewhere: every parameter stepped on every step
                steps = max((int(s["step"]) for s in new_state.values()), default=0)
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 0 <= steps < 2 ** 63:
                raise ValueError(who + f"lowbit_steps must be an int >= 0 (and < 2^63); got {steps!r}; nothing was "
                                 "loaded")

        self.state = new_state  # type: ignore[assignment]
        self.param_groups = new_groups
        self._validated = validated
        self._steps = int(steps)
        if self._SEEDED and new_groups:
            self.defaults["seed"] = new_groups[0]["seed"]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ pickling / deepcopy
    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_steps"] = self._steps
        state["skipped_steps"] = self.skipped_steps
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._steps = state.get("_steps", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self._where = {}
        self._validated = [((), None) for _ in self.param_groups]  # checked again at the next step


def _counter(entries: Mapping, name: str, what: str) -> torch.Tensor:
    """A saved counter (``step``, ``count``): a one-element tensor holding an int >= 0, as a
    0-d int64 CPU tensor."""
    t = entries.get(name)
    if t is None:
        raise ValueError(f"{what} has no \"{name}\" state")
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what}: state \"{name}\" must be a one-element tensor holding an int >= 0; got "
                         f"{t.dtype} of shape {list(t.shape)}")
    value = t.item()
    # NaN and Inf are no ints; a count beyond int64 would not fit the 0-d int64 state.
    if not math.isfinite(value) or value != int(value) or not 0 <= value < 2 ** 63:
        raise ValueError(f"{what}: state \"{name}\" must hold an int >= 0 (and < 2^63); got {value}")
    return torch.tensor(int(value), dtype=torch.int64)


def _like(t: torch.Tensor, p: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """A saved tensor shaped like p (floating), copied to p's device and dtype."""
    if not t.is_floating_point():
        raise ValueError(f"{what}: state \"{name}\" must be a floating tensor; got {t.dtype}")
    if t.shape != p.shape:
        raise ValueError(f"{what}: state \"{name}\" has shape {list(t.shape)} but the parameter has shape "
                         f"{list(p.shape)}")
    return t.to(device=p.device, dtype=p.dtype, copy=True)


def _zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def _step0() -> torch.Tensor:
    return torch.tensor(0, dtype=torch.int64)


def _option_table(name: str, table: Dict[str, _Option]) -> str:
    """The docstring table of the options."""
    rows = [(f"``{n}``", r.meaning, repr(r.default) if r.kind != "str" else f'``"{r.default}"``', r.allowed)
            for n, r in table.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in
              enumerate(("option", "meaning", "default", "allowed"))]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join(["    " + rule, "    " + line(("option", "meaning", "default", "allowed")), "    " + rule]
                     + ["    " + line(row) for row in rows] + ["    " + rule])


# ---------------------------------------------------------------------------- Sophia

class Sophia(_SecondOrderOptimizer):
    r"""Sophia (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", arXiv 2305.14342), as a ``torch.optim`` optimizer over the C++
    ``lowbit::Sophia`` rules.

    For each parameter with gradient ``g``::

        m = b1 m + (1 - b1) g
        every k steps: h = b2 h + (1 - b2) h_hat
        p = p - lr wd p;   p = p - lr clip(m / max(rho h, eps), 1)

    ``estimator="gnb"`` (default, Gauss-Newton-Bartlett): ``h_hat = B * g_hat * g_hat`` with
    ``g_hat`` the gradient of the loss on labels sampled from the model's own output
    distribution (mean over a batch of ``B``). :meth:`step` is first-order; every ``k``
    steps (:meth:`hessian_due`) the training loop computes ``g_hat`` into ``p.grad`` and calls
    :meth:`update_hessian` ``(B)``.

    ``estimator="hutchinson"``: ``h_hat = u * (H u)`` with a Rademacher ``u``; :meth:`step`
    needs a closure that calls ``loss.backward(create_graph=True)`` and returns the loss, on
    every step (the Hessian is refreshed on the due ones).

    Options:

{table}

    ``seed`` and the step count alone decide the probes, so a resumed run draws what an
    uninterrupted one would. Until the first Hessian refresh ``h = 0``, and the step is
    ``lr * sign(m)`` (the clip).

    Example (GNB)::

        opt = lowbit.Sophia(model.parameters(), lr=2e-4, rho=0.05, hessian_interval=10)
        for x, y in loader:
            if opt.hessian_due():                       # every k steps, from the first
                opt.zero_grad()
                logits = model(x)
                y_hat = torch.distributions.Categorical(logits=logits).sample()
                F.cross_entropy(logits, y_hat).backward()
                opt.update_hessian(batch_size=x.shape[0])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    """

    _NAME = "Sophia"
    _OVERFLOW_KEY = "sophia"
    _CPP = "sophia"
    _SEEDED = True
    _TABLE = {
        "lr": _Option(1e-4, "number", "learning rate", ">= 0"),
        "betas": _Option((0.965, 0.99), "number pair", "(b1: momentum, b2: Hessian EMA)", "each in [0, 1)"),
        "rho": _Option(0.04, "number", "gamma of the paper: scale of h in the clip", "> 0"),
        "eps": _Option(1e-12, "number", "floor of rho h", "> 0"),
        "weight_decay": _Option(0.1, "number", "decoupled weight decay", ">= 0"),
        "estimator": _Option("gnb", "str", "Hessian estimator", '``"gnb"``, ``"hutchinson"``'),
        "hessian_interval": _Option(10, "int", "k: Hessian refresh every k steps", ">= 1"),
        "seed": _Option(0, "int", "seed of the Hutchinson probes (whole optimizer)", ">= 0"),
        "skip_nonfinite": _Option(False, "bool", "skip (and count) a step that would overflow", "bool"),
    }
    _REQUIRED = ("exp_avg", "hessian")
    _PRECONDITIONER = ("hessian",)
    _FIRST_ORDER = ("exp_avg",)

    def __init__(self, params: ParamsT, lr: float = 1e-4, *, betas: Tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, eps: float = 1e-12, weight_decay: float = 0.1,
                 estimator: Literal["gnb", "hutchinson"] = "gnb", hessian_interval: int = 10,
                 seed: int = 0, skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay,
                                      estimator=estimator, hessian_interval=hessian_interval, seed=seed,
                                      skip_nonfinite=skip_nonfinite))

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return {"step": _step0(), "exp_avg": _zeros(p), "hessian": _zeros(p)}

    def _due(self, options: Dict[str, Any]) -> bool:
        return self._steps % options["hessian_interval"] == 0

    def hessian_due(self) -> bool:
        """Whether the coming :meth:`step` refreshes the Hessian (``"hutchinson"``), or, for
        ``"gnb"``, whether to call :meth:`update_hessian` before it: every ``hessian_interval``
        steps, starting with the first (for any group, when groups differ)."""
        return any(self._due(o) for o in self._all_options())

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One step. ``closure``: computes the loss, calls ``loss.backward(create_graph=True)``
        (``"hutchinson"``; required) or ``loss.backward()`` (``"gnb"``; optional), returns the loss.

        Gradients and this step's Hessian estimates are checked before anything is written
        (sparse, NaN/Inf, beyond the overflow rule, ... raise ``RuntimeError`` naming the
        parameter, or skip the step with ``skip_nonfinite``; parameters and state are unchanged)."""
        options = self._all_options()
        if any(o["estimator"] == "hutchinson" for o in options):
            self._require_closure(closure, 'estimator="hutchinson"')
        loss = self._evaluate(closure)
        work = self._gradients()
        if work is None:
            return loss
        refresh = [o["estimator"] == "hutchinson" and self._due(o) for o in options]
        due = [pg for items, r in zip(work, refresh) if r for pg in items]
        estimates = self._hutchinson(due, 'estimator="hutchinson"', closure)
        if due and not self._accept([p for p, _ in due], estimates, "sophia.hutchinson"):
            return loss
        estimate_of = {id(p): e for (p, _), e in zip(due, estimates)}
        with torch.no_grad():
            for items, o in zip(work, options):
                bounded = _ops.update_bounded("sophia", o)
                for p, g in items:
                    if not self._needs_trial(p, bounded):
                        continue
                    s = self._trial_state(p, o)
                    e, step = estimate_of.get(id(p)), s["step"].clone()

                    def run(c: List[Any], e: Any = e, g: torch.Tensor = g, o: Dict[str, Any] = o,
                            step: torch.Tensor = step) -> None:
                        if e is not None:
                            _ops.ema_([c[2]], [e], o["betas"][1])
                        _ops.sophia_update_([c[0]], [g.detach()], [c[1]], [c[2]], [step], o["lr"], o["betas"][0],
                                            o["rho"], o["eps"], o["weight_decay"])

                    if not self._trial(p, [p, s["exp_avg"], s["hessian"]], ("values", "exp_avg", "hessian"), run):
                        return loss
            k = 0
            for items, o, r in zip(work, options, refresh):
                if not items:
                    continue
                states = [self._state_for(p, o) for p, _ in items]
                if r:
                    _ops.ema_([s["hessian"] for s in states], estimates[k:k + len(items)], o["betas"][1])
                    k += len(items)
                grads = self._release_graphs(items)
                _ops.sophia_update_([p for p, _ in items], grads, [s["exp_avg"] for s in states],
                                    [s["hessian"] for s in states], [s["step"] for s in states], o["lr"],
                                    o["betas"][0], o["rho"], o["eps"], o["weight_decay"])
        self._steps += 1
        return loss

    def update_hessian(self, batch_size: int) -> None:
        """``"gnb"``: folds ``B * g * g`` into ``h`` (``h = b2 h + (1 - b2) B g g``), ``g`` being the
        gradient, now in each ``p.grad``, of the loss (mean over ``batch_size`` = ``B``
        examples) on labels sampled from the model's output distribution. Every group's
        Hessian is updated (call it when :meth:`hessian_due`). The gradients and the
        estimates ``B g g`` are checked first, as in :meth:`step`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"{self._who}.update_hessian: batch_size must be an int >= 1; got {batch_size!r}")
        options = self._all_options()
        for gi, o in enumerate(options):
            if o["estimator"] != "gnb":
                raise RuntimeError(f"{self._who}.update_hessian is the Gauss-Newton-Bartlett estimator; param group "
                                   f"{gi} has estimator=\"{o['estimator']}\", which refreshes inside step(closure)")
        work = self._gradients("sophia.gnb")
        if work is None:
            return
        with torch.no_grad():
            # B * g * g, the C++ estimate (Sophia::update_hessian, sophia_gnb_hessian_), checked
            # before it is folded in.
            estimates = [[g.detach() * g.detach() * float(batch_size) for _, g in items] for items in work]
            if not self._accept([p for items in work for p, _ in items], [e for es in estimates for e in es],
                                "sophia.gnb_estimate"):
                return
            for items, es, o in zip(work, estimates, options):
                for (p, _), e in zip(items, es):
                    if p.dtype != torch.float16:
                        continue
                    s = self._trial_state(p, o)

                    def run(c: List[Any], e: torch.Tensor = e, o: Dict[str, Any] = o) -> None:
                        _ops.ema_([c[0]], [e], o["betas"][1])

                    if not self._trial(p, [s["hessian"]], ("hessian",), run):
                        return
            for items, es, o in zip(work, estimates, options):
                if items:
                    states = [self._state_for(p, o) for p, _ in items]
                    _ops.ema_([s["hessian"] for s in states], es, o["betas"][1])


# ---------------------------------------------------------------------------- AdaHessian

class AdaHessian(_SecondOrderOptimizer):
    r"""AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning", arXiv 2006.00719), as a ``torch.optim`` optimizer over the C++
    ``lowbit::AdaHessian`` rules: Adam whose second moment is the squared Hutchinson
    estimate ``D`` of the Hessian diagonal, averaged over the spatial dimensions of 4-D
    convolution kernels::

        D = z * (H z)   (4-D kernels: mean of |D| over the kernel's height and width)
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) D^2
        p = p - lr (m / bc1 / ((sqrt(v) / sqrt(bc2))^k + eps) + wd p)    (k: hessian_power)

    :meth:`step` needs a closure that computes the loss, calls
    ``loss.backward(create_graph=True)`` and returns the loss. ``D`` is refreshed every
    ``hessian_interval`` steps and reused in between.

    Options:

{table}

    Example::

        opt = lowbit.AdaHessian(model.parameters(), lr=0.15)
        for x, y in loader:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward(create_graph=True)
                return loss
            opt.step(closure)
    """

    _NAME = "AdaHessian"
    _OVERFLOW_KEY = "adahessian"
    _CPP = "adahessian"
    _SEEDED = True
    _TABLE = {
        "lr": _Option(0.15, "number", "learning rate", ">= 0"),
        "betas": _Option((0.9, 0.999), "number pair", "(b1, b2)", "each in [0, 1)"),
        "eps": _Option(1e-4, "number", "epsilon", "> 0"),
        "weight_decay": _Option(0.0, "number", "decoupled weight decay", ">= 0"),
        "hessian_power": _Option(1.0, "number", "k: power of the denominator", "(0, 1]"),
        "hessian_interval": _Option(1, "int", "refresh D every this many steps", ">= 1"),
        "seed": _Option(0, "int", "seed of the Hutchinson probes (whole optimizer)", ">= 0"),
        "skip_nonfinite": _Option(False, "bool", "skip (and count) a step that would overflow", "bool"),
    }
    _REQUIRED = ("exp_avg", "exp_hessian_diag_sq")
    _OPTIONAL = ("hessian_diag",)
    _PRECONDITIONER = ("exp_hessian_diag_sq", "hessian_diag")
    _FIRST_ORDER = ("exp_avg",)

    def __init__(self, params: ParamsT, lr: float = 0.15, *, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0,
                 hessian_interval: int = 1, seed: int = 0, skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power, hessian_interval=hessian_interval, seed=seed,
                                      skip_nonfinite=skip_nonfinite))

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return {"step": _step0(), "exp_avg": _zeros(p), "exp_hessian_diag_sq": _zeros(p)}

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One step; ``closure`` (required) computes the loss, calls
        ``loss.backward(create_graph=True)`` and returns the loss. Gradients and this step's
        Hessian diagonals are checked before anything is written (``RuntimeError`` naming the
        parameter, or a skipped step with ``skip_nonfinite``; nothing changes)."""
        options = self._all_options()
        self._require_closure(closure, "step()")
        loss = self._evaluate(closure)
        work = self._gradients()
        if work is None:
            return loss
        due = [(p, g) for items, o in zip(work, options) for p, g in items
               if self._steps % o["hessian_interval"] == 0 or "hessian_diag" not in self.state.get(self._key(p), {})]
        estimates = self._hutchinson(due, "step()", closure)
        with torch.no_grad():
            diagonals = {p: _ops.adahessian_diagonal(e) for (p, _), e in zip(due, estimates)}
            if due and not self._accept([p for p, _ in due], [diagonals[p] for p, _ in due], "adahessian.hutchinson"):
                return loss
            for items, o in zip(work, options):
                bounded = _ops.update_bounded("adahessian", o)
                for p, g in items:
                    if not self._needs_trial(p, bounded):
                        continue
                    s = self._trial_state(p, o)
                    diagonal = diagonals[p] if p in diagonals else s["hessian_diag"]
                    step = s["step"].clone()

                    def run(c: List[Any], g: torch.Tensor = g, o: Dict[str, Any] = o, diagonal: Any = diagonal,
                            step: torch.Tensor = step) -> None:
                        _ops.adahessian_update_([c[0]], [g.detach()], [c[1]], [c[2]], [diagonal.to(c[0].device)],
                                                [step], o["lr"], o["betas"][0], o["betas"][1], o["eps"],
                                                o["weight_decay"], o["hessian_power"])

                    if not self._trial(p, [p, s["exp_avg"], s["exp_hessian_diag_sq"]],
                                       ("values", "exp_avg", "exp_hessian_diag_sq"), run):
                        return loss
            for items, o in zip(work, options):
                if not items:
                    continue
                states = [self._state_for(p, o) for p, _ in items]
                for (p, _), s in zip(items, states):
                    if p in diagonals:
                        s["hessian_diag"] = diagonals[p]
                grads = self._release_graphs(items)
                _ops.adahessian_update_([p for p, _ in items], grads, [s["exp_avg"] for s in states],
                                        [s["exp_hessian_diag_sq"] for s in states],
                                        [s["hessian_diag"] for s in states], [s["step"] for s in states],
                                        o["lr"], o["betas"][0], o["betas"][1], o["eps"], o["weight_decay"],
                                        o["hessian_power"])
        self._steps += 1
        return loss


# ---------------------------------------------------------------------------- M-FAC

class MFAC(_SecondOrderOptimizer):
    r"""M-FAC (Frantar et al., "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", arXiv 2107.03356), as a ``torch.optim`` optimizer over the C++
    ``lowbit::MFAC`` rules: SGD with momentum on the inverse empirical Fisher times the
    gradient, matrix-free, from a sliding window of the last ``m`` gradients of each parameter::

        F = lambda I + (1/n) sum_i g_i g_i^T          (n = gradients in the window, at most m)
        F^-1 v = (1/lambda) (v - G^T (n lambda I + G G^T)^-1 G v)      (Woodbury; G is n x d)
        each step: push g into the window; d = F^-1 g + wd p; buf = momentum buf + d; p -= lr buf

    The window can be stored at 8 or 4 bits with lowbit's block-wise codec (``bits=8`` or
    ``4``); the Fisher is then exactly that of the stored (dequantized) gradients, and the
    gradient it preconditions is the new one as stored (its rounding residual lies outside
    the window's span, where ``F^-1`` would multiply it by ``1/lambda``).

    Options:

{table}

    State per parameter: ``step``, ``count`` (gradients pushed; 0-d int64), ``rows`` (fp32,
    m x d) or ``codes`` (uint8) and ``scales`` (fp32), plus ``centroids`` (fp32, m x 16 x 2) with
    ``mapping="kashin"`` (each row is its own Kashin-coded [1, d] matrix, docs/codec.md), ``gram``
    (fp64 G G^T, m x m) and, with
    momentum, ``momentum_buffer``. The window costs ``m d`` floats (``bits=32``) or about
    ``m d bits / 8`` bytes plus scales: pick ``window`` for the parameter sizes at hand.
    """

    _NAME = "MFAC"
    _OVERFLOW_KEY = "mfac"
    _CPP = "mfac"
    _TABLE = {
        "lr": _Option(1e-3, "number", "learning rate", ">= 0"),
        "momentum": _Option(0.0, "number", "momentum", "[0, 1)"),
        "weight_decay": _Option(0.0, "number", "weight decay (coupled: added to d)", ">= 0"),
        "window": _Option(32, "int", "m: gradients in the window", ">= 1"),
        "damping": _Option(1e-3, "number", "lambda", "> 0"),
        "bits": _Option(32, "int", "window storage (32: fp32)", "32, 8, 4"),
        "mapping": _Option("dynamic", "str", "code map of a quantized window",
                           '``"linear2"``, ``"dynamic"``, ``"linear"``, ``"kashin"`` (4 bits)'),
        "quant_block_size": _Option(64, "int", "codec block size", "power of two, 16..4096"),
        "skip_nonfinite": _Option(False, "bool", "skip (and count) a step that would overflow", "bool"),
    }
    _LAYOUT = ("window", "bits", "mapping", "quant_block_size")
    _PRECONDITIONER = ("rows", "codes", "scales", "centroids", "gram")
    _FIRST_ORDER = ("momentum_buffer",)
    _WINDOW = ("rows", "codes", "scales", "centroids", "gram", "count")

    def __init__(self, params: ParamsT, lr: float = 1e-3, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 window: int = 32, damping: float = 1e-3, bits: Literal[32, 8, 4] = 32,
                 mapping: Literal["linear2", "dynamic", "linear", "kashin"] = "dynamic", quant_block_size: int = 64,
                 skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, window=window,
                                      damping=damping, bits=bits, mapping=mapping, quant_block_size=quant_block_size,
                                      skip_nonfinite=skip_nonfinite))

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        window = dict(_ops.mfac_window(p, options["window"], options["bits"], options["mapping"],
                                       options["quant_block_size"]))
        # The parameter's sizes: the window holds flattened gradients, so a checkpoint of a
        # parameter with the same element count but another shape must still be refused.
        return {"step": _step0(), "shape": torch.tensor(list(p.shape), dtype=torch.long), **window}

    def _load_state(self, p: torch.Tensor, entries: Dict[str, torch.Tensor], options: Dict[str, Any],
                    what: str) -> Dict[str, torch.Tensor]:
        unknown = sorted(set(entries) - set(self._WINDOW + ("step", "shape", "momentum_buffer")))
        if unknown:
            raise ValueError(f"{what} has unknown state {', '.join(unknown)} (an M-FAC state has step, shape, the "
                             "window's rows (bits=32) or codes and scales (bits=8, 4; and centroids with mapping "
                             "\"kashin\"), gram and count, and "
                             "momentum_buffer)")
        shape = entries.get("shape")
        if (shape is None or shape.dim() != 1 or shape.dtype != torch.long
                or shape.tolist() != list(p.shape)):
            raise ValueError(f"{what}: the M-FAC window was made for a parameter of shape "
                             f"{shape.tolist() if shape is not None else '(none)'} but the parameter has shape "
                             f"{list(p.shape)}")
        state = {"step": _counter(entries, "step", what), "count": _counter(entries, "count", what),
                 "shape": shape.clone()}
        window = {n: entries[n].to(device=p.device, copy=True) for n in self._WINDOW if n in entries and n != "count"}
        window["count"] = state["count"]
        _ops.mfac_check_window(p, window, options["window"], options["bits"], options["mapping"],
                               options["quant_block_size"], what)
        state.update(window)
        if "momentum_buffer" in entries:
            state["momentum_buffer"] = _like(entries["momentum_buffer"], p, "momentum_buffer", what)
        return state

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One step; ``closure`` (optional) computes the loss (``loss.backward()``) and returns it.
        Gradients are checked before anything is written (``RuntimeError`` naming the
        parameter, or a skipped step with ``skip_nonfinite``; nothing changes)."""
        options = self._all_options()
        loss = self._evaluate(closure)
        work = self._gradients()
        if work is None:
            return loss
        with torch.no_grad():
            for items, o in zip(work, options):
                bounded = _ops.update_bounded("mfac", o)
                for p, g in items:
                    if not self._needs_trial(p, bounded):
                        continue
                    s = self._trial_state(p, o)
                    buffer = s.get("momentum_buffer")
                    if o["momentum"] != 0 and buffer is None:
                        buffer = _zeros(p)
                    count, step = s["count"].clone(), s["step"].clone()

                    def run(c: List[Any], g: torch.Tensor = g, o: Dict[str, Any] = o, count: torch.Tensor = count,
                            step: torch.Tensor = step) -> None:
                        _ops.mfac_update_(c[0], g.detach(), *c[2:7], count, step, c[1], o["window"],
                                          o["bits"], o["mapping"], o["quant_block_size"], o["lr"], o["momentum"],
                                          o["weight_decay"], o["damping"])

                    if not self._trial(p, [p, buffer, s.get("rows"), s.get("codes"), s.get("scales"),
                                           s.get("centroids"), s["gram"]],
                                       ("values", "momentum_buffer", "window rows", "window codes", "window scales",
                                        "window centroids", "window Gram matrix"), run):
                        return loss
            for items, o in zip(work, options):
                for p, g in items:
                    s = self._state_for(p, o)
                    if o["momentum"] != 0 and "momentum_buffer" not in s:
                        # C++ clones the first direction d into the buffer; momentum * 0 + d = d.
                        s["momentum_buffer"] = _zeros(p)
                    _ops.mfac_update_(p, g.detach(), s.get("rows"), s.get("codes"), s.get("scales"),
                                      s.get("centroids"), s["gram"],
                                      s["count"], s["step"], s.get("momentum_buffer"), o["window"], o["bits"],
                                      o["mapping"], o["quant_block_size"], o["lr"], o["momentum"],
                                      o["weight_decay"], o["damping"])
        return loss


# ---------------------------------------------------------------------------- NAG-GS

class NagGS(_SecondOrderOptimizer):
    r"""NAG-GS (Leplat et al., "NAG-GS: Semi-Implicit, Accelerated and Robust Stochastic
    Optimizer", arXiv 2209.14937), as a ``torch.optim`` optimizer over the C++
    ``lowbit::NagGS`` rule: the semi-implicit Gauss-Seidel discretisation of an accelerated
    Nesterov-like SDE. With step ``alpha`` (``lr``), ``mu >= 0`` and ``gamma > 0`` (itself
    evolving), one step with the gradient ``g`` at ``x``::

        b = alpha mu / (alpha mu + gamma)
        v = (1 - b) v + b x - alpha / (alpha mu + gamma) g
        gamma = (gamma + alpha mu) / (1 + alpha)
        x = (1 - a) x + a v,   a = alpha / (1 + alpha)

    ``v`` starts at ``x``; ``gamma`` at the option's value (then per parameter, in the state).

    Options:

{table}
    """

    _NAME = "NagGS"
    _OVERFLOW_KEY = "nag_gs"
    _CPP = "nag_gs"
    _TABLE = {
        "lr": _Option(0.1, "number", "alpha: step size", "> 0"),
        "mu": _Option(1.0, "number", "mu: convexity parameter", ">= 0"),
        "gamma": _Option(1.0, "number", "gamma: initial value", "> 0"),
        "skip_nonfinite": _Option(False, "bool", "skip (and count) a step that would overflow", "bool"),
    }
    _REQUIRED = ("velocity",)
    _FIRST_ORDER = ("velocity",)

    def __init__(self, params: ParamsT, lr: float = 0.1, *, mu: float = 1.0, gamma: float = 1.0,
                 skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma, skip_nonfinite=skip_nonfinite))

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return {"step": _step0(), "gamma": torch.tensor(options["gamma"], dtype=torch.float64),
                "velocity": p.detach().clone()}

    def _load_state(self, p: torch.Tensor, entries: Dict[str, torch.Tensor], options: Dict[str, Any],
                    what: str) -> Dict[str, torch.Tensor]:
        gamma = entries.get("gamma")
        rest = {k: v for k, v in entries.items() if k != "gamma"}
        state = super()._load_state(p, rest, options, what)
        if gamma is None:
            raise ValueError(f"{what} has no \"gamma\" state")
        value = gamma.item() if gamma.numel() == 1 and gamma.is_floating_point() else None
        if value is None or not (value > 0 and value != float("inf")):
            raise ValueError(f"{what}: state \"gamma\" must be a one-element floating tensor, finite and > 0; got "
                             f"{value if value is not None else f'{gamma.dtype} of shape {list(gamma.shape)}'}")
        state["gamma"] = torch.tensor(value, dtype=torch.float64)
        return state

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One step; ``closure`` (optional) computes the loss (``loss.backward()``) and returns it.
        Gradients, and the velocity and parameter the step would make, are checked before
        anything is written (``RuntimeError`` naming the parameter, or a skipped step with
        ``skip_nonfinite``; nothing changes)."""
        options = self._all_options()
        loss = self._evaluate(closure)
        work = self._gradients()
        if work is None:
            return loss
        with torch.no_grad():
            for items, o in zip(work, options):
                if not items:
                    continue
                # NAG-GS's state is not bounded by the gradient: bounded from the largest
                # magnitudes (one read per group), else tried on copies.
                states = [self._trial_state(p, o) for p, _ in items]
                bounded = _ops.nag_gs_bounded([p for p, _ in items],
                                              [s["velocity"].to(p.device) for (p, _), s in zip(items, states)],
                                              [g for _, g in items], [s["gamma"] for s in states], o["lr"], o["mu"])
                for (p, g), s, ok in zip(items, states, bounded):
                    if ok:
                        continue
                    gamma, step = s["gamma"].clone(), s["step"].clone()

                    def run(c: List[Any], g: torch.Tensor = g, o: Dict[str, Any] = o, gamma: torch.Tensor = gamma,
                            step: torch.Tensor = step) -> None:
                        _ops.nag_gs_update_([c[0]], [g.detach()], [c[1]], [gamma], [step], o["lr"], o["mu"])

                    if not self._trial(p, [p, s["velocity"]], ("values", "velocity"), run):
                        return loss
            for items, o in zip(work, options):
                if items:
                    states = [self._state_for(p, o) for p, _ in items]
                    _ops.nag_gs_update_([p for p, _ in items], [g.detach() for _, g in items],
                                        [s["velocity"] for s in states], [s["gamma"] for s in states],
                                        [s["step"] for s in states], o["lr"], o["mu"])
        return loss


for _cls in (Sophia, AdaHessian, MFAC, NagGS):
    _cls.__doc__ = (_cls.__doc__ or "").replace("{table}", _option_table(_cls._NAME, _cls._TABLE))
del _cls
