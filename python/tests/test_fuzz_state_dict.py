"""Property-based tests of load_state_dict for every Python optimizer (lowbit.Shampoo in its
variants, lowbit.AdamW, Sophia, AdaHessian, MFAC, NagGS) with hypothesis.

A valid state dict, saved after a few steps, is mutated: entries removed, parameter ids
reordered, tensors of another dtype or shape, extra and missing entries, groups and keys,
values that are not tensors, NaN / Inf in state tensors, bad option values in the param
groups; directly or through torch.save / torch.load(weights_only=True); and saved files
truncated or with bytes overwritten. Loading it into an optimizer that has state of its own
must either

- raise ValueError / TypeError naming what is wrong, and leave the optimizer as it was:
  its state dict unchanged and its next steps bit-identical to those of an untouched twin;
- or succeed, and the next step gives finite parameters.
"""

from __future__ import annotations

import copy
import io
import re
from typing import Any, Callable, Dict, List

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit
from fuzz_support import assert_names_one_of, count, fuzz_settings

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

# A matrix, a conv kernel (3 x 8 for Shampoo), a vector and a tensor with unit dimensions.
SHAPES = [(6, 5), (3, 2, 2, 2), (5,), (1, 7, 1)]


def two_groups(params, lr2, **options):
    return [dict(params=params[:2]), dict(params=params[2:], lr=lr2)]


def shampoo(**kw) -> Callable[[List[torch.Tensor]], Any]:
    options = dict(stat_interval=1, root_interval=2, min_quant_numel=0, epsilon=1e-4)
    options.update(kw)
    return lambda ps: lowbit.Shampoo(two_groups(ps, 0.02), lr=0.01, **options)


CONFIGS: Dict[str, Callable[[List[torch.Tensor]], Any]] = {
    "shampoo32-sgdm": shampoo(bits=32, graft="sgdm"),
    "shampoo4-adamw": shampoo(bits=4),
    "shampoo8-matrix-nesterov": shampoo(bits=8, quantize="matrix", graft="sgdm", nesterov=True),
    "shampoo4-cholesky": shampoo(bits=4, quantize="cholesky"),
    "shampoo4-cholesky-noef-adamw4": shampoo(bits=4, quantize="cholesky", error_feedback=False, graft_bits=4),
    "caspr4-sgdm": shampoo(bits=4, preconditioner="caspr", graft="sgdm"),
    "soap32": shampoo(bits=32, preconditioner="soap"),
    "soap4-adamw4": shampoo(bits=4, preconditioner="soap", graft_bits=4),
    "shampoo4-dq-adamw8": shampoo(bits=4, graft_bits=8, double_quant_scales=True, mapping="dynamic",
                                  quant_block_size=16),
    "shampoo3-eigh-blocks": shampoo(bits=3, eigen_update="eigh", max_preconditioner_dim=4),
    "shampoo4-eigen-form-caspr": shampoo(bits=4, root_storage="eigen", preconditioner="caspr"),
    "adamw32": lambda ps: lowbit.AdamW(two_groups(ps, 0.02), lr=0.01, bits=32),
    "adamw8": lambda ps: lowbit.AdamW(two_groups(ps, 0.02), lr=0.01, bits=8, min_quant_numel=0, block_size=16),
    "adamw4-stochastic": lambda ps: lowbit.AdamW(two_groups(ps, 0.02), lr=0.01, bits=4, min_quant_numel=0,
                                                 block_size=16, rounding="stochastic", seed=3),
    "sophia-gnb": lambda ps: lowbit.Sophia(two_groups(ps, 0.02), lr=0.01, hessian_interval=2),
    "sophia-hutchinson": lambda ps: lowbit.Sophia(two_groups(ps, 0.02), lr=0.01, estimator="hutchinson",
                                                  hessian_interval=2, seed=5),
    "adahessian": lambda ps: lowbit.AdaHessian(two_groups(ps, 0.02), lr=0.05, hessian_interval=2, seed=3),
    "mfac32": lambda ps: lowbit.MFAC(two_groups(ps, 0.02), lr=0.01, momentum=0.5, window=3),
    "mfac8": lambda ps: lowbit.MFAC(two_groups(ps, 0.02), lr=0.01, window=3, bits=8, quant_block_size=16),
    "mfac4": lambda ps: lowbit.MFAC(two_groups(ps, 0.02), lr=0.01, momentum=0.9, window=3, bits=4,
                                    quant_block_size=16, weight_decay=0.01),
    "naggs": lambda ps: lowbit.NagGS(two_groups(ps, 0.05), lr=0.1, mu=0.5),
}


