"""lowbit.Shampoo as a torch optimizer: equivalences, param groups, schedulers, options,
bad gradients."""

from __future__ import annotations

import copy
import pydoc

import pytest
import torch

import lowbit
from conftest import clones, make_params, quick, set_grads

NEVER = dict(start_preconditioning_step=1 << 30, stat_interval=1, root_interval=1)


def run_pair(ours, theirs, opt_ours, opt_theirs, steps=12, seed=100):
    for k in range(steps):
        set_grads(ours, seed + k)
        set_grads(theirs, seed + k)
        opt_ours.step()
        opt_theirs.step()


# ---------------------------------------------------------------- equivalences

@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_without_preconditioning_it_is_torch_sgd(nesterov, weight_decay):
    ours = make_params(1)
    theirs = clones(ours)
    opt = lowbit.Shampoo(ours, lr=0.1, graft="sgdm", momentum=0.9, nesterov=nesterov,
                         weight_decay=weight_decay, **NEVER)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    run_pair(ours, theirs, opt, ref)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # same operations in the same order: bit for bit
    assert opt.root_updates() == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_without_preconditioning_it_is_torch_adamw(weight_decay):
    ours = make_params(2)
    theirs = clones(ours)
    opt = lowbit.Shampoo(ours, lr=1e-3, graft="adamw", betas=(0.9, 0.99), eps=1e-8,
                         weight_decay=weight_decay, **NEVER)
    ref = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    steps = 20
    run_pair(ours, theirs, opt, ref, steps=steps)
    for a, b, start in zip(ours, theirs, make_params(2)):
        # lowbit follows LibTorch's AdamW (m = beta1 m + (1 - beta1) g) bit for bit; Python's
        # AdamW writes the same update as m.lerp_(g, 1 - beta1), which rounds differently in
        # the last bit of m. That changes an update by ~1e-7 of itself, which can move the
        # rounding of p by one ulp per step: at most `steps` ulps of |p| apart.
        ulp = torch.finfo(torch.float32).eps * b.abs().max()
        assert (a - b).abs().max() <= steps * ulp
        # ... and the tolerance sees a wrong step: AdamW's first step moves every element by
        # lr |g| / (|g| + eps) ~ lr (m^ / sqrt(v^) = sign(g)), so an error of half a step in
        # any element exceeds the tolerance.
        assert steps * ulp < 1e-3 / 2
        assert (b - start).abs().max() >= 1e-3 * (1 - 1e-3)  # it moved (one step: lr, less eps / |g|)


def test_closure_is_evaluated_with_gradients_and_its_loss_returned():
    torch.manual_seed(5)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    w = torch.zeros(8, 4, requires_grad=True)
    w_ref = torch.zeros(8, 4, requires_grad=True)
    opt = lowbit.Shampoo([w], lr=0.05, bits=32, stat_interval=1, root_interval=1)
    ref = lowbit.Shampoo([w_ref], lr=0.05, bits=32, stat_interval=1, root_interval=1)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = (x @ w - y).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        ref.zero_grad()
        expected = (x @ w_ref - y).pow(2).mean()
        expected.backward()
        ref.step()
        assert loss.item() == expected.item()
    assert calls == 3
    assert torch.equal(w, w_ref)
    opt.zero_grad()
    assert w.grad is None


# ---------------------------------------------------------------- schedulers and groups

