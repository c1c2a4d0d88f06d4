"""state_dict() / load_state_dict(): plain tensors and numbers, exact resumption, and
mismatches that raise and change nothing."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import lowbit
from conftest import clones, make_params, quick, set_grads

KINDS = [
    dict(bits=32, graft="adamw"),
    dict(bits=4, graft="sgdm", nesterov=True),
    dict(bits=4, quantize="matrix", graft="adamw"),
    dict(bits=3, graft="adamw", eigen_update="eigh"),
    dict(bits=4, graft="adamw", double_quant_scales=True, mapping="dynamic"),
    dict(bits=8, graft="sgdm", max_preconditioner_dim=16),
    dict(bits=8, graft="adamw", root_storage="eigen"),
]


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loaded(data: bytes, map_location="cpu"):
    return torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)


def train(opt, params, steps, first_seed):
    for k in range(steps):
        set_grads(params, first_seed + k)
        opt.step()


def only_plain_values(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and only_plain_values(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(only_plain_values(v) for v in value)
    return isinstance(value, (torch.Tensor, int, float, str, bool, type(None)))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_resumed_run_is_identical_to_an_uninterrupted_one(kind):
    options = quick(**kind)
    params = make_params(7)
    opt = lowbit.Shampoo(params, **options)
    train(opt, params, 6, 0)
    checkpoint = saved(opt.state_dict())
    at_checkpoint = clones(params)
    train(opt, params, 8, 6)

    resumed = clones(at_checkpoint)
    fresh = lowbit.Shampoo(resumed, **options)
    state = loaded(checkpoint)
    assert only_plain_values(state)
    fresh.load_state_dict(state)
    train(fresh, resumed, 8, 6)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert fresh.state_bytes() == opt.state_bytes()
    assert fresh.root_updates() == opt.root_updates() == 3


def test_state_dict_layout():
    params = make_params(8)
    opt = lowbit.Shampoo(params, **quick(bits=4, graft="adamw"))
    train(opt, params, 4, 0)
    sd = opt.state_dict()
    assert sorted(sd) == ["param_groups", "state"]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    s0 = sd["state"][0]
    assert s0["step"].dtype == torch.int64 and s0["step"].dim() == 0 and int(s0["step"]) == 4
    assert int(s0["root_updates"]) == 1
    assert s0["exp_avg"].shape == params[0].shape
    codes = s0["preconditioner.block0.left.eigenvectors_t.codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (20, 10)  # 20 x 20 at 4 bits
    assert not any(k.startswith("preconditioner") for k in sd["state"][2])  # the vector
    # optimizer.state[p] shows the same live entries.
    assert set(opt.state[params[0]]) == set(s0)
    assert opt.state[params[0]].steps == 4 and opt.state[params[0]].preconditioned


def test_state_dict_loads_after_a_scheduler_and_keeps_the_group_options():
    params = make_params(9)
    opt = lowbit.Shampoo(params, **quick(graft="sgdm", lr=0.1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    train(opt, params, 3, 0)
    sched.step()
    sched.step()
    checkpoint = saved({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    resumed = clones(params)
    fresh = lowbit.Shampoo(resumed, **quick(graft="sgdm", lr=0.1))
    fresh_sched = torch.optim.lr_scheduler.ExponentialLR(fresh, gamma=0.5)
    data = loaded(checkpoint)
    fresh.load_state_dict(data["optimizer"])
    fresh_sched.load_state_dict(data["scheduler"])
    assert fresh.param_groups[0]["lr"] == 0.1 * 0.5 * 0.5  # gamma = 0.5: exact products
    train(opt, params, 5, 3)
    train(fresh, resumed, 5, 3)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_pickle_and_deepcopy_carry_the_state():
    params = make_params(10)
    opt = lowbit.Shampoo(params, **quick())
    train(opt, params, 5, 0)
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    third = pickle.loads(pickle.dumps(opt))
    third_params = third.param_groups[0]["params"]
    train(opt, params, 6, 5)
    train(twin, twin_params, 6, 5)
    train(third, third_params, 6, 5)
    for a, b, c in zip(params, twin_params, third_params):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- mismatches

def reference_checkpoint():
    params = make_params(11)
    opt = lowbit.Shampoo(params, **quick())
    train(opt, params, 5, 0)
    return loaded(saved(opt.state_dict()))


def check_rejected(target_params, options, state_dict, match):
    opt = lowbit.Shampoo(target_params, **options)
    train(opt, target_params, 1, 99)  # some state of its own, which must survive the failed load
    before_params = clones(target_params)
    before = saved(opt.state_dict())
    before_groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    assert saved(opt.state_dict()) == before
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in before_groups]
    # It still steps exactly like an optimizer that never saw the bad checkpoint.
    twin_params = clones(before_params)
    twin = lowbit.Shampoo(twin_params, **options)
    twin.load_state_dict(loaded(before))
    train(opt, target_params, 3, 200)
    train(twin, twin_params, 3, 200)
    for a, b in zip(target_params, twin_params):
        assert torch.equal(a, b)


def test_mismatched_shapes_are_refused():
    sd = reference_checkpoint()
    check_rejected(make_params(12, [(20, 31), (8, 3, 3, 3), (17,), (1, 70, 1)]), quick(), sd,
                   r"exp_avg of parameter 0 of param group 0 has shape \[20, 30\] but the parameter has shape \[20, 31\]")
    check_rejected(make_params(12, [(20, 30), (8, 3, 3, 3), (18,), (1, 70, 1)]), quick(), sd,
                   r"exp_avg of parameter 2 of param group 0 has shape \[17\] but the parameter has shape \[18\]")


def test_mismatched_layout_options_are_refused():
    sd = reference_checkpoint()
    check_rejected(make_params(12), quick(bits=32), sd, "saved with different bits than this optimizer uses")
    check_rejected(make_params(12), quick(mapping="dynamic"), sd, "saved with different mapping")
    check_rejected(make_params(12), quick(quantize="matrix", graft="sgdm"), sd, "different graft, quantize")


def test_mismatched_groups_are_refused():
    sd = reference_checkpoint()
    check_rejected(make_params(12, [(20, 30), (8, 3, 3, 3), (17,)]), quick(), sd,
                   "param group 0 of the state dict has 4 parameters; this optimizer's has 3")
    two_groups = copy.deepcopy(sd)
    two_groups["param_groups"].append(dict(two_groups["param_groups"][0], params=[]))
    check_rejected(make_params(12), quick(), two_groups, "2 parameter groups; this optimizer has 1")


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s[0].__setitem__("preconditioner.block0.left.eigenvectors_t.codes",
                                torch.zeros(20, 11, dtype=torch.uint8)), "codes"),
    (lambda s: s[0].__setitem__("preconditioner.block0.left.eigenvalues", torch.zeros(20, dtype=torch.float64)),
     "must be Float of shape"),
    (lambda s: s[0].pop("preconditioner.block0.right.root.scales"), "has no \"scales\" entry"),
    (lambda s: s[0].__setitem__("exp_avg_sq_typo", torch.zeros(20, 30)), "\"exp_avg_sq_typo\" is not part"),
    (lambda s: s[0].pop("step"), "has no \"step\" entry"),
    (lambda s: s[0].__setitem__("step", torch.tensor(2.5)), "one-element integer tensor"),
    (lambda s: s[0].__setitem__("root_updates", torch.tensor(9)), "expected 0 <= root_updates <= step"),
    (lambda s: s[2].__setitem__("preconditioner.block0.left.root", torch.eye(17)), "which takes none"),
    (lambda s: s.__setitem__(7, {}), "parameter 7, which is in no param group"),
    (lambda s: s[1].__setitem__("step", 3), "must map names to tensors"),
])
def test_corrupt_entries_are_refused(corrupt, match):
    sd = reference_checkpoint()
    corrupt(sd["state"])
    check_rejected(make_params(12), quick(), sd, match)


def test_bad_options_in_a_state_dict_are_refused():
    sd = reference_checkpoint()
    sd["param_groups"][0]["stat_decay"] = 7.0
    check_rejected(make_params(12), quick(), sd, r"stat_decay must be in \[0, 1\); got 7 \(saved param group 0\)")


# ---------------------------------------------------------------- devices

def test_map_location_and_device_of_loaded_state():
    params = make_params(13)
    opt = lowbit.Shampoo(params, **quick())
    train(opt, params, 4, 0)
    data = saved(opt.state_dict())
    state = torch.load(io.BytesIO(data), weights_only=True, map_location=torch.device("cpu"))
    fresh = lowbit.Shampoo(clones(params), **quick())
    fresh.load_state_dict(state)
    # Loading copies: the optimizer's state does not alias the dict it was loaded from.
    assert all(v.device.type == "cpu" for v in fresh.state_dict()["state"][0].values())
    assert fresh.state_dict()["state"][0]["exp_avg"].data_ptr() != state["state"][0]["exp_avg"].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_follows_the_parameters_between_cpu_and_cuda():
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = lowbit.Shampoo(model.parameters(), **quick(bits=32))

    def train_on(device, steps):
        model.to(device)
        for k in range(steps):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(8, 12, generator=g).to(device), torch.randn(8, 3, generator=g).to(device)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    train_on("cpu", 3)
    train_on("cuda", 3)  # the state moves with the parameters
    assert all(v.is_cuda for s in opt.state_dict()["state"].values() for v in s.values()
               if v.dim() > 0)
    cpu_state = loaded(saved(opt.state_dict()), map_location="cpu")
    model.to("cpu")
    opt.load_state_dict(cpu_state)
    train_on("cpu", 2)