def make_params(seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_(True) for s in SHAPES]


def loss_of(params, t: int) -> torch.Tensor:
    """A smooth loss of every parameter, different at every step t."""
    g = torch.Generator().manual_seed(1000 + t)
    total = torch.zeros(())
    for p in params:
        a = torch.rand(p.shape, generator=g) + 0.5
        b = torch.randn(p.shape, generator=g)
        total = total + ((a * p + b) ** 2).sum() + 0.1 * torch.cos(p).sum()
    return total


def train(opt, params, steps: int, start: int) -> None:
    for t in range(start, start + steps):
        groups = opt.param_groups
        if isinstance(opt, lowbit.Sophia) and any(g["estimator"] == "gnb" for g in groups) and opt.hessian_due():
            opt.zero_grad()
            loss_of(params, t).backward()
            opt.update_hessian(4)
        graph = isinstance(opt, lowbit.AdaHessian) or (
            isinstance(opt, lowbit.Sophia) and any(g["estimator"] == "hutchinson" for g in groups))

        def closure():
            opt.zero_grad()
            loss = loss_of(params, t)
            loss.backward(create_graph=graph)
            return loss

        opt.step(closure)


def save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


_SOURCES: Dict[str, bytes] = {}


def source(name: str) -> Dict[str, Any]:
    """A fresh copy of the valid state dict of `name` after three steps."""
    if name not in _SOURCES:
        params = make_params(1)
        opt = CONFIGS[name](params)
        train(opt, params, 3, 0)
        _SOURCES[name] = save(opt.state_dict())
    return load(_SOURCES[name])


def target(name: str):
    """An optimizer with one step of state of its own (which a failed load must keep), and
    an untouched twin of it."""
    params = make_params(2)
    opt = CONFIGS[name](params)
    train(opt, params, 1, 10)
    twin, twin_params = copy.deepcopy((opt, params))
    return opt, params, twin, twin_params


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key != "state":
            assert sa[key] == sb[key], key
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        ea, eb = sa["state"][k], sb["state"][k]
        assert ea.keys() == eb.keys(), k
        for n in ea:
            assert ea[n].dtype == eb[n].dtype and torch.equal(ea[n], eb[n]), (k, n)


# ---------------------------------------------------------------- mutations

_GENERIC = {"preconditioner", "left", "right"}


def entry_tokens(key: Any) -> List[str]:
    """Ways a message may name the state entry `key`: itself, and every run of its dotted
    parts (a preconditioner's messages drop the "preconditioner." prefix and speak of
    "block0.left.eigenvectors_t." or "eigenvalues"), except lone generic parts."""
    key = str(key)
    parts = key.split(".")
    out = {key}
    for i in range(len(parts)):
        for j in range(i + 1, len(parts) + 1):
            sub = ".".join(parts[i:j])
            if j - i == 1 and (sub in _GENERIC or re.fullmatch(r"block\d+", sub) or not sub):
                continue
            out.add(sub)
    return sorted(out)


BAD_OPTION_VALUES = [-1, -0.5, float("nan"), float("inf"), float("-inf"), "x", None, [1, 2, 3], True, 0, 0.0,
                     2 ** 70, 3, (0.5, 2.0)]
NON_TENSORS = [3, 2.5, "x", None, [1, 2], {"a": 1}, True]
DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.bool,
          torch.complex64]
EXTRA_ENTRIES = ["exp_avg_typo", "extra", "momentum_buffer", "exp_avg", "hessian_diag", "velocity", "rows",
                 "preconditioner.block0.left.bogus", "preconditioner.block9.left.statistic", "soap_v_start"]


def param_state(sd, d):
    """A (param id, its state) drawn from the state dict, or None when it holds none."""
    state = sd.get("state")
    if not isinstance(state, dict) or not state:
        return None
    pid = d.draw(st.sampled_from(sorted(state, key=repr)))
    entries = state[pid]
    return (pid, entries) if isinstance(entries, dict) and entries else None


def tensor_entry(sd, d, floating=False):
    found = param_state(sd, d)
    if found is None:
        return None
    pid, entries = found
    names = sorted(n for n, v in entries.items()
                   if isinstance(v, torch.Tensor) and (not floating or (v.is_floating_point() and v.numel())))
    if not names:
        return None
    name = d.draw(st.sampled_from(names))
    return pid, entries, name


def reshaped(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "flatten":
        return t.reshape(-1)
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous()
    if how == "drop" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:-1].clone()
    if how == "extend" and t.dim() >= 1:
        return torch.cat([t, t[:1]])
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "scalar":
        return t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros((), dtype=t.dtype)
    return torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else torch.zeros(3, dtype=t.dtype)


