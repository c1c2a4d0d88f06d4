"""lowbit.Shampoo: 4-bit Shampoo as a torch.optim optimizer, backed by the C++ core.

The algorithm lives in C++ only (``lowbit::shampoo_param_step`` and the preconditioners);
this module handles what a torch optimizer does in Python: parameter groups and their
options, gradient checks, state dicts of plain tensors.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from itertools import chain
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch.optim import Optimizer

from . import _dtensor, _fsdp_lossless
from ._library import load as _load_library

_load_library()

__all__ = ["Shampoo", "ShampooState", "StateBytes", "OPTION_DEFAULTS", "OPTION_TABLE"]

# name: (default, kind, paper symbol / meaning, allowed values). The same names,
# defaults and rules as lowbit::ShampooOptions (include/lowbit/shampoo.h); a test checks
# that the defaults agree with the C++ ones.
OPTION_TABLE: Dict[str, Tuple[Any, str, str, str]] = {
    "lr": (1e-3, "number", "learning rate", ">= 0"),
    "graft": ("adamw", "str", "first-order optimizer F", '"sgdm", "adamw"'),
    "momentum": (0.9, "number", "SGDM momentum", "[0, 1)"),
    "nesterov": (False, "bool", "Nesterov SGDM", "needs momentum > 0"),
    "betas": ((0.9, 0.999), "number pair", "AdamW (beta1, beta2)", "each in [0, 1)"),
    "eps": (1e-8, "number", "AdamW epsilon", "> 0"),
    "weight_decay": (0.0, "number", "weight decay (coupled L2 for SGDM, decoupled for AdamW)", ">= 0"),
    "bits": (4, "int", "bit width b (32 = 32-bit Shampoo)", "32, 8, 4, 3"),
    "quantize": ("eigenvectors", "str", "QM: what is quantized (U, A, or A's Cholesky factor)",
                 '"eigenvectors", "matrix", "cholesky"'),
    "error_feedback": (True, "bool", "cholesky: error feedback E of the Cholesky factors", "bool"),
    "error_feedback_decay": (0.0, "number", "cholesky: decay b_e of the error state E", "[0, 1)"),
    "mapping": ("linear2", "str", "quantization mapping", '"linear2", "dynamic", "linear", "kashin" (bits 4, 3)'),
    "quant_block_size": (64, "int", "block size B", "power of two, 16..4096"),
    "double_quant_scales": (False, "bool", "8-bit block scales (future work in the paper)", "bool"),
    "min_quant_numel": (4096, "int", "smallest quantized factor (elements)", ">= 0"),
    "max_preconditioner_dim": (1200, "int", "max order of a block", ">= 1"),
    "stat_decay": (0.95, "number", "beta", "[0, 1)"),
    "epsilon": (1e-6, "number", "epsilon (relative to lambda_max)", "> 0"),
    "stat_interval": (100, "int", "T1", ">= 1"),
    "root_interval": (500, "int", "T2", ">= 1"),
    "start_preconditioning_step": (1, "int", "first step that may use a root", ">= 0"),
    "rectify_steps": ((1, 4), "int pair", "(t1, t2) Bjorck steps", "each in [0, 100]"),
    "root_method": ("eigen", "str", "inverse root of 32-bit Shampoo", '"eigen", "newton"'),
    "eigen_update": ("qr", "str", "eigenbasis refresh of 4-bit Shampoo", '"qr", "cholesky_qr", "eigh"'),
    "root_storage": ("quantized", "str", "(lowbit) low-bit root: stored, or U diag U^T each step",
                     '"quantized", "eigen"'),
    "skip_nonfinite": (False, "bool", "(lowbit) skip steps that would overflow, not raise", "bool"),
    "preconditioner": ("shampoo", "str", "Shampoo, CASPR (Duvvuri et al.) or SOAP (Vyas et al.)",
                       '"shampoo", "caspr", "soap" (needs graft "adamw")'),
    "graft_bits": (32, "int", "bits of the AdamW moments (graft, or SOAP's Adam)",
                   '32, 8, 4 (8, 4: needs graft "adamw")'),
    "workspace_mb": (0.0, "number", "(lowbit, engine-wide) MiB of temporaries per batched pass",
                     "[0, 1e9]; 0: 64 on CPU, 1024 on GPU"),
    "gradient_check": ("auto", "str", "(lowbit, engine-wide) when gradients are checked",
                       '"auto", "immediate", "deferred"'),
}
OPTION_DEFAULTS: Dict[str, Any] = {name: row[0] for name, row in OPTION_TABLE.items()}
_NAMES: Tuple[str, ...] = tuple(OPTION_TABLE)
# Options that decide the layout of the state (a checkpoint must agree on them);
# error_feedback only with quantize "cholesky" (see _layout_differences).
_LAYOUT = ("graft", "bits", "quantize", "mapping", "quant_block_size", "double_quant_scales",
           "min_quant_numel", "max_preconditioner_dim", "preconditioner", "graft_bits", "error_feedback")

_ShampooConfig = torch.classes.lowbit.ShampooConfig
_ShampooParam = torch.classes.lowbit.ShampooParam
_squared_norms = torch.ops.lowbit.squared_norms.default
_first_offence = torch.ops.lowbit.first_offence.default
_ShampooEngine = torch.classes.lowbit.ShampooEngine

ParamsT = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, torch.Tensor]]]


def _matched_state_dict(optimizer: Optimizer, state_dict: Dict[str, Any], who: str
                        ) -> Tuple[Dict[str, Any], List[Dict[str, Any]], List[Dict[str, Any]], Dict[Any, Any]]:
    """The first checks of every lowbit ``load_state_dict``: runs the pre-hooks, checks the
    structure and that groups and their parameter counts match. Returns the state dict, this
    optimizer's groups, a copy of the saved groups and the map from saved parameter ids to
    this optimizer's parameters. Raises ``ValueError`` (prefixed with ``who``) before
    anything changed."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(who + f"expected a dict with 'state' and 'param_groups'; got a {type(state_dict).__name__}")
    state_dict = dict(state_dict)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(who + "expected a dict with 'state' and 'param_groups'")
    if not isinstance(state_dict["state"], Mapping):
        raise ValueError(who + f"'state' must map parameter ids to their state; got a "
                         f"{type(state_dict['state']).__name__}; nothing was loaded")
    if not isinstance(state_dict["param_groups"], (list, tuple)):
        raise ValueError(who + f"'param_groups' must be a list of dicts; got a "
                         f"{type(state_dict['param_groups']).__name__}; nothing was loaded")
    seen: Dict[Any, int] = {}
    for gi, sg in enumerate(state_dict["param_groups"]):
        if not isinstance(sg, Mapping) or not isinstance(sg.get("params"), (list, tuple)):
            raise ValueError(who + f"param group {gi} of the state dict must be a dict with a 'params' list of "
                             "parameter ids; nothing was loaded")
        for pid in sg["params"]:
            # Ints from state_dict(); parameter names (FQNs) from torch.distributed.checkpoint's
            # set_optimizer_state_dict, which maps positions the same way.
            if isinstance(pid, bool) or not isinstance(pid, (int, str)):
                raise ValueError(who + f"param group {gi} of the state dict lists {pid!r} as a parameter id; ids "
                                 "are ints (or parameter names); nothing was loaded")
            if pid in seen:
                raise ValueError(who + f"parameter id {pid} appears twice in the state dict's param groups ("
                                 f"{seen[pid]} and {gi}); nothing was loaded")
            seen[pid] = gi
    groups = optimizer.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise ValueError(who + f"the state dict has {len(saved_groups)} parameter groups; this optimizer "
                         f"has {len(groups)}; nothing was loaded")
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(who + f"param group {gi} of the state dict has {len(sg['params'])} parameters; "
                             f"this optimizer's has {len(g['params'])}; nothing was loaded")
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    return state_dict, groups, saved_groups, id_map


