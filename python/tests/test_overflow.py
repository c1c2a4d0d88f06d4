"""Issue 17 from Python: a step whose gradients (or Hessian estimates, or the values it would
store) would overflow raises ``RuntimeError`` naming the parameter and what would overflow, or
is skipped with ``skip_nonfinite=True`` (counted in ``skipped_steps``); either way parameters
and state stay bit-identical, and later steps equal those of a twin that never saw the bad
steps. The Python twin of tests/overflow_test.cpp, over every optimizer and Shampoo variant.

Why every scale is refused: a bad gradient is ``s * c`` with ``c = clamp(N(0, 1), -1, 1)`` over
a 24 x 20 matrix, so its squared norm is at least ``s^2 max c^2``; with 480 draws the largest
``|c|`` is 1 (the clamp: P(|N(0,1)| < 1)^480 = 0.68^480 ~ 1e-80), so the squared norm is at
least 1e40 > 2^104 ~ 2.03e31 at s = 1e20, while every entry (at most s <= 1e38) is finite in
fp32 and bf16 (largest finite values 3.40e38 and 3.39e38).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import pytest
import torch

import lowbit

MATRIX = (24, 20)
VECTOR = (17,)
STATISTICS = "the G G^T statistics would overflow fp32"


@pytest.fixture(autouse=True)
def _quiet_create_graph_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield


class Variant(NamedTuple):
    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(param groups, **overrides)
    consequence: str                              # what the gradient rule's message names (the matrix)
    hutchinson: bool = False                      # step() needs a closure with a double-backward graph
    fp16_lr: float = 5000.0                       # group 0's lr in the fp16 test: a step of ~5000
    fp16_bad: float = -1.0                        # the fp16 test's bad gradient


def shampoo(**options: Any) -> Callable[..., torch.optim.Optimizer]:
    # eps 1e-3: an fp16 eps below 6e-8 rounds to 0, and 0 / 0 is NaN, which the fp16 trial
    # would rightly refuse. No weight decay anywhere: the fp16 test holds a parameter at 65000.
    base = dict(lr=1e-3, eps=1e-3, stat_interval=1, root_interval=1, min_quant_numel=256)
    base.update(options)
    return lambda groups, **kw: lowbit.Shampoo(groups, **{**base, **kw})


def of(cls: type, **options: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda groups, **kw: cls(groups, **{**options, **kw})


MOMENT = "the second moment v (an EMA of g*g) would overflow fp32"
MOMENTUM = "the momentum m is no longer guaranteed finite"
DIRECTION = "the inverse-Fisher direction F^-1 g is no longer guaranteed finite"
VARIANTS = [
    Variant("shampoo-32", shampoo(bits=32), STATISTICS),
    Variant("shampoo-4", shampoo(bits=4), STATISTICS),
    Variant("shampoo-4-matrix", shampoo(bits=4, quantize="matrix"), STATISTICS),
    Variant("shampoo-4-cholesky", shampoo(bits=4, quantize="cholesky"), STATISTICS),
    Variant("shampoo-8-eigen-form", shampoo(bits=8, root_storage="eigen"), STATISTICS),
    Variant("caspr-4", shampoo(bits=4, preconditioner="caspr"), STATISTICS),
    Variant("soap-4", shampoo(bits=4, preconditioner="soap"), STATISTICS),
    Variant("shampoo-32-sgdm", shampoo(bits=32, graft="sgdm"), STATISTICS),
    Variant("shampoo-4-graft8", shampoo(bits=4, graft_bits=8), STATISTICS),
    Variant("shampoo-4-graft4", shampoo(bits=4, graft_bits=4), STATISTICS),
    *[Variant(f"adamw-{bits}", of(lowbit.AdamW, lr=1e-3, bits=bits, eps=1e-3, weight_decay=0.0,
                                  min_quant_numel=256), MOMENT) for bits in (32, 8, 4)],
    Variant("sophia-gnb", of(lowbit.Sophia, lr=1e-3, eps=1e-3, weight_decay=0.0), MOMENTUM),
    Variant("sophia-hutchinson", of(lowbit.Sophia, lr=1e-3, eps=1e-3, weight_decay=0.0, estimator="hutchinson",
                                    hessian_interval=1), MOMENTUM, hutchinson=True),
    Variant("adahessian", of(lowbit.AdaHessian, lr=1e-3, eps=1e-3),
            "the update m / (sqrt(v) + eps) is no longer guaranteed finite", hutchinson=True),
    # The fp16 test's group 0 had only zero gradients: its window holds 3 zero rows and the bad
    # g (n = 4), so F^-1 g = g / (damping + |g|^2 / n) = -1 / (1e-3 + 17 / 4) = -0.235; lr 25000
    # makes that a step of 5880.
    Variant("mfac-32", of(lowbit.MFAC, lr=1e-3, window=4), DIRECTION, fp16_lr=25000.0),
    Variant("mfac-4", of(lowbit.MFAC, lr=1e-3, window=4, bits=4), DIRECTION, fp16_lr=25000.0),
    # alpha 5000 (mu 1, gamma 1): b, a ~ 1 and c ~ 1, so x' ~ x - g: -5000 moves x by +5000.
    Variant("nag-gs", of(lowbit.NagGS, lr=0.1), "the velocity v is no longer guaranteed finite", fp16_bad=-5000.0),
]
IDS = [v.name for v in VARIANTS]


# -------------------------------------------------------------- stepping

class Stepper:
    """Sets gradients directly, or, for Hutchinson optimizers, through a closure whose loss
    ``sum(G * p) + c / 2 |p - p.detach()|^2`` has gradient exactly G and Hessian c I (so every
    estimate u * (H u) is c, as u = +-1)."""

    def __init__(self, params: List[torch.Tensor], hutchinson: bool) -> None:
        self.params = params
        self.hutchinson = hutchinson
        self.grads: List[torch.Tensor] = []
        self.curvature: List[float] = [1.0] * len(params)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if not self.hutchinson:
            for p, g in zip(self.params, self.grads):
                p.grad = g.clone()
            opt.step()
            return

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.zeros((), dtype=torch.float32)
            for p, g, c in zip(self.params, self.grads, self.curvature):
                d = p - p.detach()
                loss = loss + (g * p).sum().float() + (d * d).sum().float() * (c / 2)
            loss.backward(create_graph=True)
            return loss.detach()

        opt.step(closure)


def make_params(shapes, dtype, seed) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(True) for s in shapes]


def copies(params) -> List[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in params]


def normal_grad(p: torch.Tensor, k: int) -> torch.Tensor:
    """Step k's normal gradient: clamp(N(0, 1), -1, 1) in p's dtype."""
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randn(p.shape, generator=g).clamp_(-1, 1).to(p.dtype)


def snapshot(opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """A copy of the state dict (its tensors are the live state)."""
    return copy.deepcopy(opt.state_dict())


def same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_params(a, b, where: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{where}: parameter {i}"


def run_against_twin(v: Variant, dtype: torch.dtype, skip: bool, bad_steps: int,
                     bad: Callable[[Stepper], None], match: Optional[str] = None,
                     shapes=(VECTOR, MATRIX), **options: Any) -> None:
    """3 normal steps, the bad ones (each must raise matching ``match``, or be skipped), 3
    normal steps; against a twin that takes only the normal steps."""
    main = Stepper(make_params(shapes, dtype, 7), v.hutchinson)
    twin = Stepper(copies(main.params), v.hutchinson)
    opt = v.make(main.params, skip_nonfinite=skip, **options)
    other = v.make(twin.params, skip_nonfinite=skip, **options)

    def normal(s: Stepper, o: torch.optim.Optimizer, k: int) -> None:
        s.curvature = [1.0] * len(s.params)
        s.grads = [normal_grad(p, k) for p in s.params]
        s.step(o)

    for k in range(3):
        normal(main, opt, k)
        normal(twin, other, k)
    before, state = copies(main.params), snapshot(opt)
    for b in range(bad_steps):
        main.curvature = [1.0] * len(main.params)
        main.grads = [normal_grad(p, 50 + b) for p in main.params]
        bad(main)
        if skip:
            main.step(opt)
        else:
            with pytest.raises(RuntimeError, match=match):
                main.step(opt)
        same_params(main.params, before, f"after bad step {b}")
        same(snapshot(opt), state, f"state after bad step {b}")
    assert getattr(opt, "skipped_steps") == (bad_steps if skip else 0)
    for k in range(3, 6):
        normal(main, opt, k)
        normal(twin, other, k)
    same_params(main.params, twin.params, "against the twin")
    same(snapshot(opt), snapshot(other), "state against the twin")
    assert all(bool(p.isfinite().all()) for p in main.params)


def rule(consequence: str, where: str = "parameter 1 of param group 0") -> str:
    return (re.escape(where) + r" \(shape \[[0-9, ]+\]\): its gradient's squared norm [0-9.e+]+ exceeds 2\^104 "
            r"\(2\.03e\+31\): " + re.escape(consequence) + r"; nothing was updated \(set skip_nonfinite=True")


# -------------------------------------------------------------- the gradient rule

@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30, 1e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_huge_gradients_are_refused_naming_the_parameter_and_change_nothing(v, dtype, scale):
    # 18 variants x 2 dtypes x 4 scales = 144 cases.
    def bad(s: Stepper) -> None:
        s.grads[1] = s.grads[1] * scale

    run_against_twin(v, dtype, False, 1, bad, rule(v.consequence))


@pytest.mark.parametrize("scale", [1e25, 1e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_skip_nonfinite_skips_and_counts_every_bad_step(v, dtype, scale):
    # 18 variants x 2 dtypes x 2 scales = 72 cases, 3 bad steps each.
    def bad(s: Stepper) -> None:
        s.grads[1] = s.grads[1] * scale

    run_against_twin(v, dtype, True, 3, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_nan_and_inf_gradients_keep_their_message(v, value):
    def bad(s: Stepper) -> None:
        s.grads[0][3] = value

    run_against_twin(v, torch.float32, False, 1, bad,
                     r"parameter 0 of param group 0 \(shape \[17\]\) has a NaN or Inf gradient; nothing was updated")


@pytest.mark.parametrize("bits", [32, 4])
def test_the_issue_scenario_raises_and_the_run_recovers(bits):
    # The tracker's report: a 96 x 80 parameter, T1 = T2 = 1, 3 steps, then 3 steps at 1e25:
    # each raises, the parameter stays finite, and 3 normal steps later it equals the twin's.
    # torch.optim.AdamW, which the report compares with, stays finite too (its own arithmetic).
    v = Variant(f"issue-{bits}", lambda groups, **kw: lowbit.Shampoo(groups, lr=1e-3, bits=bits, stat_interval=1,
                                                                      root_interval=1, **kw), STATISTICS)

    def bad(s: Stepper) -> None:
        s.grads[0] = s.grads[0] * 1e25

    run_against_twin(v, torch.float32, False, 3, bad, rule(STATISTICS, "parameter 0 of param group 0"),
                     shapes=((96, 80),))
    p = torch.nn.Parameter(torch.randn(96, 80))
    adamw = torch.optim.AdamW([p])
    for k in range(6):
        p.grad = normal_grad(p, k) * (1e25 if 3 <= k < 6 else 1)
        adamw.step()
    assert bool(p.isfinite().all())


@pytest.mark.parametrize("graft, consequence", [
    ("adamw", "the grafted AdamW second moment g*g would overflow fp32"),
    ("sgdm", "the grafted SGD momentum is no longer guaranteed finite")])
def test_the_graft_of_an_unpreconditioned_parameter_is_named(graft, consequence):
    v = Variant("vector", shampoo(bits=4, graft=graft), "")

    def bad(s: Stepper) -> None:
        s.grads[0] = s.grads[0] * 1e30

    run_against_twin(v, torch.float32, False, 1, bad, rule(consequence, "parameter 0 of param group 0"))


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_skip_nonfinite_is_the_offending_parameters_groups_option(v):
    s = Stepper(make_params((VECTOR, MATRIX), torch.float32, 5), v.hutchinson)
    opt = v.make([{"params": [s.params[0]], "skip_nonfinite": False}, {"params": [s.params[1]], "skip_nonfinite": True}])
    s.grads = [normal_grad(p, 0) for p in s.params]
    s.step(opt)
    s.grads = [normal_grad(s.params[0], 1) * 1e25, normal_grad(s.params[1], 1)]
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 .*its gradient's squared norm"):
        s.step(opt)
    assert opt.skipped_steps == 0
    s.grads = [normal_grad(s.params[0], 1), normal_grad(s.params[1], 1) * 1e25]
    s.step(opt)
    assert opt.skipped_steps == 1
    opt.zero_grad()  # (a skipped step leaves the gradients, graphs included, where they were)
    assert copy.deepcopy(opt).skipped_steps == 1  # kept by pickling / deepcopy


@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_skip_nonfinite_must_be_a_bool(v):
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        v.make(make_params((VECTOR,), torch.float32, 1), skip_nonfinite=1)


# -------------------------------------------------------------- Hessian estimates

@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
@pytest.mark.parametrize("v", [v for v in VARIANTS if v.hutchinson], ids=[v.name for v in VARIANTS if v.hutchinson])
def test_hutchinson_estimates_beyond_the_rule_are_refused(v, skip):
    # Curvature 1e30 on the matrix: every estimate is 1e30 (as fp32), squared norm 480e60.
    noun, tail = (("Hutchinson Hessian estimate D", "v, the EMA of D*D, would overflow fp32") if v.name == "adahessian"
                  else ("Hutchinson Hessian estimate u*(Hu)", "the Hessian EMA h is no longer guaranteed finite"))

    def bad(s: Stepper) -> None:
        s.curvature[1] = 1e30

    run_against_twin(v, torch.float32, skip, 2, bad,
                     re.escape(f"parameter 1 of param group 0 (shape [24, 20]): its {noun}'s squared norm 4.8e+62 "
                               f"exceeds 2^104 (2.03e+31): {tail}"))


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
def test_sophia_gauss_newton_bartlett_estimates_beyond_the_rule_are_refused(skip):
    # update_hessian(B) folds B g g into h. One entry of 4e15 passes the gradient rule
    # (1.6e31 <= 2^104) but B g g = 1.6e33 at B = 100 has squared norm 2.56e66.
    params = make_params((VECTOR, MATRIX), torch.float32, 3)
    twin = copies(params)
    opt = lowbit.Sophia(params, lr=1e-3, weight_decay=0.0, skip_nonfinite=skip)
    other = lowbit.Sophia(twin, lr=1e-3, weight_decay=0.0, skip_nonfinite=skip)

    def hessian(o, ps, k, big):
        for p in ps:
            p.grad = normal_grad(p, k)
        if big:
            ps[1].grad[5, 7] = big
        o.update_hessian(100)

    hessian(opt, params, 0, 0)
    hessian(other, twin, 0, 0)
    state = snapshot(opt)
    if skip:
        hessian(opt, params, 1, 4e15)
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(RuntimeError, match=re.escape(
                "its Gauss-Newton-Bartlett estimate B*g*g's squared norm 2.56e+66 exceeds 2^104 (2.03e+31): the "
                "Hessian EMA h is no longer guaranteed finite")):
            hessian(opt, params, 1, 4e15)
        with pytest.raises(RuntimeError, match=re.escape(
                "its gradient's squared norm 1e+40 exceeds 2^104 (2.03e+31): the Gauss-Newton-Bartlett estimate B*g*g "
                "would overflow fp32")):
            hessian(opt, params, 1, 1e20)
    same(snapshot(opt), state, "Sophia GNB")
    hessian(opt, params, 2, 0)
    hessian(other, twin, 2, 0)
    same(snapshot(opt), snapshot(other), "Sophia GNB against the twin")


# -------------------------------------------------------------- state the gradient does not bound

@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
def test_nag_gs_velocity_beyond_its_bound_is_tried_and_refused(skip):
    # mu = 0, gamma = 1e-30: the gradient's weight alpha / (alpha mu + gamma) is 1e29, so a
    # gradient of 1e10 (squared norm ~3e22 for the matrix: within the rule) puts ~1e39 into v.
    v = Variant("nag-gs-mu0", of(lowbit.NagGS, lr=0.1, mu=0.0, gamma=1e-30), "")

    def bad(s: Stepper) -> None:
        s.grads[1] = s.grads[1] * 1e10

    run_against_twin(v, torch.float32, skip, 2, bad,
                     re.escape("parameter 1 of param group 0 (shape [24, 20]): this step would make its values "
                               "non-finite (Float, largest finite value 3.40282e+38)"))


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
def test_shampoo_with_options_that_bound_nothing_tries_the_step_first(skip):
    # SGD without momentum at lr 1e36 bounds nothing: every step is tried first. Normal steps
    # move entries by lr |d| (|d| at most ||G||_F ~ 17, ~0.8 on average: grafting keeps ||d||_F
    # = ||G||_F): finite over 6 steps. 1000 times the gradient (within the rule) moves every
    # entry with |d| > 0.34 beyond 3.4e38.
    v = Variant("sgdm-lr1e36", shampoo(bits=32, graft="sgdm", momentum=0.0, lr=1e36), "")

    def bad(s: Stepper) -> None:
        s.grads[1] = s.grads[1] * 1000

    run_against_twin(v, torch.float32, skip, 1, bad,
                     re.escape("parameter 1 of param group 0 (shape [24, 20]): this step would make its values "
                               "non-finite (Float"))


# -------------------------------------------------------------- fp16 parameters

@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
@pytest.mark.parametrize("v", VARIANTS, ids=IDS)
def test_fp16_steps_that_would_overflow_are_refused(v, skip):
    # Group 0: an fp16 vector at 65000 (largest finite fp16 65504; from 65520 on values round to
    # Inf) with zero gradients, which leave it where it is. The bad step's negative gradient
    # moves it up by about 5000 (fp16_lr; see VARIANTS). Group 1: an fp16 matrix, normal steps.
    high = torch.full(VECTOR, 65000.0, dtype=torch.float16).requires_grad_(True)
    (matrix,) = make_params((MATRIX,), torch.float16, 9)
    main = Stepper([high, matrix], v.hutchinson)
    twin = Stepper(copies(main.params), v.hutchinson)

    def groups(ps):
        return [{"params": [ps[0]], "lr": v.fp16_lr, "skip_nonfinite": skip}, {"params": [ps[1]], "skip_nonfinite": skip}]

    opt, other = v.make(groups(main.params)), v.make(groups(twin.params))

    def normal(s: Stepper, o, k: int) -> None:
        s.curvature = [1.0, 1.0]
        s.grads = [torch.zeros(VECTOR, dtype=torch.float16), normal_grad(s.params[1], k)]
        s.step(o)

    for k in range(3):
        normal(main, opt, k)
        normal(twin, other, k)
    before, state = copies(main.params), snapshot(opt)
    main.grads[0] = torch.full(VECTOR, v.fp16_bad, dtype=torch.float16)
    if skip:
        main.step(opt)
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(RuntimeError, match=re.escape(
                "parameter 0 of param group 0 (shape [17]): this step would make its values non-finite (Half, "
                "largest finite value 65504); nothing was updated")):
            main.step(opt)
    same_params(main.params, before, "after the bad step")
    same(snapshot(opt), state, "state after the bad step")
    for k in range(3, 6):
        normal(main, opt, k)
        normal(twin, other, k)
    same_params(main.params, twin.params, "against the twin")
    same(snapshot(opt), snapshot(other), "state against the twin")
    assert float(main.params[0].detach().abs().max()) <= 65504


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_fp16_moments_that_would_overflow_are_refused(bits):
    # An fp16 parameter keeps fp32-layout moments in its own dtype: v = 1e-3 * 60000^2 = 3.6e6 >
    # 65504 for a gradient of 60000 (finite in fp16; squared norm 17 * 3.6e9 = 6.1e10, within
    # the rule). Normal gradients (<= 1) leave v <= 1e-3.
    v = Variant("adamw-fp16", of(lowbit.AdamW, lr=1e-3, bits=bits, eps=1e-3, weight_decay=0.0, min_quant_numel=256), "")

    def bad(s: Stepper) -> None:
        s.grads[0].fill_(60000)

    run_against_twin(v, torch.float16, False, 1, bad, re.escape(
        "parameter 0 of param group 0 (shape [17]): this step would make its exp_avg_sq non-finite (Half, largest "
        "finite value 65504)"))


# -------------------------------------------------------------- the ops

def test_the_ops_apply_the_rule_of_the_cpp_library():
    ops = torch.ops.lowbit
    t = torch.full((7, 3), 1e38)
    norms = ops.squared_norms([t, torch.zeros(2), torch.tensor([1.0, float("nan")])])
    assert norms.dtype == torch.float64
    # fp64 reduction, then sqrt (linalg_vector_norm) and square: a few roundings of 2^-53 each.
    assert norms[0].item() == pytest.approx(21 * float(torch.tensor(1e38)) ** 2, rel=4 * 2.0 ** -53)
    bound = 2.0 ** 104
    assert ops.first_offence(torch.tensor([1.0, bound, math.nextafter(bound, math.inf)], dtype=torch.float64)) == \
        (2, math.nextafter(bound, math.inf))
    assert ops.first_offence(torch.tensor([1.0, bound], dtype=torch.float64)) == (-1, 0.0)
    assert ops.first_offence(norms, math.inf)[0] == 2
    assert ops.offence_message("parameter 2 of group 0", "shampoo", 1.2e50) == (
        "parameter 2 of group 0: its gradient's squared norm 1.2e+50 exceeds 2^104 (2.03e+31): the G G^T statistics "
        "would overflow fp32")
    assert ops.overflow_problem("exp_avg_sq", torch.float16) == (
        "this step would make its exp_avg_sq non-finite (Half, largest finite value 65504)")
    assert ops.max_magnitudes([torch.tensor([-3.0, 2.0])]).tolist() == [3.0]
    assert ops.first_nonfinite([t, torch.tensor([float("-inf")])]) == 1
    with pytest.raises(RuntimeError, match="unknown key \"lion\""):
        ops.offence_message("p", "lion", 1.0)