def mutate(sd: Dict[str, Any], d, options: List[str]) -> List[str]:
    """Applies one drawn mutation to `sd` in place; returns what an error may name
    (empty: the mutation leaves a loadable state dict)."""
    kind = d.draw(st.sampled_from(["remove entries", "remove a state", "remove a key", "remove an option",
                                   "reorder ids", "relabel states", "dtype", "shape", "extra entry", "extra state",
                                   "extra group", "extra key", "not a tensor", "not a dict", "nan", "option",
                                   "bad ids"]))
    groups = sd.get("param_groups")
    group = d.draw(st.sampled_from(groups)) if isinstance(groups, list) and groups and all(
        isinstance(g, dict) for g in groups) else None
    if kind == "remove entries":
        found = param_state(sd, d)
        if found is None:
            return []
        _, entries = found
        removed = d.draw(st.lists(st.sampled_from(sorted(entries)), min_size=1, max_size=len(entries), unique=True))
        for name in removed:
            del entries[name]
        return [t for name in removed for t in entry_tokens(name)]
    if kind == "remove a state":
        if isinstance(sd.get("state"), dict) and sd["state"]:
            del sd["state"][d.draw(st.sampled_from(sorted(sd["state"], key=repr)))]
        return []
    if kind == "remove a key":
        if not sd:
            return []
        key = d.draw(st.sampled_from(sorted(sd)))
        del sd[key]
        return [] if key == "lowbit_steps" else ["state", "param_groups"]
    if kind == "remove an option":
        if group is None:
            return []
        if not group:
            return []
        key = d.draw(st.sampled_from(sorted(group)))
        del group[key]
        return ["params", "param group"] if key == "params" else []
    if kind in ("reorder ids", "relabel states"):
        if group is None or not isinstance(sd.get("state"), dict) or not all(
                isinstance(g.get("params"), list) for g in groups):
            return []
        ids = [pid for g in groups for pid in g.get("params", [])]
        permuted = d.draw(st.permutations(ids))
        if kind == "reorder ids":
            it = iter(permuted)
            for g in groups:
                g["params"] = [next(it) for _ in g.get("params", [])]
        else:
            relabel = dict(zip(ids, permuted))
            sd["state"] = {relabel.get(k, k): v for k, v in sd["state"].items()}
        return ["shape", "matrix", "twice"]
    if kind == "dtype":
        found = tensor_entry(sd, d)
        if found is None:
            return []
        pid, entries, name = found
        dtype = d.draw(st.sampled_from([t for t in DTYPES if t != entries[name].dtype]))
        entries[name] = entries[name].to(dtype) if dtype != torch.bool else entries[name] != 0
        return entry_tokens(name)
    if kind == "shape":
        found = tensor_entry(sd, d)
        if found is None:
            return []
        pid, entries, name = found
        how = d.draw(st.sampled_from(["flatten", "transpose", "drop", "extend", "unsqueeze", "scalar", "longer"]))
        entries[name] = reshaped(entries[name], how)
        return entry_tokens(name)
    if kind == "extra entry":
        found = param_state(sd, d)
        if found is None:
            return []
        _, entries = found
        name = d.draw(st.sampled_from(EXTRA_ENTRIES))
        like = next(iter(entries.values()))
        shape = d.draw(st.sampled_from([tuple(like.shape), (3,), (), (6, 5)]))
        entries[name] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        return entry_tokens(name)
    if kind == "extra state":
        if isinstance(sd.get("state"), dict):
            pid = d.draw(st.sampled_from([99, -1, 4, "0"]))
            sd["state"][pid] = {"step": torch.tensor(1)}
            return [repr(pid), "in no param group"]
        return []
    if kind == "extra group":
        if group is None:
            return []
        groups.append(dict(group, params=d.draw(st.sampled_from([[], [99]]))))
        return ["parameter groups", "param groups"]
    if kind == "extra key":
        target = group if group is not None and d.draw(st.booleans()) else sd
        target[d.draw(st.sampled_from(["foo", "lowbit_extra"]))] = d.draw(st.sampled_from([1, "x", None]))
        return []
    if kind == "not a tensor":
        found = tensor_entry(sd, d)
        if found is None:
            return []
        pid, entries, name = found
        entries[name] = d.draw(st.sampled_from(NON_TENSORS))
        return entry_tokens(name)
    if kind == "not a dict":
        where = d.draw(st.sampled_from(["state", "param_groups", "a state", "a group", "params"]))
        value = d.draw(st.sampled_from([[], {}, 3, None, "x"]))
        if where in ("state", "param_groups"):
            sd[where] = value
            return [where, "parameter groups"]
        if where == "a state":
            found = param_state(sd, d)
            if found is None:
                return []
            sd["state"][found[0]] = value if value != {} else []
            return ["must map names to tensors"]
        if group is None:
            return []
        if where == "a group":
            groups[groups.index(group)] = value if value != {} else []
            return ["param group", "params"]
        group["params"] = value if value != [] else {}
        return ["params", "param group"]
    if kind == "nan":
        found = tensor_entry(sd, d, floating=True)
        if found is None:
            return []
        pid, entries, name = found
        t = entries[name].clone()
        t.view(-1)[d.draw(st.integers(0, t.numel() - 1))] = d.draw(st.sampled_from([float("nan"), float("inf"),
                                                                                     float("-inf")]))
        entries[name] = t
        return entry_tokens(name)
    if kind == "option":
        if group is None:
            return []
        name = d.draw(st.sampled_from(options))
        group[name] = d.draw(st.sampled_from(BAD_OPTION_VALUES))
        return [name]
    # "bad ids"
    if group is None or not isinstance(group.get("params"), list) or not group["params"]:
        return []
    i = d.draw(st.integers(1, len(group["params"]))) % len(group["params"])
    if i == 0 and len(group["params"]) == 1:
        return []
    group["params"][i] = d.draw(st.sampled_from([group["params"][i - 1], "0", 1.0, None, [0]]))
    # (A str id is a parameter name, as set_optimizer_state_dict passes: then the state of
    # the id it replaced belongs to no group.)
    return ["parameter id", "twice", "in no param group"]