def test_lr_scheduler_drives_the_learning_rate():
    ours = make_params(3)
    theirs = clones(ours)
    opt = lowbit.Shampoo(ours, lr=0.1, graft="sgdm", momentum=0.9, **NEVER)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    for k in range(10):
        set_grads(ours, 10 + k)
        set_grads(theirs, 10 + k)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    # StepLR multiplies by gamma = 0.5, a power of two: every product is exact.
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_lr_scheduler_sets_the_step_size():
    # Plain SGD (momentum 0): each step moves the parameter by exactly lr * g.
    (p,) = make_params(4, [(6, 5)])
    opt = lowbit.Shampoo([p], lr=1.0, graft="sgdm", momentum=0.0, **NEVER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    for k in range(4):
        before = p.detach().clone()
        set_grads([p], k)
        opt.step()
        # p' = fl(p - fl(fl(lr) g)): lr rounded to fp32 and the product each err by u |lr g|,
        # the difference by u |p'|; the test's before - p' and g / (k + 1) round once more
        # each (u |lr g| apiece): |(p - p') - lr g| <= 4u |lr g| + u max|p'|, u = 2^-24.
        u = 2.0 ** -24
        torch.testing.assert_close(before - p.detach(), p.grad / (k + 1), rtol=4 * u,
                                   atol=u * max(p.detach().abs().max().item(), before.abs().max().item()))
        sched.step()


def test_param_groups_keep_their_own_options():
    a, b = make_params(5, [(24, 16)]), make_params(6, [(12, 20), (20,)])
    a2, b2 = clones(a), clones(b)
    group_a = dict(lr=0.1, graft="sgdm", momentum=0.8, bits=32, stat_interval=1, root_interval=2)
    group_b = dict(lr=1e-3, graft="adamw", bits=4, min_quant_numel=64, stat_interval=2, root_interval=3)
    opt = lowbit.Shampoo([dict(params=a, **group_a), dict(params=b, **group_b)], lr=0.5)
    solo_a = lowbit.Shampoo(a2, **group_a)
    solo_b = lowbit.Shampoo(b2, **group_b)
    for k in range(8):
        for ps, seed in ((a, k), (b, 50 + k), (a2, k), (b2, 50 + k)):
            set_grads(ps, seed)
        opt.step()
        solo_a.step()
        solo_b.step()
    for x, y in zip(a + b, a2 + b2):
        assert torch.equal(x, y)
    assert opt.param_groups[0]["bits"] == 32 and opt.param_groups[1]["bits"] == 4
    assert opt.state_bytes() == (solo_a.state_bytes().preconditioner + solo_b.state_bytes().preconditioner,
                                 solo_a.state_bytes().first_order + solo_b.state_bytes().first_order)


def test_add_param_group_validates_and_keeps_the_group_options():
    first, second = make_params(7, [(10, 12)]), make_params(8, [(9, 7)])
    opt = lowbit.Shampoo(first, lr=0.1, graft="sgdm")
    with pytest.raises(ValueError, match="stat_decay must be in"):
        opt.add_param_group(dict(params=second, stat_decay=1.5))
    assert len(opt.param_groups) == 1
    opt.add_param_group(dict(params=second, lr=0.01, bits=32, graft="adamw"))
    assert opt.param_groups[1]["graft"] == "adamw" and opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["momentum"] == 0.9  # the rest from the defaults
    set_grads(first + second, 1)
    opt.step()
    assert "exp_avg" in opt.state[second[0]] and "momentum_buffer" in opt.state[first[0]]


def test_group_edits_take_effect_or_are_refused():
    (p,) = make_params(9, [(16, 12)])
    (other,) = make_params(10, [(6, 5)])
    opt = lowbit.Shampoo([dict(params=[other]), dict(params=[p])], **quick())
    set_grads([p, other], 0)
    opt.step()
    opt.param_groups[1]["bits"] = 32
    opt.param_groups[1]["mapping"] = "dynamic"
    other_before = other.detach().clone()
    with pytest.raises(ValueError, match="cannot change bits, mapping of param group 1 after its first step"):
        opt.step()
    assert torch.equal(other, other_before)  # the other group did not step either
    opt.param_groups[1]["bits"] = 4
    opt.param_groups[1]["mapping"] = "linear2"
    opt.step()
    opt.param_groups[1]["bits"] = 4
    opt.param_groups[1]["stat_decay"] = 2.0
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"stat_decay must be in \[0, 1\); got 2 \(param group 1\)"):
        opt.step()
    assert torch.equal(p, before) and opt.state[p].steps == 2
    opt.param_groups[1]["stat_decay"] = 0.95

    # A preconditioner setting edited mid-run takes effect: the run leaves an unedited twin.
    twin = copy.deepcopy(opt)
    (twin_p,) = twin.param_groups[1]["params"]
    opt.param_groups[1]["stat_decay"] = 0.5
    for k in range(1, 9):
        set_grads([p], k)
        set_grads([twin_p], k)
        opt.step()
        twin.step()
    assert not torch.equal(p, twin_p)
    assert opt.root_updates() == twin.root_updates() == 2
    # The C++ state refuses a layout change too, whatever the front end does.
    options = {name: opt.param_groups[1][name] for name in lowbit.OPTION_DEFAULTS}
    config = torch.classes.lowbit.ShampooConfig(dict(options, bits=32))
    with pytest.raises(RuntimeError, match="cannot change bits after the first step"):
        opt.state[p]._cpp.step(p, p.grad, config)


