"""8- and 4-bit AdamW as a ``torch.optim`` optimizer over the C++ rule of ``lowbit::AdamW``
(``src/optim/adamw_rule.cpp``), reached as the in-place op ``torch.ops.lowbit.adamw_update_``.
State is plain tensors in ``optimizer.state[p]``; options are validated by the C++
``AdamWOptions::validate``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import torch

from ._library import load as _load_library

_load_library()

from .optim import ParamsT, StateBytes, _convert, _message  # noqa: E402
from .second_order import _counter, _Option, _option_table, _SecondOrderOptimizer, _step0  # noqa: E402

__all__ = ["AdamW"]

_ops = torch.ops.lowbit
# In the order of adamw_update_'s arguments; exp_avg_centroids only with mapping "kashin".
_MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales",
            "exp_avg_centroids")


class AdamW(_SecondOrderOptimizer):
    r"""AdamW (decoupled weight decay, bias correction; the arithmetic of ``torch.optim.AdamW``)
    whose two moments are stored at 8 or 4 bits, block-wise, per parameter (flattened)::

        m, v = decode(stored m), decode(stored v)
        p *= 1 - lr wd
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        stored m, v = encode(m), encode(v)          (nearest code times the block's absmax)

    ``m`` uses a signed table (``mapping``: ``"dynamic"`` tree or ``"linear2"``), or at 4 bits
    ``"kashin"`` (docs/codec.md: the flattened moment as one Kashin-coded matrix, with 16 2-D
    centroids fitted per moment and step; nearest rounding only); ``v`` uses a
    table WITHOUT zero (``second_moment_mapping``; ``"auto"``: ``"dynamic"`` at 8 bits,
    ``"linear"`` = (k + 1) / 2^bits at 4 bits), so a small positive ``v`` never decodes to 0
    (Li et al.'s zero-point problem, where ``m / (sqrt(v) + eps)`` explodes); all-zero blocks
    stay exactly zero. ``block_size=0`` means 256 at 8 bits and 128 at 4 bits. Tensors with
    fewer than ``min_quant_numel`` elements keep fp32 moments; ``bits=32`` is plain AdamW.
    ``rounding="stochastic"`` re-encodes with unbiased stochastic rounding, its random numbers
    a function of (``seed``, the parameter's position over all groups, step, moment,
    element), as in C++; at 4 bits it keeps the momentum from sticking to a code.

    Options:

{table}

    State per parameter: ``step`` (0-d int64); fp32 ``exp_avg``/``exp_avg_sq`` shaped like the
    parameter, or uint8 ``exp_avg_codes``/``exp_avg_sq_codes`` and fp32
    ``exp_avg_scales``/``exp_avg_sq_scales`` of the flattened moments plus ``shape`` (int64), and
    with ``mapping="kashin"`` fp32 ``exp_avg_centroids`` [16, 2].
    Bytes of a quantized parameter of n elements: ``2 (ceil(n bits / 8) + 4 ceil(n / block))``
    (fp32: ``8 n``); see :meth:`state_bytes`.
    """

    _NAME = "AdamW"
    _OVERFLOW_KEY = "adamw"
    _TABLE = {
        "lr": _Option(1e-3, "number", "learning rate", ">= 0"),
        "betas": _Option((0.9, 0.999), "number pair", "(b1, b2)", "each in [0, 1)"),
        "eps": _Option(1e-8, "number", "epsilon", "> 0"),
        "weight_decay": _Option(1e-2, "number", "decoupled weight decay", ">= 0"),
        "bits": _Option(8, "int", "moment storage (32: fp32)", "32, 8, 4"),
        "mapping": _Option("dynamic", "str", "code map of m (signed)",
                           '``"dynamic"``, ``"linear2"``, ``"kashin"`` (4 bits)'),
        "second_moment_mapping": _Option("auto", "str", "code map of v (no zero)",
                                         '``"auto"``, ``"linear"``, ``"dynamic"``, ``"linear2"``'),
        "block_size": _Option(0, "int", "codec block (0: 256 at 8 bits, 128 at 4)", "0 or power of two, 16..4096"),
        "min_quant_numel": _Option(4096, "int", "smaller tensors keep fp32 moments", ">= 0"),
        "rounding": _Option("nearest", "str", "re-encoding of the moments", '``"nearest"``, ``"stochastic"``'),
        "seed": _Option(0, "int", "stochastic rounding's random numbers", ">= 0"),
        "skip_nonfinite": _Option(False, "bool", "skip (and count) a step that would overflow", "bool"),
    }
    _LAYOUT = ("bits", "mapping", "second_moment_mapping", "block_size", "min_quant_numel")
    _FIRST_ORDER = _MOMENTS

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, bits: Literal[32, 8, 4] = 8,
                 mapping: Literal["dynamic", "linear2", "kashin"] = "dynamic",
                 second_moment_mapping: Literal["auto", "linear", "dynamic", "linear2"] = "auto",
                 block_size: int = 0, min_quant_numel: int = 4096,
                 rounding: Literal["nearest", "stochastic"] = "nearest", seed: int = 0,
                 skip_nonfinite: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits,
                                      mapping=mapping, second_moment_mapping=second_moment_mapping,
                                      block_size=block_size, min_quant_numel=min_quant_numel,
                                      rounding=rounding, seed=seed, skip_nonfinite=skip_nonfinite))

    def _checked(self, values: Any, where: str) -> Dict[str, Any]:
        converted = {name: _convert(self._who, name, row.kind, values[name], where)
                     for name, row in self._TABLE.items()}
        try:
            return dict(_ops.adamw_options(converted))
        except RuntimeError as e:
            raise ValueError(_message(e) + where) from None

    @staticmethod
    def _layout_args(o: Dict[str, Any]) -> Tuple[Any, ...]:
        return (o["bits"], o["mapping"], o["second_moment_mapping"], o["block_size"], o["min_quant_numel"])

    def _new_state(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        moments = dict(_ops.adamw_state(p.detach(), *self._layout_args(options)))
        state = {"step": _step0(), **moments}
        if "exp_avg_codes" in moments:
            # Flattened moments: a checkpoint of a same-sized parameter of another shape is refused.
            state["shape"] = torch.tensor(list(p.shape), dtype=torch.long)
        return state

    def _load_state(self, p: torch.Tensor, entries: Dict[str, torch.Tensor], options: Dict[str, Any],
                    what: str) -> Dict[str, torch.Tensor]:
        unknown = sorted(set(entries) - set(_MOMENTS + ("step", "shape")))
        if unknown:
            raise ValueError(f"{what} has unknown state {', '.join(unknown)} (an AdamW state has step, exp_avg and "
                             "exp_avg_sq (fp32), or exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, "
                             "exp_avg_sq_scales and shape (8 or 4 bits), plus exp_avg_centroids with mapping "
                             "\"kashin\")")
        state = {"step": _counter(entries, "step", what)}
        moments = {n: entries[n].to(device=p.device, copy=True) for n in _MOMENTS if n in entries}
        _ops.adamw_check_state(p.detach(), moments, *self._layout_args(options), what)
        state.update(moments)
        if "exp_avg_codes" in moments:
            shape = entries.get("shape")
            if shape is None or shape.dim() != 1 or shape.dtype != torch.long or shape.tolist() != list(p.shape):
                raise ValueError(f"{what}: the AdamW moments were made for a parameter of shape "
                                 f"{shape.tolist() if shape is not None else '(none)'} but the parameter has shape "
                                 f"{list(p.shape)}")
            state["shape"] = shape.clone()
        return state

    def _state_for(self, p: torch.Tensor, options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        state = super()._state_for(p, options)
        if "shape" in state and state["shape"].device.type != "cpu":
            state["shape"] = state["shape"].cpu()
        return state

    def state_bytes(self) -> StateBytes:
        """Bytes of the moments (``first_order``; ``preconditioner`` is 0): fp32 moments, or
        codes and block scales (``step`` and ``shape`` are not counted)."""
        return super().state_bytes()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One step; ``closure`` (optional) computes the loss (``loss.backward()``) and returns it.
        Gradients are checked before anything is written (``RuntimeError`` naming the
        parameter, or a skipped step with ``skip_nonfinite``; nothing changes): NaN/Inf, and the
        overflow rule (squared norm at most 2^104, fp16 steps tried on copies first)."""
        options = self._all_options()
        loss = self._evaluate(closure)
        work = self._gradients()
        if work is None:
            return loss
        # The parameter's position over all groups: stochastic rounding's stream (as in C++).
        position = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        with torch.no_grad():
            for items, o in zip(work, options):
                bounded = _ops.update_bounded("adamw", o)
                for p, g in items:
                    if not self._needs_trial(p, bounded):
                        continue
                    s = self._trial_state(p, o)
                    step = s["step"].clone()

                    def run(c: List[Any], p: torch.Tensor = p, g: torch.Tensor = g, o: Dict[str, Any] = o,
                            step: torch.Tensor = step) -> None:
                        _ops.adamw_update_(c[0], g.detach(), *c[1:], step, o["lr"], o["betas"][0], o["betas"][1],
                                           o["eps"], o["weight_decay"], *self._layout_args(o), o["rounding"],
                                           o["seed"], position[id(self._key(p))])

                    if not self._trial(p, [p, *(s.get(n) for n in _MOMENTS)], ("values",) + _MOMENTS, run):
                        return loss
            for items, o in zip(work, options):
                for p, g in items:
                    s = self._state_for(p, o)
                    _ops.adamw_update_(p, g.detach(), *(s.get(n) for n in _MOMENTS), s["step"], o["lr"],
                                       o["betas"][0], o["betas"][1], o["eps"], o["weight_decay"],
                                       *self._layout_args(o), o["rounding"], o["seed"], position[id(self._key(p))])
        return loss


AdamW.__doc__ = (AdamW.__doc__ or "").replace("{table}", _option_table(AdamW._NAME, AdamW._TABLE))