def option_names(opt) -> List[str]:
    return sorted(lowbit.OPTION_DEFAULTS) if isinstance(opt, lowbit.Shampoo) else sorted(opt._TABLE)


def check_load(name: str, sd: Any, names: List[str], opt, params, twin, twin_params) -> None:
    """The property: a clear error that changes nothing, or a load that steps to finite values."""
    count("state dicts")
    assert_same_state(opt, twin)
    try:
        opt.load_state_dict(sd)
    except (ValueError, TypeError) as e:
        if names is not None:
            assert names, f"{type(e).__name__} for a loadable state dict: {e}"
            # How messages describe a parameter, "(shape [6, 5])", is not a complaint about a shape.
            described = re.sub(r" \(shape \[[0-9, ]*\]\)|, shape \[[0-9, ]*\]\)", "", str(e))
            assert_names_one_of(type(e)(described), names, whole_words=True)
        assert_same_state(opt, twin)
        train(opt, params, 2, 20)
        train(twin, twin_params, 2, 20)
        for a, b in zip(params, twin_params):
            assert torch.equal(a, b)
        assert_same_state(opt, twin)
        return
    train(opt, params, 1, 20)
    for p in params:
        assert bool(torch.isfinite(p).all()), f"non-finite parameters after loading {name}"


@pytest.mark.parametrize("name", list(CONFIGS))
@given(data=st.data())
@fuzz_settings(max_examples=60)
def test_a_mutated_state_dict_is_refused_cleanly_or_steps_finitely(name, data):
    opt, params, twin, twin_params = target(name)
    sd = source(name)
    names: List[str] = []
    for _ in range(data.draw(st.integers(1, 3))):
        names += mutate(sd, data, option_names(opt))
    if data.draw(st.booleans()):
        try:
            sd = load(save(sd))
        except Exception as e:  # torch.load(weights_only=True) refuses what it cannot rebuild
            raise AssertionError(f"a state dict of plain values did not round-trip through torch.save: {e}")
    check_load(name, sd, names, opt, params, twin, twin_params)


@pytest.mark.parametrize("name", list(CONFIGS))
@given(data=st.data())
@fuzz_settings(max_examples=12)
def test_a_damaged_file_fails_to_load_or_is_refused_cleanly(name, data):
    """A saved state dict, truncated or with bytes overwritten: torch.load raises, or what it
    returns is refused cleanly or steps finitely."""
    opt, params, twin, twin_params = target(name)
    data_bytes = bytearray(save(source(name)))
    if data.draw(st.booleans()):
        damaged = bytes(data_bytes[:data.draw(st.integers(0, len(data_bytes) - 1))])
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            data_bytes[data.draw(st.integers(0, len(data_bytes) - 1))] = data.draw(st.integers(0, 255))
        damaged = bytes(data_bytes)
    try:
        sd = load(damaged)
    except Exception:  # torch.load's own refusal (zip, pickle or tensor data damaged): nothing reached us
        count("state dicts")
        assert_same_state(opt, twin)
        return
    check_load(name, sd, None, opt, params, twin, twin_params)