def test_named_parameters_are_named_in_errors():
    model = torch.nn.Linear(4, 3)
    opt = lowbit.Shampoo(model.named_parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    model.bias.grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="parameter 'bias'.*NaN or Inf gradient"):
        opt.step()


# ---------------------------------------------------------------- options

def test_defaults_are_the_cpp_defaults():
    cpp = torch.classes.lowbit.ShampooConfig({}).to_dict()
    assert dict(cpp) == lowbit.OPTION_DEFAULTS
    opt = lowbit.Shampoo(make_params(1, [(3, 3)]))
    for name, value in lowbit.OPTION_DEFAULTS.items():
        assert opt.defaults[name] == value


def test_help_lists_every_option_with_symbol_and_default():
    text = pydoc.render_doc(lowbit.Shampoo, renderer=pydoc.plaintext)
    for name, (default, _, symbol, _) in lowbit.OPTION_TABLE.items():
        assert f"``{name}``" in text, name
        assert f"{name}: " in text, name  # in the signature, with its type
    for symbol in ("T1", "T2", "beta", "(t1, t2) Bjorck steps", "block size B", "bit width b"):
        assert symbol in text


BAD_VALUES = [
    ("lr", -1.0, "lr must be >= 0; got -1"),
    ("graft", "adam", 'graft must be one of "sgdm", "adamw"; got "adam"'),
    ("momentum", 1.0, r"momentum must be in \[0, 1\); got 1"),
    ("betas", (0.9, 1.0), r"betas\[1\] must be in \[0, 1\); got 1"),
    ("eps", 0.0, "eps must be > 0; got 0"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("bits", 5, "bits must be 32, 8, 4 or 3; got 5"),
    ("quantize", "both", "quantize must be one of"),
    ("mapping", "nf4", 'mapping must be one of "linear2", "dynamic", "linear", "kashin"; got "nf4"'),
    ("quant_block_size", 48, "quant_block_size must be a power of two from 16 to 4096; got 48"),
    ("min_quant_numel", -1, "min_quant_numel must be >= 0"),
    ("max_preconditioner_dim", 0, "max_preconditioner_dim must be >= 1"),
    ("stat_decay", -0.5, r"stat_decay must be in \[0, 1\)"),
    ("epsilon", 0.0, "epsilon must be > 0"),
    ("stat_interval", 0, "stat_interval must be >= 1"),
    ("root_interval", 0, "root_interval must be >= 1"),
    ("start_preconditioning_step", -1, "start_preconditioning_step must be >= 0"),
    ("rectify_steps", (1, 101), r"rectify_steps must be two counts in \[0, 100\]; got \(1, 101\)"),
    ("root_method", "svd", "root_method must be one of"),
    ("eigen_update", "lanczos", "eigen_update must be one of"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_option_values_are_named(name, value, message):
    with pytest.raises(ValueError, match="lowbit.Shampoo: " + message):
        lowbit.Shampoo(make_params(1, [(3, 3)]), **{name: value})


@pytest.mark.parametrize("options,message", [
    (dict(bits=8), 'bits must be 3 or 4 with mapping "kashin"; got 8'),
    (dict(bits=4, double_quant_scales=True), 'double_quant_scales is not supported with mapping "kashin"'),
])
def test_kashin_needs_what_its_centroid_codes_allow(options, message):
    with pytest.raises(ValueError, match="lowbit.Shampoo: " + message):
        lowbit.Shampoo(make_params(1, [(3, 3)]), mapping="kashin", **options)
    lowbit.Shampoo(make_params(1, [(3, 3)]), mapping="kashin", bits=32)  # 32-bit quantizes nothing


BAD_TYPES = [("lr", "0.1"), ("bits", 4.0), ("bits", True), ("nesterov", 1), ("graft", None),
             ("betas", 0.9), ("betas", (0.9, 0.99, 0.1)), ("rectify_steps", (1.5, 2)), ("skip_nonfinite", "yes")]


@pytest.mark.parametrize("name,value", BAD_TYPES)
def test_bad_option_types_are_named(name, value):
    with pytest.raises(TypeError, match=f"lowbit.Shampoo: {name} must be"):
        lowbit.Shampoo(make_params(1, [(3, 3)]), **{name: value})


def test_nesterov_needs_momentum_and_unknown_options_are_refused():
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        lowbit.Shampoo(make_params(1, [(3, 3)]), graft="sgdm", nesterov=True, momentum=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta'"):
        lowbit.Shampoo(make_params(1, [(3, 3)]), beta=0.9)
    with pytest.raises(RuntimeError, match='unknown option "beta"; the options are betas, bits'):
        torch.classes.lowbit.ShampooConfig({"beta": 0.9})
    with pytest.raises(TypeError, match="floating-point parameters"):
        lowbit.Shampoo([torch.zeros(3, 3, dtype=torch.int64)])


# ---------------------------------------------------------------- bad gradients

def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing():
    params = make_params(11)
    opt = lowbit.Shampoo(params, **quick())
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = opt.state_dict()
    steps_before = {k: int(v["step"]) for k, v in state_before["state"].items()}
    set_grads(params, 1)
    params[1].grad[0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 0 \(shape \[8, 3, 3, 3\]\) has a NaN or Inf"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert {k: int(v["step"]) for k, v in opt.state_dict()["state"].items()} == steps_before


def test_skip_nonfinite_skips_the_whole_step():
    params = make_params(12)
    opt = lowbit.Shampoo(params, skip_nonfinite=True, **quick())
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    set_grads(params, 1)
    params[0].grad[3, 4] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert opt.state[params[2]].steps == 1


def test_huge_finite_gradients_are_not_mistaken_for_inf():
    # The check computes each gradient's squared norm in fp64: finite values near FLT_MAX give
    # a finite norm (12 * (3e38)^2 = 1.08e78), refused by the overflow rule with that number
    # (test_overflow.py has the rule itself), not reported as Inf.
    (p,) = make_params(15, [(4, 3)])
    opt = lowbit.Shampoo([p], graft="sgdm", lr=1e-40, momentum=0.0)
    p.grad = torch.full((4, 3), 3e38)
    with pytest.raises(RuntimeError, match=r"its gradient's squared norm 1\.08e\+78 exceeds 2\^104"):
        opt.step()
    assert len(opt.state) == 0
    assert torch.ops.lowbit.first_nonfinite([p.grad, torch.tensor([1.0, float("-inf")])]) == 1


def test_sparse_gradients_are_refused():
    (p,) = make_params(13, [(5, 4)])
    opt = lowbit.Shampoo([p])
    p.grad = torch.eye(5, 4).to_sparse()
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 .* sparse gradient"):
        opt.step()
    assert len(opt.state) == 0


# ---------------------------------------------------------------- memory

def test_state_bytes_counts_preconditioner_and_first_order_state():
    def bytes_for(**options):
        (p,) = make_params(14, [(128, 96)])
        opt = lowbit.Shampoo([p], **options)
        set_grads([p], 0)
        opt.step()
        return opt.state_bytes()

    fp32 = bytes_for(bits=32, graft="adamw")
    four = bytes_for(bits=4, graft="adamw")
    sgdm = bytes_for(bits=4, graft="sgdm")
    assert fp32.preconditioner == 2 * 4 * (128 * 128 + 96 * 96)  # statistic + root, both sides
    assert fp32.first_order == 2 * 4 * 128 * 96 and sgdm.first_order == 4 * 128 * 96
    # 4-bit: eigenvectors and root off-diagonal at 4.5 bits, eigenvalues and diagonals fp32.
    def per_side(n):
        blocks = -(-n // 64)
        return 2 * (n * n // 2 + 4 * n * blocks) + 4 * n + 4 * n
    assert four.preconditioner == per_side(128) + per_side(96)
    assert four.total == four.preconditioner + four.first_order
    # The paper's ~0.14x: per side, 4 bits of 32 for the two n x n matrices' codes, one fp32
    # scale per 64-element block (8 n ceil(n / 64) bytes) and 8n bytes of fp32 eigenvalues
    # and diagonal, against fp32's 8 n^2: 1/8 + (ceil(n / 64) + 1) / n, largest at n = 96.
    assert four.preconditioner / fp32.preconditioner <= 1 / 8 + 3 / 96