def _check_entries(entries: Any, who: str, what: str) -> None:
    """ValueError unless a parameter's saved state maps str names to tensors, naming the
    first entry that does not."""
    if not isinstance(entries, Mapping):
        raise ValueError(who + f"the state of {what} must map names to tensors; got a {type(entries).__name__}; "
                         "nothing was loaded")
    for k, v in entries.items():
        if not isinstance(k, str):
            raise ValueError(who + f"the state of {what} must map names to tensors; it has an entry named {k!r}; "
                             "nothing was loaded")
        if not isinstance(v, torch.Tensor):
            raise ValueError(who + f"the state of {what} must map names to tensors; entry \"{k}\" is a "
                             f"{type(v).__name__}; nothing was loaded")


class StateBytes(NamedTuple):
    """Bytes of optimizer state: Shampoo statistics, eigen-data and inverse roots
    (``preconditioner``) and momentum / Adam moments (``first_order``)."""

    preconditioner: int
    first_order: int

    @property
    def total(self) -> int:
        return self.preconditioner + self.first_order


def _normalize(name: str, value: Any, where: str) -> Any:
    """The option's value in its canonical Python type; TypeError naming it otherwise."""
    return _convert("lowbit.Shampoo", name, OPTION_TABLE[name][1], value, where)


def _convert(who: str, name: str, kind: str, value: Any, where: str) -> Any:
    """``value`` of option ``name`` as a ``kind`` ("number", "int", "bool", "str", "number
    pair", "int pair"); TypeError starting with ``who`` and naming the option otherwise."""

    def fail(expected: str) -> None:
        raise TypeError(f"{who}: {name} must be {expected}; got {value!r} "
                        f"({type(value).__name__}){where}")

    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            fail("a number")
        return float(v)

    def finite(v: float) -> float:
        # inf passes range checks like ">= 0" and NaN none; either turns the parameters into NaN.
        if not math.isfinite(v):
            raise ValueError(f"{who}: {name} must be a finite number; got {value!r}{where}")
        return v

    def integer(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            fail("an int")
        if not -2 ** 63 <= v < 2 ** 63:  # the C++ options hold int64
            raise ValueError(f"{who}: {name} must fit in an int64; got {value!r}{where}")
        return int(v)

    if kind == "number":
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            return finite(float(value.item()))
        return finite(number(value))
    if kind == "int":
        return integer(value)
    if kind == "bool":
        if not isinstance(value, bool):
            fail("a bool")
        return value
    if kind == "str":
        if not isinstance(value, str):
            fail("a str")
        return value
    # pairs
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        fail("a pair (a, b)")
    convert = (lambda v: finite(number(v))) if kind == "number pair" else integer
    return (convert(value[0]), convert(value[1]))


def _layout_differences(a: Mapping, b: Mapping) -> List[str]:
    """The options of ``_LAYOUT`` on which the normalized options ``a`` and ``b`` differ, as
    C++ ``structural_differences``: ``error_feedback`` only counts with quantize "cholesky"
    (it decides whether the error state is kept; other factors ignore it)."""
    return [n for n in _LAYOUT
            if a[n] != b[n] and (n != "error_feedback" or a["quantize"] == "cholesky")]


def _options_of(group: Dict[str, Any], defaults: Dict[str, Any]) -> Tuple[Any, ...]:
    return tuple(group.get(name, defaults.get(name, OPTION_DEFAULTS[name])) for name in _NAMES)


def _make_config(values: Tuple[Any, ...], where: str) -> Tuple[Dict[str, Any], Any]:
    """(normalized options, C++ ShampooConfig), or TypeError / ValueError naming the option."""
    options = {name: _normalize(name, v, where) for name, v in zip(_NAMES, values)}
    try:
        return options, _ShampooConfig(options)
    except RuntimeError as e:
        raise ValueError(f"{_message(e)}{where}") from None


def _make_sharding(group: Any, average_gradients: Any, timeout: Any) -> Any:
    """The C++ distributed step over ``group`` (a torch.distributed ProcessGroup), or None."""
    if not isinstance(average_gradients, bool):
        raise TypeError(f"lowbit.Shampoo: average_gradients must be a bool; got {type(average_gradients).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"lowbit.Shampoo: distributed_timeout must be a number of seconds > 0; got {timeout!r}")
    if group is None:
        if average_gradients:
            raise ValueError("lowbit.Shampoo: average_gradients needs a process_group")
        return None
    import torch.distributed as dist

    if not isinstance(group, dist.ProcessGroup):
        raise TypeError("lowbit.Shampoo: process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD); got {type(group).__name__}")
    return torch.classes.lowbit.ShampooSharding(group.boxed(), average_gradients, float(timeout))


def _describe(group_index: int, index: int, p: torch.Tensor, group: Optional[Dict[str, Any]] = None,
              shape: bool = True) -> str:
    """How messages name a parameter: by its name when the group has ``param_names``."""
    names = group.get("param_names") if group else None
    shape_text = f", shape {list(p.shape)}" if shape else ""
    if names and index < len(names):
        return f"parameter '{names[index]}' (index {index} of param group {group_index}{shape_text})"
    return f"parameter {index} of param group {group_index}" + (f" (shape {list(p.shape)})" if shape else "")


def _require_floating(who: str, name: str, index: int, params: Sequence[torch.Tensor],
                      group: Optional[Dict[str, Any]] = None) -> None:
    """TypeError unless every parameter of param group ``index`` is floating point."""
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"{who}: {_describe(index, i, p, group)} is a {p.dtype} tensor; "
                            f"{name} optimizes floating-point parameters")


def _message(e: BaseException) -> str:
    # The first line of a c10::Error is its message; further lines are C++ context.
    return str(e).split("\n", 1)[0]


class ShampooState(Mapping):
    """The live Shampoo state of one parameter (``optimizer.state[p]``).

    A read-only mapping from entry names to the tensors the C++ optimizer holds:
    ``step`` and ``root_updates`` (0-d int64), ``momentum_buffer`` (SGDM) or ``exp_avg`` /
    ``exp_avg_sq`` (AdamW; with ``graft_bits`` 8 or 4 and enough elements, uint8
    ``exp_avg_codes`` / ``exp_avg_sq_codes`` and fp32 ``exp_avg_scales`` /
    ``exp_avg_sq_scales`` instead), and ``preconditioner.*`` (statistics, eigenvectors as
    codes and scales, eigenvalues, inverse roots, Cholesky factors and their error states).
    ``optimizer.state_dict()`` holds the same entries as plain tensors.
    """

    __slots__ = ("_cpp",)

    def __init__(self, cpp: Any) -> None:
        self._cpp = cpp

    def _entries(self) -> Dict[str, torch.Tensor]:
        return dict(self._cpp.state_dict())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    @property
    def steps(self) -> int:
        """Steps taken by this parameter."""
        return int(self._cpp.steps())

    @property
    def root_updates(self) -> int:
        """Inverse-root refreshes applied so far."""
        return int(self._cpp.root_updates())

    @property
    def root_failures(self) -> int:
        """Failed decompositions that kept the last good root."""
        return int(self._cpp.root_failures())

    @property
    def preconditioned(self) -> bool:
        """Whether this parameter has a preconditioner (two or more non-unit dimensions)."""
        return bool(self._cpp.preconditioned())

    def state_bytes(self) -> StateBytes:
        return StateBytes(*self._cpp.state_bytes())

    def __repr__(self) -> str:
        b = self.state_bytes()
        return (f"ShampooState(steps={self.steps}, root_updates={self.root_updates}, "
                f"preconditioned={self.preconditioned}, preconditioner_bytes={b.preconditioner}, "
                f"first_order_bytes={b.first_order})")


class Shampoo(Optimizer):
    r"""Shampoo with 32-, 8-, 4- or 3-bit preconditioners (Wang et al., "4-bit Shampoo for
    Memory-Efficient Network Training", NeurIPS 2024), as a ``torch.optim`` optimizer.

    For every parameter with a gradient G (step k, from 1): every ``stat_interval`` (T1)
    steps ``L <- beta L + (1 - beta) G G^T`` and ``R <- beta R + (1 - beta) G^T G`` per
    block; every ``root_interval`` (T2) steps, once ``k >= start_preconditioning_step``, the
    inverse roots ``L^(-1/4)``, ``R^(-1/4)`` are recomputed; once a root exists the direction
    is ``L^(-1/4) G R^(-1/4)`` rescaled to the norm of G (grafting), before that G itself;
    the first-order rule ``graft`` (SGD with momentum, or AdamW) applies it. Parameters
    with fewer than two non-unit dimensions get the first-order rule alone. With
    preconditioning never started, the optimizer *is* ``torch.optim.SGD`` (momentum) or
    ``torch.optim.AdamW``, bit for bit.

    ``bits=4`` (default) is the paper's 4-bit Shampoo: eigenvectors stored block-wise at
    4 bits, eigenvalues in fp32. ``bits=32`` is 32-bit Shampoo; ``quantize="matrix"`` is
    the paper's naive 4-bit baseline.

    ``preconditioner="caspr"`` is CASPR (Duvvuri et al., ICLR 2024) on the same factors and
    storage: the roots are ``L~ = L^(-1/2)``, ``R~ = R^(-1/2)`` and the direction
    ``J = L~ G + G R~``, ``U = L~ J + J R~`` (then grafted like Shampoo's). With ``bits=4``
    it is the paper's 4-bit CASPR.

    ``quantize="cholesky"`` is Cholesky-quantized Shampoo (Li et al. 2024, arXiv 2412.10663):
    each factor ``L = C C^T`` is stored as its Cholesky factor C, the diagonal in fp32 and the
    strictly lower triangle at ``bits`` bits (inverse roots are kept as ``quantize="matrix"``
    keeps them). With ``error_feedback`` (default) the quantization error is kept, itself
    low-bit, and added back before the next quantization:
    ``E_k = b_e E_(k-1) + (1 - b_e) (C_k + E_(k-1) - D(Q(C_k + E_(k-1))))`` with
    ``b_e = error_feedback_decay`` (0: E is the last residual); ``error_feedback=False``
    saves that state. ``error_feedback`` decides the state layout.

    ``preconditioner="soap"`` is SOAP (Vyas et al. 2024): AdamW run in the eigenbases ``Q_L``,
    ``Q_R`` of L and R. Each statistics update (every ``stat_interval`` steps) refreshes a
    basis by one warm-started QR step (``Q <- qr(L Q).Q``; ``eigen_update="eigh"``: a full
    eigendecomposition); once roots are due (``start_preconditioning_step``,
    ``root_interval``) the bases are used: ``m`` is kept in the parameter's coordinates, ``v``
    in the rotated ones (``G' = Q_L^T G Q_R``, ``v = b2 v + (1 - b2) G'^2``) and the update is
    ``Q_L (Q_L^T m Q_R / (sqrt(v_hat) + eps)) Q_R^T``: no root, no grafting. It needs
    ``graft="adamw"`` (whose ``betas``, ``eps``, ``weight_decay`` it uses); before the first
    root update, and for parameters without a preconditioner, it is AdamW. Below 32 bits it
    needs ``quantize="eigenvectors"``: with ``bits=4`` the bases are 4-bit eigenvectors
    (4-bit SOAP).

    ``graft_bits=8`` or ``4`` stores the AdamW moments (of the graft, or SOAP's) block-wise
    as :class:`lowbit.AdamW` does (m: dynamic-tree map, v: a positive table; tensors with
    fewer than ``min_quant_numel`` elements keep fp32 moments); it needs ``graft="adamw"`` and
    decides the state layout. ``bits=4, graft_bits=4`` keeps every state low-bit.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or dicts defining parameter
            groups (each group may override any option below).

    Options (paper symbol, default, allowed values):

    ==============================  =======================================================  ==================  ==========================================
    option                          paper symbol / meaning                                   default             allowed
    ==============================  =======================================================  ==================  ==========================================
    ``lr``                          learning rate                                            1e-3                >= 0
    ``graft``                       first-order optimizer F                                  ``"adamw"``         ``"sgdm"``, ``"adamw"``
    ``momentum``                    SGDM momentum                                            0.9                 [0, 1)
    ``nesterov``                    Nesterov SGDM                                            False               needs momentum > 0
    ``betas``                       AdamW (beta1, beta2)                                     (0.9, 0.999)        each in [0, 1)
    ``eps``                         AdamW epsilon                                            1e-8                > 0
    ``weight_decay``                weight decay (coupled L2 for SGDM, decoupled for AdamW)  0.0                 >= 0
    ``bits``                        bit width b (32 = 32-bit Shampoo)                        4                   32, 8, 4, 3
    ``quantize``                    QM: what is quantized (U, A, or A's Cholesky factor)     ``"eigenvectors"``  ``"eigenvectors"``, ``"matrix"``, ``"cholesky"``
    ``error_feedback``              cholesky: error feedback E of the Cholesky factors       True                bool
    ``error_feedback_decay``        cholesky: decay b_e of the error state E                 0.0                 [0, 1)
    ``mapping``                     quantization mapping                                     ``"linear2"``       ``"linear2"``, ``"dynamic"``, ``"linear"``, ``"kashin"`` (bits 4, 3)
    ``quant_block_size``            block size B                                             64                  power of two, 16..4096
    ``double_quant_scales``         8-bit block scales (paper: future work)                  False               bool
    ``min_quant_numel``             smallest quantized factor (elements)                     4096                >= 0
    ``max_preconditioner_dim``      max order of a block                                     1200                >= 1
    ``stat_decay``                  beta                                                     0.95                [0, 1)
    ``epsilon``                     epsilon (relative to lambda_max)                         1e-6                > 0
    ``stat_interval``               T1                                                       100                 >= 1
    ``root_interval``               T2                                                       500                 >= 1
    ``start_preconditioning_step``  first step that may use a root                           1                   >= 0
    ``rectify_steps``               (t1, t2) Bjorck steps                                    (1, 4)              each in [0, 100]
    ``root_method``                 inverse root of 32-bit Shampoo                           ``"eigen"``         ``"eigen"``, ``"newton"``
    ``eigen_update``                eigenbasis refresh of 4-bit Shampoo                      ``"qr"``            ``"qr"`` (paper), ``"cholesky_qr"`` (its QR by CholeskyQR2), ``"eigh"``
    ``root_storage``                (lowbit) low-bit root: stored, or U diag U^T each step   ``"quantized"``     ``"quantized"`` (paper), ``"eigen"``
    ``skip_nonfinite``              (lowbit) skip steps that would overflow, not raise       False               bool
    ``preconditioner``              Shampoo, CASPR (Duvvuri et al.) or SOAP (Vyas et al.)    ``"shampoo"``       ``"shampoo"``, ``"caspr"``, ``"soap"`` (needs graft ``"adamw"``)
    ``graft_bits``                  bits of the AdamW moments (graft, or SOAP's Adam)        32                  32, 8, 4 (8, 4: needs graft ``"adamw"``)
    ``workspace_mb``                (lowbit, engine-wide) MiB of temporaries per batch       0.0                 [0, 1e9]; 0: 64 on CPU, 1024 on GPU
    ``gradient_check``              (lowbit, engine-wide) when gradients are checked         ``"auto"``          ``"auto"``, ``"immediate"``, ``"deferred"``
    ==============================  =======================================================  ==================  ==========================================

    Engine-wide options are read from the defaults (the constructor's arguments), not from
    param groups: every step is one batched computation over all groups. ``workspace_mb``
    caps the temporaries of one batched refresh or preconditioning pass (more factors per
    batch on a GPU is faster; on a CPU the buffers persist between steps, so resident memory
    follows the stored state). ``gradient_check="immediate"`` checks gradients before the
    step writes anything (one host read of their norms per step). ``"deferred"`` checks the
    steps that refresh no factor on the device: such a step with a NaN/Inf or overflowing
    gradient changes nothing (nor do the steps after it), and the ``RuntimeError`` comes
    from the next step that refreshes factors, or from ``state_dict()`` / ``settle()``, with
    parameters and state as they were before the bad step; a plain step then never waits
    for the GPU. ``"auto"`` is deferred when every parameter is on a GPU. Steps with
    ``skip_nonfinite``, fp16 parameters, extreme options, SOAP or distributed are always
    checked immediately. See docs/shampoo.md, "Execution".

    Distributed (keyword arguments, not per-group options): with ``process_group`` (a
    ``torch.distributed`` group, e.g. ``dist.group.WORLD``) the ranks share the matrix work:
    each factor due for a statistics or root update is updated by one rank (balanced by
    order^3) and broadcast in its stored, quantized form, so every rank keeps the same state
    and parameters stay bit-identical across ranks. Gradients must be equal on every rank:
    use DDP, or ``average_gradients=True`` to have the optimizer all-reduce them.
    ``distributed_timeout`` (seconds) bounds every collective: a rank that died or raised
    makes the others fail with a clear error instead of hanging. The state dict is the
    same on every rank and loads into any number of ranks (or none). See
    :meth:`communication` for the bytes exchanged.

    FSDP2 (``fully_shard``; DTensor parameters with Shard(0) on a 1-D mesh), without
    ``process_group``: with ``fsdp_mode="local"`` (default) each rank preconditions its
    local shard with state of its own; with ``fsdp_mode="lossless"`` one owner rank steps
    each whole parameter (gathered), exactly as a single process would, and broadcasts it
    back. See docs/distributed.md, "FSDP2".

    T1 = 100 / T2 = 500 suit runs of tens of thousands of steps; scale them down for short
    runs (e.g. 10 / 50) and check :meth:`root_updates`.

    Bad options raise ``TypeError`` (wrong type) or ``ValueError`` (bad value) naming the
    option, at construction, in :meth:`add_param_group`, and at the next :meth:`step` after
    a group was edited. A sparse gradient, and a step that would overflow, raise
    ``RuntimeError`` naming the parameter before anything changes (with
    ``skip_nonfinite=True`` the whole step is skipped and counted in :attr:`skipped_steps`).
    The overflow rule (docs/shampoo.md, Robustness): every gradient's squared norm, in fp64,
    must be finite and at most 2^104 (beyond it the G G^T statistics, or the graft's moments,
    could overflow fp32), and the steps of fp16 parameters (and of options that bound no
    update) are tried on a copy first and refused if it came out NaN or Inf.

    ``state_dict()`` holds only tensors and numbers (``torch.load(..., weights_only=True)``
    reads it, on any ``map_location``); :meth:`load_state_dict` checks every group, option
    and tensor before replacing anything. State tensors follow their parameter between
    devices. ``optimizer.state[p]`` is a :class:`ShampooState`.

    Example::

        opt = lowbit.Shampoo(model.parameters(), lr=1e-3, graft="adamw", bits=4,
                             stat_interval=10, root_interval=50)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        print(opt.state_bytes(), opt.root_updates())
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        *,
        graft: Literal["sgdm", "adamw"] = "adamw",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bits: Literal[32, 8, 4, 3] = 4,
        quantize: Literal["eigenvectors", "matrix", "cholesky"] = "eigenvectors",
        error_feedback: bool = True,
        error_feedback_decay: float = 0.0,
        mapping: Literal["linear2", "dynamic", "linear", "kashin"] = "linear2",
        quant_block_size: int = 64,
        double_quant_scales: bool = False,
        min_quant_numel: int = 4096,
        max_preconditioner_dim: int = 1200,
        stat_decay: float = 0.95,
        epsilon: float = 1e-6,
        stat_interval: int = 100,
        root_interval: int = 500,
        start_preconditioning_step: int = 1,
        rectify_steps: Tuple[int, int] = (1, 4),
        root_method: Literal["eigen", "newton"] = "eigen",
        eigen_update: Literal["qr", "cholesky_qr", "eigh"] = "qr",
        root_storage: Literal["quantized", "eigen"] = "quantized",
        skip_nonfinite: bool = False,
        preconditioner: Literal["shampoo", "caspr", "soap"] = "shampoo",
        graft_bits: Literal[32, 8, 4] = 32,
        workspace_mb: float = 0.0,
        gradient_check: Literal["auto", "immediate", "deferred"] = "auto",
        process_group: Optional[Any] = None,
        average_gradients: bool = False,
        distributed_timeout: float = 300.0,
        fsdp_mode: Literal["local", "lossless"] = "local",
    ) -> None:
        given = dict(
            lr=lr, graft=graft, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
            weight_decay=weight_decay, bits=bits, quantize=quantize, error_feedback=error_feedback,
            error_feedback_decay=error_feedback_decay, mapping=mapping,
            quant_block_size=quant_block_size, double_quant_scales=double_quant_scales,
            min_quant_numel=min_quant_numel, max_preconditioner_dim=max_preconditioner_dim,
            stat_decay=stat_decay, epsilon=epsilon, stat_interval=stat_interval,
            root_interval=root_interval, start_preconditioning_step=start_preconditioning_step,
            rectify_steps=rectify_steps, root_method=root_method, eigen_update=eigen_update,
            root_storage=root_storage, skip_nonfinite=skip_nonfinite, preconditioner=preconditioner, graft_bits=graft_bits,
            workspace_mb=workspace_mb, gradient_check=gradient_check,
        )
        defaults, _ = _make_config(tuple(given[n] for n in _NAMES), " (defaults)")
        # Per group: (option values the config was built from, C++ config, normalized options).
        self._configs: List[Tuple[Tuple[Any, ...], Optional[Any], Dict[str, Any]]] = []
        self.skipped_steps = 0
        self._sharding = _make_sharding(process_group, average_gradients, distributed_timeout)
        self._average_gradients = bool(average_gradients)
        if fsdp_mode not in ("local", "lossless"):
            raise ValueError(f'lowbit.Shampoo: fsdp_mode must be "local" or "lossless"; got {fsdp_mode!r}')
        self._fsdp_mode = fsdp_mode
        self._fsdp_bytes = 0  # lossless mode: bytes this rank gathered and broadcast
        super().__init__(params, defaults)
        self._engine = self._make_engine()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group; its options (missing ones from the defaults) are validated first."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            _require_floating("lowbit.Shampoo", "Shampoo", index, group["params"])
            self._check_dtensors(index, group)
            values = _options_of(group, self.defaults)
            options, config = _make_config(values, f" (param group {index})")
        except Exception:
            self.param_groups.pop()
            raise
        group.update(options)
        self._configs.append((_options_of(group, self.defaults), config, options))

    def _check_dtensors(self, index: int, group: Dict[str, Any]) -> None:
        """ValueError naming the first DTensor parameter lowbit cannot take (lowbit/_dtensor.py)."""
        params = group["params"]
        found = _dtensor.first_unsupported(params)
        if found:
            raise ValueError(f"lowbit.Shampoo: {self._describe(index, found[0], params[found[0]], group)} {found[1]}")
        if getattr(self, "_sharding", None) is not None and _dtensor.any_dtensor(params):
            pi = next(i for i, p in enumerate(params) if _dtensor.is_dtensor(p))
            raise ValueError(f"lowbit.Shampoo: {self._describe(index, pi, params[pi], group)} is a DTensor (FSDP2), "
                             "and process_group shares Shampoo's work for replicated parameters (DDP); FSDP2 "
                             "parameters are preconditioned on their local shards without it: drop process_group")

    def _config(self, index: int, group: Dict[str, Any]) -> Any:
        """The C++ config of a group, rebuilt (and validated) when its options changed."""
        values = _options_of(group, self.defaults)
        cached_values, config, cached = self._configs[index]
        if config is None or values != cached_values:
            options, config = _make_config(values, f" (param group {index})")
            changed = _layout_differences(cached, options) if cached else []
            if changed and any(isinstance(self.state.get(p), ShampooState) for p in group["params"]):
                raise ValueError(f"lowbit.Shampoo: cannot change {', '.join(changed)} of param group {index} "
                                 "after its first step (they decide the layout of the state); make a new "
                                 "optimizer, or load a state dict into one built with the new options")
            self._configs[index] = (values, config, options)
        return config

    _describe = staticmethod(_describe)

    # ------------------------------------------------------------------ step
    def _make_engine(self) -> Any:
        """The C++ engine that batches each step over every group and keeps its workspace,
        set up with the engine-wide options of the defaults."""
        engine = _ShampooEngine()
        engine.configure(float(self.defaults.get("workspace_mb", 0.0)))
        return engine

    def _state_of(self, key: torch.Tensor, p: torch.Tensor, config: Any) -> ShampooState:
        """The state of parameter ``key``, whose local tensor is ``p`` (the same but for a
        DTensor, whose local shard it is)."""
        s = self.state.get(key)
        if isinstance(s, ShampooState):
            return s
        self.state[key] = wrapped = ShampooState(self._cpp_state(key, p, config, s))
        return wrapped

    @staticmethod
    def _cpp_state(key: torch.Tensor, p: torch.Tensor, config: Any, plain: Any) -> Any:
        """A C++ state for ``p``: fresh, or from ``plain`` entries (an unpickled or deep-copied
        optimizer; for a DTensor ``key``, in their state-dict form)."""
        cpp = _ShampooParam(p, config)
        if plain:
            if _dtensor.is_dtensor(key):
                plain = _dtensor.from_saved(key, plain, "lowbit.Shampoo: ", "a parameter")
            cpp.load_state_dict(p, {k: v.to(p.device) for k, v in plain.items()}, "lowbit.Shampoo: ", "a parameter")
        return cpp

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Optional[Any]:  # type: ignore[override]
        """One optimizer step. ``closure`` (optional) re-evaluates the model and returns the loss.

        Every gradient is checked before anything is written: a sparse or misshapen gradient,
        or a step that would overflow (a gradient's squared norm NaN, Inf or above 2^104; an
        fp16 step that would leave NaN or Inf) raises ``RuntimeError`` naming the parameter
        (the overflow: unless ``skip_nonfinite``, which skips the whole step), and the
        parameters and state are left as they were. (The C++ step runs without autograd; no
        ``torch.no_grad`` needed.)
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        grads: List[torch.Tensor] = []
        where: List[Tuple[int, int]] = []
        for gi, group in enumerate(self.param_groups):
            config = self._config(gi, group)
            keys, ps, gs = [], [], []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                key = p
                if _dtensor.is_dtensor(p):  # FSDP2: the local shard is this rank's parameter
                    problem = _dtensor.check_gradient(p, g)
                    if problem:
                        raise RuntimeError(f"lowbit.Shampoo: {self._describe(gi, pi, p, group)} {problem}")
                    p, g = _dtensor.local(p), _dtensor.local(g)  # (may have no rows on this rank)
                if g.is_sparse:
                    raise RuntimeError(f"lowbit.Shampoo: {self._describe(gi, pi, p, group)} has a sparse "
                                       "gradient; Shampoo needs dense gradients")
                if not g.is_floating_point():
                    raise RuntimeError(f"lowbit.Shampoo: {self._describe(gi, pi, p, group)} has a {g.dtype} "
                                       "gradient; expected a floating type")
                if g.shape != p.shape or g.device != p.device:
                    raise RuntimeError(f"lowbit.Shampoo: {self._describe(gi, pi, p, group)} on {p.device} has "
                                       f"a gradient of shape {list(g.shape)} on {g.device}")
                keys.append(key)
                ps.append(p)
                gs.append(g)
                where.append((gi, pi))
            if ps:
                work.append((gi, config, keys, ps, gs))
            grads.extend(gs)

        if self._sharding is not None and self._average_gradients:
            self._sharding.average(grads)  # equal gradients on every rank, so equal decisions below
        keys = [key for _, _, ks, _, _ in work for key in ks]
        if self._sharding is None and not any(map(_dtensor.is_sharded, keys)) and self._step_deferred(work, where):
            return loss
        self._engine.settle()  # the verdict of earlier deferred steps, before this one writes
        params = [p for _, _, _, ps, _ in work for p in ps]
        if not self._accepts(keys, params, grads, where):
            return loss

        # States first (a parameter's first step creates one), then one step of every parameter
        # (sharded: every rank calls it, with or without gradients; FSDP2: the local shards
        # that have rows, or in lossless mode the whole parameters this rank owns).
        rows, whole, max_dims = [], [], []
        for gi, config, group_keys, ps, gs in work:
            for key, p, g in zip(group_keys, ps, gs):
                if self._lossless(key):
                    whole.append((config, key))
                    max_dims.append(int(self._configs[gi][2]["max_preconditioner_dim"]))
                elif p.numel() > 0:
                    rows.append((config, self._state_of(key, p, config)._cpp, p, g))
        gathered = _fsdp_lossless.gather(whole, max_dims)
        for g in gathered:
            self._fsdp_bytes += 2 * g.full.numel() * g.full.element_size()
            if _fsdp_lossless.is_mine(g):
                rows.append((g.config, self._state_of(g.key, g.full, g.config)._cpp, g.full, g.grad))
        configs, states, params, grads = ([row[k] for row in rows] for k in range(4))
        (self._sharding if self._sharding is not None else self._engine).step(configs, states, params, grads)
        self._fsdp_bytes += _fsdp_lossless.scatter_back(gathered)
        return loss

    def _lossless(self, key: torch.Tensor) -> bool:
        """Whether ``key`` is stepped whole by its owner rank (``fsdp_mode="lossless"``)."""
        return self._fsdp_mode == "lossless" and _dtensor.is_sharded(key)

    def _step_deferred(self, work: List, where: List[Tuple[int, int]]) -> bool:
        """A step checked on the device (``gradient_check``; docs/shampoo.md, "Execution"):
        True when it was taken that way, False when it is to be checked now (a first step,
        a factor refresh, fp16, skip_nonfinite, extreme options or SOAP; the C++ engine
        decides)."""
        mode = self.defaults.get("gradient_check", "auto")
        if mode == "immediate" or not work:
            return False
        configs, states, params, grads = [], [], [], []
        for _, config, keys, ps, gs in work:
            for key, p, g in zip(keys, ps, gs):
                state = self.state.get(key)
                if not isinstance(state, ShampooState):
                    return False
                configs.append(config)
                states.append(state._cpp)
                params.append(p)
                grads.append(g)
        return self._engine.step_deferred(configs, states, params, grads, [gi for gi, _ in where],
                                          [pi for _, pi in where], mode)

    def settle(self) -> None:
        """Reads the verdict of the steps checked on the device (``gradient_check="deferred"``,
        or ``"auto"`` on a GPU) and raises ``RuntimeError`` naming the parameter if one had a
        NaN/Inf or overflowing gradient; parameters and state are then as they were before
        that step. The next step that refreshes factors and :meth:`state_dict` call it too."""
        self._engine.settle()

    def _accepts(self, keys: List[torch.Tensor], params: List[torch.Tensor], grads: List[torch.Tensor],
                 where: List[Tuple[int, int]]) -> bool:
        """The overflow rule (docs/shampoo.md, Robustness), before anything is written: every
        gradient's squared norm (fp64, one batched computation, read once) at most 2^104 and
        finite, then the steps no bound guarantees (fp16 parameters, extreme options) tried on
        copies. True when the step may go on; False when it is skipped (``skip_nonfinite`` of the
        offending parameter's group; counted); raises ``RuntimeError`` otherwise.
        ``params`` and ``grads`` are the local tensors of parameters ``keys`` (an FSDP2
        parameter's shard); the squared norms of sharded ones are summed over their ranks
        first, so that every rank judges the whole gradient and all reach the same verdict."""
        norms = _squared_norms(grads)
        if any(map(_dtensor.is_sharded, keys)):
            norms = _dtensor.summed_over_shards(norms, keys, "lowbit.Shampoo")
        index, value = _first_offence(norms)
        if index >= 0:
            gi, pi = where[index]
            group = self.param_groups[gi]
            described = self._describe(gi, pi, group["params"][pi], group)
            key = self._configs[gi][1].overflow_key(params[index])
            return self._refuse(gi, torch.ops.lowbit.offence_message(described, key, value))
        bounded: Dict[int, bool] = {}
        for (gi, pi), key, p, g in zip(where, keys, params, grads):
            config = self._configs[gi][1]
            if gi not in bounded:
                bounded[gi] = config.update_bounded()
            group = self.param_groups[gi]
            if (p.dtype != torch.float16 and bounded[gi]) or p.numel() == 0:
                continue
            if self._lossless(key):  # the trial would run on the owner alone: ranks could disagree
                raise RuntimeError(f"lowbit.Shampoo: {self._describe(gi, pi, key, group)}: fsdp_mode=\"lossless\" "
                                   "needs options that bound the update (see update_bounded in docs/shampoo.md) "
                                   "and no fp16 parameters; use the default fsdp_mode=\"local\"; nothing was "
                                   "updated")
            state = self.state.get(key)
            # No state yet (or plain entries): a temporary one, not kept.
            cpp = state._cpp if isinstance(state, ShampooState) else self._cpp_state(key, p, config, state)
            problem = cpp.trial_step(p, g, config)
            if problem:
                return self._refuse(gi, f"{self._describe(gi, pi, key, group)}: {problem}")
        return True

    def _refuse(self, group_index: int, problem: str) -> bool:
        if self.param_groups[group_index]["skip_nonfinite"]:
            self.skipped_steps += 1
            return False
        raise RuntimeError(f"lowbit.Shampoo: {problem}; nothing was updated (set skip_nonfinite=True to skip such "
                           "steps)")

    # ------------------------------------------------------------------ distributed
    def communication(self) -> Dict[str, int]:
        """This rank's traffic in distributed mode: ``exchanges`` (steps that exchanged
        updated preconditioner factors), ``state_bytes`` (factor state broadcast, summed over
        all owners), ``gradient_bytes`` (gradients all-reduced); all zero otherwise. Without
        ``process_group`` also ``fsdp_bytes``: FSDP2 lossless mode's whole parameters and
        gradients gathered and parameters broadcast, as bytes of the whole tensors."""
        if self._sharding is None:
            return {"exchanges": 0, "state_bytes": 0, "gradient_bytes": 0, "fsdp_bytes": self._fsdp_bytes}
        exchanges, state_bytes, gradient_bytes = self._sharding.traffic()
        return {"exchanges": exchanges, "state_bytes": state_bytes, "gradient_bytes": gradient_bytes}

    # ------------------------------------------------------------------ introspection
    def _states(self) -> Iterator[ShampooState]:
        return (s for s in self.state.values() if isinstance(s, ShampooState))

    def state_bytes(self) -> StateBytes:
        """Bytes of preconditioner state and of first-order state (momentum / Adam moments)."""
        pre = first = 0
        for s in self._states():
            b = s.state_bytes()
            pre += b.preconditioner
            first += b.first_order
        return StateBytes(pre, first)

    def root_updates(self) -> int:
        """The largest number of inverse-root refreshes of any parameter (0: Shampoo never
        preconditioned, the run was its first-order rule alone)."""
        return max((s.root_updates for s in self._states()), default=0)

    def root_failures(self) -> int:
        """Failed decompositions (each kept its last good root), over all parameters."""
        return sum(s.root_failures for s in self._states())

    # ------------------------------------------------------------------ state dicts
    def _plain_state(self) -> Dict[Any, Any]:
        plain: Dict[Any, Any] = defaultdict(dict)
        for key, s in self.state.items():
            if not isinstance(s, ShampooState):
                plain[key] = s
            elif _dtensor.is_dtensor(key):  # FSDP2: moments as DTensors, blocks per rank (lossless:
                # the whole parameter's state, on its owner)
                plain[key] = _dtensor.to_saved(key, dict(s._cpp.state_dict()),
                                               () if self._lossless(key) else _dtensor.ELEMENTWISE)
            else:
                plain[key] = dict(s._cpp.state_dict())
        # An FSDP2 parameter whose state is on another rank (lossless mode) or that has no
        # rows here: an empty entry, which set_optimizer_state_dict requires of every parameter.
        for group in self.param_groups:
            for p in group["params"]:
                if _dtensor.is_dtensor(p) and p not in plain:
                    plain[p] = {}
        return plain

    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {index: {name: tensor}}, "param_groups": [...]}`` of plain tensors and
        numbers. Like torch's optimizers, the tensors are the live state (copy them, or save
        the dict, before stepping again if you need a snapshot). Settles deferred gradient
        checks first (:meth:`settle`)."""
        self._engine.settle()
        live = self.state
        self.state = self._plain_state()  # type: ignore[assignment]
        try:
            return super().state_dict()
        finally:
            self.state = live

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`. Everything is checked first (group and parameter
        counts, every option, the options that decide the state layout against this
        optimizer's, every tensor's name, shape and dtype); on any mismatch ``ValueError``
        is raised and the optimizer is unchanged. Tensors are copied to their parameter's
        device."""
        who = "lowbit.Shampoo.load_state_dict: "
        state_dict, groups, saved_groups, id_map = _matched_state_dict(self, state_dict, who)
        position = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}

        new_groups, configs = [], []
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            sg.setdefault("preconditioner", "shampoo")  # state dicts from before CASPR
            sg.setdefault("graft_bits", 32)  # ... and from before low-bit AdamW moments (fp32 ones)
            for name in _NAMES:
                sg.setdefault(name, g[name])
            options, config = _make_config(_options_of(sg, self.defaults), f" (saved param group {gi})")
            differ = _layout_differences(options, g)
            if differ:
                raise ValueError(who + f"the state dict's param group {gi} was saved with different "
                                 f"{', '.join(differ)} than this optimizer uses; nothing was loaded")
            sg.update(options)
            new_groups.append(sg)
            configs.append((_options_of(sg, self.defaults), config, options))

        new_state: Dict[Any, Any] = defaultdict(dict)
        for key, entries in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(who + f"the state dict has state for parameter {key!r}, which is in no "
                                 "param group; nothing was loaded")
            p = id_map[key]
            gi, pi = position[id(p)]
            what = self._describe(gi, pi, p, groups[gi], shape=False)
            _check_entries(entries, who, what)
            if not entries:
                continue
            if _dtensor.is_dtensor(p):
                entries = _dtensor.from_saved(p, entries, who, what)
            else:
                _dtensor.refuse_rank_tags(entries, who, what)
            local = _dtensor.local(p)
            if self._lossless(p):  # the state of the whole parameter (this rank owns it)
                local = torch.empty(p.shape, dtype=p.dtype, device=local.device)
            elif local.numel() == 0:  # an FSDP2 parameter with no rows on this rank has no state
                continue
            cpp = _ShampooParam(local, configs[gi][1])
            try:
                cpp.load_state_dict(local, {k: v.to(device=local.device, copy=True) for k, v in entries.items()},
                                    who, what)
            except RuntimeError as e:
                message = _message(e)
                raise ValueError(message if "nothing was loaded" in message else message + "; nothing was loaded") \
                    from None
            new_state[p] = ShampooState(cpp)

        self._engine.discard_deferred()  # the deferred steps of the state replaced are moot
        self.state = new_state  # type: ignore[assignment]
        self.param_groups = new_groups
        self._configs = configs
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ pickling / deepcopy
    def __getstate__(self) -> Dict[str, Any]:
        self._engine.settle()
        state = super().__getstate__()
        state["state"] = self._plain_state()
        state["_configs"] = None  # C++ objects are rebuilt from the plain state
        state["_sharding"] = None  # a process group does not travel; the copy is not distributed
        state["_engine"] = None  # a fresh engine (its workspace is scratch) is made on arrival
        state["skipped_steps"] = self.skipped_steps
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.__dict__.setdefault("_sharding", None)
        self.__dict__.setdefault("_average_gradients", False)
        self.__dict__.setdefault("_fsdp_mode", "local")
        self.__dict__.setdefault("_fsdp_bytes", 0)
        self._engine = self._make_engine()
        # Configs are rebuilt (and validated) at the next step.
        self._configs = [((), None, {}) for _ in self.param_groups]