def test_every_optimizer_and_variant_is_fuzzed():
    kinds = {type(CONFIGS[n](make_params(0))) for n in CONFIGS}
    assert kinds == {lowbit.Shampoo, lowbit.AdamW, lowbit.Sophia, lowbit.AdaHessian, lowbit.MFAC, lowbit.NagGS}
    shampoo_options = [CONFIGS[n](make_params(0)).param_groups[0] for n in CONFIGS if n.startswith(("shampoo", "caspr",
                                                                                                   "soap"))]
    for option, values in (("bits", {32, 8, 4, 3}), ("quantize", {"eigenvectors", "matrix", "cholesky"}),
                           ("preconditioner", {"shampoo", "caspr", "soap"}), ("graft", {"sgdm", "adamw"}),
                           ("graft_bits", {32, 8, 4})):
        assert {g[option] for g in shampoo_options} == values, option


# ---------------------------------------------------------------- regressions
# Minimal cases of what the properties above found; before the fixes each one loaded and
# stepped to NaN / Inf, or raised an error that was unclear or of another type.

def _nan_at(name):
    def edit(sd):
        t = sd["state"][0][name].clone()
        t.view(-1)[0] = float("nan")
        sd["state"][0][name] = t
    return edit


REGRESSIONS = [
    ("shampoo4-adamw", _nan_at("exp_avg"), ["exp_avg"]),                       # loaded; NaN parameters
    ("shampoo8-matrix-nesterov", _nan_at("momentum_buffer"), ["momentum_buffer"]),
    ("soap32", _nan_at("preconditioner.block0.left.statistic"), ["preconditioner.block0.left.statistic"]),
    ("shampoo4-adamw", _nan_at("preconditioner.block0.left.eigenvalues"), ["preconditioner.block0.left.eigenvalues"]),
    ("shampoo4-cholesky-noef-adamw4", _nan_at("exp_avg_scales"), ["exp_avg_scales"]),  # message named no entry
    ("adamw32", _nan_at("exp_avg_sq"), ["exp_avg_sq"]),
    ("mfac8", _nan_at("scales"), ["scales"]),
    ("mfac32", _nan_at("gram"), ["gram"]),
    ("naggs", _nan_at("velocity"), ["velocity"]),
    ("naggs", lambda sd: sd["state"][0].__setitem__("step", torch.tensor(float("inf"))), ["step"]),  # OverflowError
    ("mfac4", lambda sd: sd["state"][0].__setitem__("count", torch.tensor(1e30)), ["count"]),  # unclear overflow
    ("naggs", lambda sd: sd["param_groups"][0].__setitem__("lr", float("inf")), ["lr"]),  # loaded; inf parameters
    ("shampoo32-sgdm", lambda sd: sd["param_groups"][1].__setitem__("weight_decay", float("inf")), ["weight_decay"]),
    ("mfac32", lambda sd: sd["param_groups"][0].__setitem__("window", 2 ** 70), ["window"]),  # dispatcher TypeError
    ("adamw8", lambda sd: sd["param_groups"][0].__setitem__("params", [[0], 1]), ["parameter id"]),  # unhashable
    ("sophia-gnb", lambda sd: sd["param_groups"][1].__setitem__("params", [0, 3]), ["twice"]),
    ("adahessian", lambda sd: sd.__setitem__("state", []), ["state"]),  # AttributeError
    ("shampoo4-adamw", lambda sd: sd["param_groups"][0].pop("params"), ["params"]),  # KeyError
    ("sophia-hutchinson", lambda sd: sd.__setitem__("lowbit_steps", 2 ** 64), ["lowbit_steps"]),  # failed at step()
    ("adamw4-stochastic", lambda sd: sd["state"][1].__setitem__("step", 3), ["step"]),  # named no entry
]


@pytest.mark.parametrize("name, edit, names", REGRESSIONS,
                         ids=[f"{n}-{'-'.join(t)}" for n, _, t in REGRESSIONS])
def test_regressions_found_by_the_properties(name, edit, names):
    opt, params, twin, twin_params = target(name)
    sd = source(name)
    edit(sd)
    with pytest.raises(ValueError):
        opt.load_state_dict(copy.deepcopy(sd))
    check_load(name, sd, names, opt, params, twin, twin_params)
