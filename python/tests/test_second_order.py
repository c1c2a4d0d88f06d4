"""lowbit.Sophia, AdaHessian, MFAC, NagGS and the curvature helpers: each optimizer against
its header's update rule written here again in float64 numpy, the helpers against dense
Hessians, state dicts, and the errors a user meets."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch

import lowbit
from conftest import make_params

F32_EPS = float(torch.finfo(torch.float32).eps)
SHAPES = [(4, 5), (3, 2, 3, 3), (7,)]  # a matrix, a conv kernel (AdaHessian averages it), a vector


@pytest.fixture(autouse=True)
def _quiet_create_graph_warning():
    # backward(create_graph=True) warns about a parameter <-> gradient cycle; step() breaks it
    # by detaching the gradient (tested below).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


def random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


U32 = 2.0 ** -24  # unit roundoff of float32
ROUNDINGS_PER_STEP = 16
GAIN_PER_STEP = 1.25


def close(ours: torch.Tensor, ref: np.ndarray, steps: int) -> None:
    """float32 state against the float64 rule after `steps` steps. Each step makes every
    value with at most ROUNDINGS_PER_STEP fp32 roundings (the rule's ~10 multiply-adds,
    divisions and square roots, and the fp32 gradient or Hessian-vector product of the test
    loss), each off by u of a magnitude <= max(1, |value|) (gradients, Hessians and states
    are O(1) here). An error already made is passed on with a gain <= 1 + lr L per step:
    lr <= 0.1, and L <= 2.5 (a gradient error H dp is divided by a Hessian estimate of the
    same size, to the power 1/2 at worst: sqrt(max H) = sqrt(5.5) for DiagonalQuartic;
    clipped, momentum and NAG-GS updates gain less). After T steps:
    16 u T 1.25^T max(1, |ref|)."""
    ref = np.asarray(ref)
    scale = max(1.0, float(np.abs(ref).max()))
    atol = ROUNDINGS_PER_STEP * U32 * steps * GAIN_PER_STEP ** steps * scale
    np.testing.assert_allclose(f64(ours), ref, rtol=0, atol=atol)


# -------------------------------------------------------------- a loss with a known diagonal Hessian

class DiagonalQuartic:
    """L(p) = sum c p^4 / 12 + a p^2 / 2 + b p per parameter: g = c p^3 / 3 + a p + b and a
    diagonal Hessian H = c p^2 + a that changes with p, so Hutchinson's z * (H z) = H exactly
    and the refresh schedule matters."""

    def __init__(self, shapes, seed):
        g = torch.Generator().manual_seed(seed)
        self.c = [torch.rand(s, generator=g) for s in shapes]
        self.a = [torch.rand(s, generator=g) + 0.5 for s in shapes]
        self.b = [torch.randn(s, generator=g) for s in shapes]

    def loss(self, params):
        terms = zip(params, self.c, self.a, self.b)
        return sum((c * p ** 4 / 12 + a * p ** 2 / 2 + b * p).sum() for p, c, a, b in terms)

    def grad(self, i, p):
        return f64(self.c[i]) * p ** 3 / 3 + f64(self.a[i]) * p + f64(self.b[i])

    def hessian(self, i, p):
        return f64(self.c[i]) * p ** 2 + f64(self.a[i])


def closure_for(opt, params, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward(create_graph=True)
        return loss
    return closure


# -------------------------------------------------------------- options

ALL = [lowbit.Sophia, lowbit.AdaHessian, lowbit.MFAC, lowbit.NagGS]


@pytest.mark.parametrize("cls", ALL)
def test_defaults_are_the_cpp_defaults(cls):
    cpp = dict(torch.ops.lowbit.second_order_options(cls._CPP, {}))
    assert {name: row.default for name, row in cls._TABLE.items()} == cpp
    opt = cls([torch.zeros(3, requires_grad=True)])
    assert {k: v for k, v in opt.defaults.items() if k in cpp} == cpp
    for name in cpp:
        assert f"``{name}``" in cls.__doc__


@pytest.mark.parametrize("cls, options, message", [
    (lowbit.Sophia, dict(lr=-1.0), r"lowbit.Sophia: lr must be >= 0; got -1"),
    (lowbit.Sophia, dict(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\); got 1"),
    (lowbit.Sophia, dict(rho=0.0), "rho must be > 0"),
    (lowbit.Sophia, dict(estimator="newton"), 'estimator must be one of "gnb", "hutchinson"; got "newton"'),
    (lowbit.Sophia, dict(hessian_interval=0), "hessian_interval must be >= 1; got 0"),
    (lowbit.Sophia, dict(seed=-1), "seed must be >= 0"),
    (lowbit.AdaHessian, dict(hessian_power=1.5), r"hessian_power must be in \(0, 1\]; got 1.5"),
    (lowbit.AdaHessian, dict(eps=0.0), "eps must be > 0"),
    (lowbit.MFAC, dict(bits=3), "bits must be 32, 8 or 4; got 3"),
    (lowbit.MFAC, dict(window=0), "window must be >= 1"),
    (lowbit.MFAC, dict(damping=0.0), "damping must be > 0"),
    (lowbit.MFAC, dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lowbit.MFAC, dict(mapping="log"), 'mapping must be one of "linear2", "dynamic", "linear", "kashin"; got "log"'),
    (lowbit.MFAC, dict(bits=8, mapping="kashin"), 'bits must be 3 or 4 with mapping "kashin"; got 8'),
    (lowbit.MFAC, dict(quant_block_size=48), "quant_block_size must be a power of two from 16 to 4096; got 48"),
    (lowbit.NagGS, dict(lr=0.0), r"lr \(alpha\) must be > 0"),
    (lowbit.NagGS, dict(mu=-1.0), "mu must be >= 0"),
    (lowbit.NagGS, dict(gamma=0.0), "gamma must be > 0"),
])
def test_bad_option_values_are_named(cls, options, message):
    with pytest.raises(ValueError, match=message + r".*\(defaults\)"):
        cls([torch.zeros(3, requires_grad=True)], **options)


@pytest.mark.parametrize("cls, name, value", [
    (lowbit.Sophia, "lr", "fast"), (lowbit.Sophia, "betas", 0.9), (lowbit.AdaHessian, "hessian_interval", 1.5),
    (lowbit.MFAC, "bits", True), (lowbit.MFAC, "mapping", 4), (lowbit.NagGS, "mu", None),
])
def test_bad_option_types_are_named(cls, name, value):
    with pytest.raises(TypeError, match=f"lowbit.{cls._NAME}: {name} must be"):
        cls([torch.zeros(3, requires_grad=True)], **{name: value})


def test_group_options_are_checked_when_added_and_when_edited():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = lowbit.MFAC([a], window=4)
    with pytest.raises(ValueError, match=r"damping must be > 0; got -1 \(param group 1\)"):
        opt.add_param_group({"params": [b], "damping": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["window"] == 4
    random_grads([a, b], 0)
    opt.step()
    opt.param_groups[0]["lr"] = -2.0
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match=r"lr must be >= 0; got -2 \(param group 0\)"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    opt.param_groups[1]["bits"] = 8
    with pytest.raises(ValueError, match="cannot change bits of param group 1 after its first step"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    with pytest.raises(TypeError, match="floating-point parameters"):
        lowbit.NagGS([torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match="seed is a setting of the whole optimizer"):
        lowbit.Sophia([{"params": [a], "seed": 3}])


def test_lr_schedulers_drive_the_step():
    p = torch.ones(5, requires_grad=True)
    opt = lowbit.NagGS([p], lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    alpha, gamma, v, x = 0.5, 1.0, np.ones(5), np.ones(5)
    for k in range(3):
        p.grad = torch.full((5,), 0.25)
        b = alpha / (alpha + gamma)
        v = (1 - b) * v + b * x - alpha / (alpha + gamma) * 0.25
        gamma = (gamma + alpha) / (1 + alpha)
        x = x + alpha / (1 + alpha) * (v - x)
        opt.step()
        scheduler.step()
        alpha /= 2
        close(p, x, k + 1)
    assert opt.param_groups[0]["lr"] == 0.0625


# -------------------------------------------------------------- Sophia

def sophia_rule(p, m, h, g, lr, b1, rho, eps, wd):
    """include/lowbit/sophia.h: m = b1 m + (1 - b1) g; p -= lr wd p; p -= lr clip(m / max(rho h, eps), 1)."""
    m = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd)
    ratio = m / np.maximum(rho * h, eps)
    return p - lr * np.clip(ratio, -1, 1), m, ratio


def test_sophia_gnb_follows_the_rule():
    params = make_params(10, SHAPES)
    ref_p = [f64(p) for p in params]
    ref_m = [np.zeros_like(p) for p in ref_p]
    ref_h = [np.zeros_like(p) for p in ref_p]
    lr, b1, b2, rho, eps, wd, k, batch = 0.05, 0.9, 0.6, 0.5, 1e-12, 0.1, 3, 16
    opt = lowbit.Sophia(params, lr=lr, betas=(b1, b2), rho=rho, eps=eps, weight_decay=wd, hessian_interval=k)
    unclipped = 0
    for t in range(7):
        assert opt.hessian_due() == (t % k == 0)
        if opt.hessian_due():
            random_grads(params, 1000 + t)  # the gradient of the loss on sampled labels
            sampled = [f64(p.grad) for p in params]
            opt.update_hessian(batch)
            for i, g_hat in enumerate(sampled):
                ref_h[i] = b2 * ref_h[i] + (1 - b2) * batch * g_hat * g_hat
        random_grads(params, t)
        for i, p in enumerate(params):
            ref_p[i], ref_m[i], ratio = sophia_rule(ref_p[i], ref_m[i], ref_h[i], f64(p.grad), lr, b1, rho, eps, wd)
            unclipped += int((np.abs(ratio) < 1).sum())
        opt.step()
        for i, p in enumerate(params):
            close(p, ref_p[i], t + 1)
            close(opt.state[p]["exp_avg"], ref_m[i], t + 1)
            close(opt.state[p]["hessian"], ref_h[i], t + 1)
            assert int(opt.state[p]["step"]) == t + 1
    assert unclipped > 0  # the clip did not decide every entry


def test_sophia_hutchinson_follows_the_rule_where_hutchinson_is_exact():
    loss = DiagonalQuartic(SHAPES, 11)
    params = make_params(12, SHAPES)
    ref_p = [f64(p) for p in params]
    ref_m = [np.zeros_like(p) for p in ref_p]
    ref_h = [np.zeros_like(p) for p in ref_p]
    lr, b1, b2, rho, eps, wd, k = 0.05, 0.9, 0.5, 1.0, 1e-12, 0.05, 2
    opt = lowbit.Sophia(params, lr=lr, betas=(b1, b2), rho=rho, eps=eps, weight_decay=wd, estimator="hutchinson",
                        hessian_interval=k)
    closure = closure_for(opt, params, loss.loss)
    unclipped = 0
    for t in range(6):
        assert opt.hessian_due() == (t % k == 0)
        for i in range(len(params)):
            if t % k == 0:
                ref_h[i] = b2 * ref_h[i] + (1 - b2) * loss.hessian(i, ref_p[i])
            ref_p[i], ref_m[i], ratio = sophia_rule(ref_p[i], ref_m[i], ref_h[i], loss.grad(i, ref_p[i]), lr, b1,
                                                    rho, eps, wd)
            unclipped += int((np.abs(ratio) < 1).sum())
        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor)
        for i, p in enumerate(params):
            close(p, ref_p[i], t + 1)
            close(opt.state[p]["hessian"], ref_h[i], t + 1)
            assert not p.grad.requires_grad  # the double-backward graph was released
    assert unclipped > 0


def test_sophia_gnb_misuse_is_refused():
    p = torch.zeros(3, requires_grad=True)
    opt = lowbit.Sophia([p])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        opt.update_hessian(0)
    hutch = lowbit.Sophia([p], estimator="hutchinson")
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="update_hessian is the Gauss-Newton-Bartlett estimator"):
        hutch.update_hessian(8)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(RuntimeError, match="NaN or Inf gradient"):
        opt.update_hessian(8)
    assert not opt.state[p]


# -------------------------------------------------------------- AdaHessian

def adahessian_diagonal(estimate):
    """D: the estimate, or for a 4-D kernel the mean of |estimate| over its last two dims."""
    if estimate.ndim != 4:
        return estimate
    return np.broadcast_to(np.abs(estimate).mean(axis=(2, 3), keepdims=True), estimate.shape)


@pytest.mark.parametrize("hessian_power, weight_decay, interval", [(1.0, 0.0, 1), (0.5, 0.01, 2)])
def test_adahessian_follows_the_rule(hessian_power, weight_decay, interval):
    loss = DiagonalQuartic(SHAPES, 21)
    params = make_params(22, SHAPES)
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-4
    ref_p = [f64(p) for p in params]
    ref_m = [np.zeros_like(p) for p in ref_p]
    ref_v = [np.zeros_like(p) for p in ref_p]
    ref_d = [None] * len(params)
    opt = lowbit.AdaHessian(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                            hessian_power=hessian_power, hessian_interval=interval)
    closure = closure_for(opt, params, loss.loss)
    for t in range(1, 6):
        for i in range(len(params)):
            p = ref_p[i]
            g = loss.grad(i, p)
            if (t - 1) % interval == 0:
                ref_d[i] = adahessian_diagonal(loss.hessian(i, p))  # z * (H z) = diag(H) here
            ref_m[i] = b1 * ref_m[i] + (1 - b1) * g
            ref_v[i] = b2 * ref_v[i] + (1 - b2) * ref_d[i] ** 2
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = (np.sqrt(ref_v[i]) / math.sqrt(bc2)) ** hessian_power + eps
            ref_p[i] = p - lr * (ref_m[i] / bc1 / denom + weight_decay * p)
        opt.step(closure)
        for i, p in enumerate(params):
            close(p, ref_p[i], t)
            close(opt.state[p]["exp_hessian_diag_sq"], ref_v[i], t)
            close(opt.state[p]["hessian_diag"], ref_d[i], t)
            assert int(opt.state[p]["step"]) == t
    kernel = opt.state[params[1]]["hessian_diag"]
    assert torch.equal(kernel, kernel[:, :, :1, :1].expand_as(kernel))  # one value per 3x3 kernel


# -------------------------------------------------------------- M-FAC

def dense_ihvp(rows: np.ndarray, g: np.ndarray, damping: float) -> np.ndarray:
    """(damping I + (1/n) G^T G)^-1 g, the dense matrix, in float64."""
    n, d = rows.shape
    fisher = damping * np.eye(d) + rows.T @ rows / n
    return np.linalg.solve(fisher, g)


def woodbury_tolerance(rows: np.ndarray, g: np.ndarray, damping: float) -> np.ndarray:
    """Per element, how far lowbit's M-FAC direction may be from the float64 dense answer
    F^-1 g of the same rows. The C++ evaluates Woodbury in float64 from the fp32 rows (exact
    in float64) and rounds the result to fp32 once: u |F^-1 g|. Its float64 dot products of
    length <= d err by d 2^-53 of the sum of |terms| (Higham), which the solve of
    (n lambda I + G G^T) amplifies by its condition number kappa_W; the dense reference's
    solve errs by d 2^-53 kappa_F of its answer. Together, per element:
    u |x| + d 2^-53 ((kappa_W + 2) (|g| + |G|^T |c|) / lambda + kappa_F max|x|)."""
    n, d = rows.shape
    system = rows @ rows.T + n * damping * np.eye(n)
    c = np.linalg.solve(system, rows @ g)
    fisher = damping * np.eye(d) + rows.T @ rows / n
    x = np.linalg.solve(fisher, g)
    float64 = d * 2.0 ** -53 * ((np.linalg.cond(system) + 2) * (np.abs(g) + np.abs(rows.T) @ np.abs(c)) / damping
                                + np.linalg.cond(fisher) * np.abs(x).max())
    return U32 * np.abs(x) + float64


def dequantized_window(state, bits, mapping, block_size, d):
    n = min(int(state["count"]), state["codes"].shape[0])
    table = torch.ops.lowbit.codebook(mapping, bits)
    rows = torch.ops.lowbit.dequantize_blockwise(state["codes"][:n], state["scales"][:n], table, None, bits,
                                                 block_size, d)
    return f64(rows)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_mfac_direction_is_the_inverse_fisher_of_the_stored_window(bits):
    """lr = 1 from p = 0: the update is -F^-1 g. fp32 window: F of the gradients themselves,
    with the window wrapping around (7 gradients, m = 3). 8/4-bit: F~ of the dequantized rows
    G~ applied to the new gradient as stored, g~ (include/lowbit/mfac.h), and within the
    perturbation bound of the fp32 answer: F~^-1 g~ - F^-1 g = F~^-1 (g~ - g) + F~^-1 (F - F~) F^-1 g,
    so its norm is at most (||g~ - g|| + ||F~ - F||_2 ||F^-1 g||) / damping (||F~^-1|| <= 1/damping)."""
    torch.manual_seed(0)
    m, damping, mapping, block = 3, 0.05, "dynamic", 16
    params = [torch.zeros(6, 5, requires_grad=True), torch.zeros(9, requires_grad=True)]
    opt = lowbit.MFAC(params, lr=1.0, window=m, damping=damping, bits=bits, mapping=mapping, quant_block_size=block)
    history = [[] for _ in params]
    for t in range(7):
        random_grads(params, 50 + t)
        with torch.no_grad():
            for p in params:
                p.zero_()
        opt.step()
        for i, p in enumerate(params):
            g = f64(p.grad).ravel()
            history[i] = (history[i] + [g])[-m:]
            exact_rows = np.stack(history[i])
            direction = -f64(p).ravel()
            exact = dense_ihvp(exact_rows, g, damping)
            if bits == 32:
                assert np.all(np.abs(direction - exact) <= woodbury_tolerance(exact_rows, g, damping))
                continue
            stored = dequantized_window(opt.state[p], bits, mapping, block, g.size)
            g_stored = stored[t % m]  # the newest gradient, as stored (slot (count - 1) % m)
            expected = dense_ihvp(stored, g_stored, damping)
            rounding = woodbury_tolerance(stored, g_stored, damping)
            assert np.all(np.abs(direction - expected) <= rounding)
            n = exact_rows.shape[0]
            fisher_gap = np.linalg.norm(stored.T @ stored / n - exact_rows.T @ exact_rows / n, 2)
            bound = (np.linalg.norm(g_stored - g) + fisher_gap * np.linalg.norm(exact)) / damping
            # The perturbation bound holds for the exact F~^-1 g~; the direction is within
            # `rounding` of its float64 value, and the bound's own float64 norms and solves
            # err by d kappa 2^-53 < 1e-10 of it (d <= 30, kappa <= 1e4).
            assert np.linalg.norm(direction - exact) <= bound * (1 + 1e-10) + np.linalg.norm(rounding)
            assert fisher_gap > 0  # the window really is quantized
        assert int(opt.state[params[0]]["count"]) == t + 1


def test_mfac_with_momentum_and_weight_decay_follows_the_rule():
    params = make_params(30, [(4, 3), (5,)])
    m, damping, lr, momentum, wd = 2, 0.1, 0.05, 0.9, 0.01
    opt = lowbit.MFAC(params, lr=lr, momentum=momentum, weight_decay=wd, window=m, damping=damping)
    ref_p = [f64(p).ravel() for p in params]
    ref_buf = [None] * len(params)
    history = [[] for _ in params]
    for t in range(5):
        random_grads(params, 60 + t)
        for i, p in enumerate(params):
            g = f64(p.grad).ravel()
            history[i] = (history[i] + [g])[-m:]
            d = dense_ihvp(np.stack(history[i]), g, damping) + wd * ref_p[i]
            ref_buf[i] = d if ref_buf[i] is None else momentum * ref_buf[i] + d
            ref_p[i] = ref_p[i] - lr * ref_buf[i]
        opt.step()
        for i, p in enumerate(params):
            close(p.ravel(), ref_p[i], t + 1)
            close(opt.state[p]["momentum_buffer"].ravel(), ref_buf[i], t + 1)


def test_mfac_state_bytes_shrink_with_the_window_bits():
    sizes = {}
    for bits in (32, 8, 4):
        p = torch.zeros(64, 64, requires_grad=True)
        opt = lowbit.MFAC([p], window=8, bits=bits, momentum=0.5)
        p.grad = torch.randn(64, 64)
        opt.step()
        sizes[bits] = opt.state_bytes()
        assert sizes[bits].first_order == 64 * 64 * 4  # the momentum buffer
    gram = 8 * 8 * 8
    assert sizes[32].preconditioner == 8 * 4096 * 4 + gram
    assert sizes[8].preconditioner == 8 * 4096 + 8 * 64 * 4 + gram  # codes + one fp32 scale per 64
    assert sizes[4].preconditioner == 8 * 2048 + 8 * 64 * 4 + gram


# -------------------------------------------------------------- NAG-GS

def test_nag_gs_follows_the_rule():
    params = make_params(40, SHAPES)
    alpha, mu, gamma0 = 0.2, 0.5, 1.5
    other = [params[2]]
    opt = lowbit.NagGS([{"params": params[:2]}, {"params": other, "lr": 0.05, "mu": 0.0}], lr=alpha, mu=mu,
                       gamma=gamma0)
    options = [(alpha, mu)] * 2 + [(0.05, 0.0)]
    ref_x = [f64(p) for p in params]
    ref_v = [x.copy() for x in ref_x]
    ref_gamma = [gamma0] * len(params)
    for t in range(6):
        random_grads(params, 70 + t)
        for i, p in enumerate(params):
            a_, m_ = options[i]
            g, x, gamma = f64(p.grad), ref_x[i], ref_gamma[i]
            b = a_ * m_ / (a_ * m_ + gamma)
            ref_v[i] = (1 - b) * ref_v[i] + b * x - a_ / (a_ * m_ + gamma) * g
            ref_gamma[i] = (gamma + a_ * m_) / (1 + a_)
            a = a_ / (1 + a_)
            ref_x[i] = (1 - a) * x + a * ref_v[i]
        opt.step()
        for i, p in enumerate(params):
            close(p, ref_x[i], t + 1)
            close(opt.state[p]["velocity"], ref_v[i], t + 1)
            # gamma is float64 on both sides: gamma' = (gamma + a mu) / (1 + a) is 4 roundings
            # of 2^-53 each per step (a = alpha mu rounds too), on each side; (gamma + a mu) /
            # (1 + a) passes a relative error on with gain <= 1.
            assert float(opt.state[p]["gamma"]) == pytest.approx(ref_gamma[i], rel=2 * 4 * (t + 1) * 2.0 ** -53)


# -------------------------------------------------------------- curvature helpers

def test_hessian_vector_product_matches_the_dense_hessian():
    torch.manual_seed(1)
    x = torch.randn(2, dtype=torch.float64)
    W = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(W, b):
        return (torch.tanh(W @ x + b) ** 2).sum() + (W ** 2).sum() * b.sum()

    loss = f(W, b)
    grads = torch.autograd.grad(loss, [W, b], create_graph=True)
    vectors = [torch.randn_like(W), torch.randn_like(b)]
    hv = lowbit.hessian_vector_product(grads, [W, b], vectors)
    dense = torch.autograd.functional.hessian(lambda w, c: f(w, c), (W.detach(), b.detach()))
    flat = torch.cat([torch.cat([dense[i][j].reshape(W.numel() if i == 0 else 3, -1) for j in range(2)], 1)
                      for i in range(2)])
    expected = flat @ torch.cat([v.reshape(-1) for v in vectors])
    # float64 on both sides: each entry of H v sums 9 products of Hessian entries that autograd
    # and torch.autograd.functional build from <= 30 roundings each: <= 64 2^-53 of the sum
    # of |H_ij v_j| (Higham's bound with room to spare), per side.
    scale = (flat.abs() @ torch.cat([v.reshape(-1) for v in vectors]).abs()).max().item()
    torch.testing.assert_close(torch.cat([h.reshape(-1) for h in hv]), expected, rtol=0,
                               atol=2 * 64 * 2.0 ** -53 * scale)
    # The graph is kept: a second product from the same gradients.
    again = lowbit.hessian_vector_product(grads, [W, b], vectors)
    assert all(torch.equal(a, c) for a, c in zip(hv, again))


def test_hessian_vector_product_of_a_constant_gradient_and_without_a_graph():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad((w ** 2).sum() + 3 * c.sum(), [w, c], create_graph=True)
    assert not grads[1].requires_grad  # the loss is linear in c
    v = [torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    hv = lowbit.hessian_vector_product(grads, [w, c], v)
    assert torch.equal(hv[0], 2 * v[0])  # H = 2 I: autograd multiplies by 2 and 1, both exact
    assert torch.equal(hv[1], torch.zeros(3, dtype=torch.float64))
    plain = torch.autograd.grad((w ** 2).sum(), [w])
    with pytest.raises(RuntimeError, match="carry no graph; compute them with create_graph=True"):
        lowbit.hessian_vector_product(plain, [w], v[:1])
    with pytest.raises(ValueError, match="as many gradients, parameters and vectors"):
        lowbit.hessian_vector_product(grads, [w, c], v[:1])


def test_hutchinson_is_unbiased_within_its_standard_error():
    """E[z * (H z)] = diag(H); entry i has variance sum_{j != i} H_ij^2 per probe."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = a + a.T
    p = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(0.5 * p @ H @ p, [p], create_graph=True)
    probes = 2000
    estimate = lowbit.hutchinson_diagonal(grads, [p], probes, generator=torch.Generator().manual_seed(4))[0]
    off = H - torch.diag(torch.diag(H))
    standard_error = torch.sqrt((off ** 2).sum(1) / probes)
    assert ((estimate - torch.diag(H)).abs() <= 5 * standard_error).all()
    # ... and not vacuously: one probe errs per entry by about sqrt(sum_j H_ij^2) =
    # sqrt(probes) standard errors (44.7): it fails the tolerance above, the average passes.
    one = lowbit.hutchinson_diagonal(grads, [p], 1, generator=torch.Generator().manual_seed(4))[0]
    assert bool(((one - torch.diag(H)).abs() > 5 * standard_error).any())
    # Same generator seed, same probes.
    twice = lowbit.hutchinson_diagonal(grads, [p], 1, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(one, twice)
    with pytest.raises(ValueError, match="probes must be an int >= 1"):
        lowbit.hutchinson_diagonal(grads, [p], 0)


# -------------------------------------------------------------- state dicts

class Coupled:
    """A loss with a non-diagonal Hessian, so the Hutchinson probes matter."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 5, generator=g)
        self.y = torch.randn(16, 3, generator=g)

    def loss(self, params):
        w, k, v = params
        h = torch.tanh(self.x @ w) + k.sum() * 0.1
        return ((h @ v[:4].view(4, 1) - self.y[:, :1]) ** 2).mean() + (w ** 2).sum() * 1e-3


def make_coupled_params():
    return make_params(80, [(5, 4), (2, 1, 2, 2), (7,)])


SETUPS = {
    "sophia-gnb": lambda ps: lowbit.Sophia(ps, lr=0.01, hessian_interval=2),
    "sophia-hutchinson": lambda ps: lowbit.Sophia(ps, lr=0.01, estimator="hutchinson", hessian_interval=2, seed=7),
    "adahessian": lambda ps: lowbit.AdaHessian(ps, lr=0.05, hessian_interval=2, seed=3),
    "mfac-4bit": lambda ps: lowbit.MFAC(ps, lr=0.01, momentum=0.9, window=3, bits=4, quant_block_size=16),
    "mfac-4bit-kashin": lambda ps: lowbit.MFAC(ps, lr=0.01, momentum=0.9, window=3, bits=4, mapping="kashin",
                                               quant_block_size=16),
    "mfac": lambda ps: lowbit.MFAC(ps, lr=0.01, momentum=0.5, window=3, weight_decay=0.01),
    "nag_gs": lambda ps: lowbit.NagGS(ps, lr=0.1, mu=0.5),
}


def train(opt, params, loss, steps, start=0):
    for t in range(start, start + steps):
        if isinstance(opt, lowbit.Sophia) and opt.param_groups[0]["estimator"] == "gnb" and opt.hessian_due():
            opt.zero_grad()
            random_grads(params, 500 + t)
            opt.update_hessian(8)
        if isinstance(opt, (lowbit.AdaHessian, lowbit.Sophia)) and \
                not (isinstance(opt, lowbit.Sophia) and opt.param_groups[0]["estimator"] == "gnb"):
            opt.step(closure_for(opt, params, loss.loss))
        else:
            opt.zero_grad()
            loss.loss(params).backward()
            opt.step()


def saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_resumed_run_is_bit_identical(name):
    loss = Coupled(9)
    params = make_coupled_params()
    opt = SETUPS[name](params)
    train(opt, params, loss, 3)
    checkpoint = saved(opt)
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = SETUPS[name](resumed_params)
    resumed.load_state_dict(checkpoint)
    train(opt, params, loss, 4, start=3)
    train(resumed, resumed_params, loss, 4, start=3)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert {k: v for k, v in opt.state_dict().items() if k != "state"} == \
        {k: v for k, v in resumed.state_dict().items() if k != "state"}
    for p, q in zip(params, resumed_params):
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_a_deep_copy_continues_identically():
    loss = Coupled(10)
    params = make_coupled_params()
    opt = SETUPS["sophia-hutchinson"](params)
    train(opt, params, loss, 2)
    twin = copy.deepcopy((opt, params))
    train(opt, params, loss, 3, start=2)
    train(twin[0], twin[1], loss, 3, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, twin[1]))


def snapshot(opt):
    sd = opt.state_dict()
    return {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}, copy.deepcopy(sd["param_groups"])


def assert_unchanged(opt, before):
    state, groups = snapshot(opt)
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for k in state:
        assert state[k].keys() == before[0][k].keys()
        assert all(torch.equal(state[k][n], before[0][k][n]) for n in state[k])


def tampered(sd, index, name, value):
    sd = copy.deepcopy(sd)
    sd["state"][index][name] = value
    return sd


@pytest.mark.parametrize("name, edit, message", [
    ("sophia-gnb", lambda sd: tampered(sd, 0, "exp_avg", torch.zeros(4, 5)),
     r'parameter 0 of param group 0 \(shape \[5, 4\]\): state "exp_avg" has shape \[4, 5\] but the parameter'),
    ("sophia-gnb", lambda sd: tampered(sd, 2, "hessian_v2", torch.zeros(7)), "unknown state hessian_v2"),
    ("adahessian", lambda sd: tampered(sd, 1, "step", torch.tensor(-1)), 'state "step" must hold an int >= 0'),
    ("nag_gs", lambda sd: tampered(sd, 0, "gamma", torch.tensor(-1.0, dtype=torch.float64)),
     'state "gamma" must be a one-element floating tensor, finite and > 0'),
    ("nag_gs", lambda sd: tampered(sd, 0, "gamma", torch.tensor(float("nan"), dtype=torch.float64)),
     'state "gamma" holds NaN or Inf'),
    ("mfac-4bit", lambda sd: tampered(sd, 0, "codes", torch.zeros(3, 5, dtype=torch.uint8)),
     r'M-FAC window tensor "codes" must be Byte of shape \[3, 10\]'),
    ("mfac", lambda sd: tampered(sd, 1, "gram", torch.zeros(3, 3)), 'M-FAC window tensor "gram" must be Double'),
    # A transposed parameter: same element count, so only the recorded shape tells.
    ("mfac-4bit", lambda sd: tampered(sd, 0, "shape", torch.tensor([4, 5])),
     r"window was made for a parameter of shape \[4, 5\] but the parameter has shape \[5, 4\]"),
    ("mfac", lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "bits": 8}]},
     "saved with different bits than this optimizer uses"),
    ("mfac", lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "damping": -1.0}]},
     r"damping must be > 0; got -1 \(saved param group 0\)"),
    ("sophia-hutchinson", lambda sd: {**sd, "param_groups": sd["param_groups"] + [{**sd["param_groups"][0], "params": []}]},
     "has 2 parameter groups"),
    ("sophia-hutchinson", lambda sd: {**sd, "param_groups": sd["param_groups"] * 2}, "parameter id 0 appears twice"),
    ("sophia-hutchinson", lambda sd: {**sd, "lowbit_steps": -3}, "lowbit_steps must be an int >= 0"),
])
def test_a_mismatched_state_dict_is_refused_and_changes_nothing(name, edit, message):
    loss = Coupled(11)
    params = make_coupled_params()
    opt = SETUPS[name](params)
    train(opt, params, loss, 2)
    before = snapshot(opt)
    good = saved(opt)
    with pytest.raises(ValueError, match=message + ".*nothing was loaded"):
        opt.load_state_dict(edit(good))
    assert_unchanged(opt, before)
    # ... and it goes on exactly like a twin that never saw the bad dict.
    twin_params = [p.detach().clone().requires_grad_(True) for p in params]
    twin = SETUPS[name](twin_params)
    twin.load_state_dict(good)
    train(opt, params, loss, 2, start=2)
    train(twin, twin_params, loss, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


# -------------------------------------------------------------- errors at step()

@pytest.mark.parametrize("cls", [lowbit.AdaHessian, lambda ps: lowbit.Sophia(ps, estimator="hutchinson")])
def test_a_missing_closure_or_graph_is_a_clear_error(cls):
    params = make_params(90, SHAPES)
    opt = cls(params)
    random_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"needs step\(closure\).*loss.backward\(create_graph=True\)"):
        opt.step()

    def first_order_closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"needs gradients with a graph.*create_graph=True.*nothing was updated"):
        opt.step(first_order_closure)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not any(opt.state[p] for p in params)


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("bad", ["nan", "inf", "sparse"])
def test_a_bad_gradient_raises_and_changes_nothing(name, bad):
    loss = Coupled(12)
    params = make_coupled_params()
    opt = SETUPS[name](params)
    train(opt, params, loss, 1)
    before_params = [p.detach().clone() for p in params]
    before = snapshot(opt)

    def poisoned_closure():
        opt.zero_grad()
        out = loss.loss(params)
        out.backward(create_graph=True)
        poison(params[1])
        return out

    def poison(p):
        if bad == "sparse":
            p.grad = torch.zeros_like(p).to_sparse()
        else:
            g = p.grad.detach().clone()
            g.view(-1)[3] = float(bad)
            p.grad = g

    if isinstance(opt, lowbit.MFAC) or isinstance(opt, lowbit.NagGS) or name == "sophia-gnb":
        random_grads(params, 1)
        poison(params[1])
        run = opt.step
    else:
        def run():
            return opt.step(poisoned_closure)
    message = "sparse gradient" if bad == "sparse" else "NaN or Inf gradient; nothing was updated"
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 0 \(shape \[2, 1, 2, 2\]\).*" + message):
        run()
    assert all(torch.equal(p, b) for p, b in zip(params, before_params))
    assert_unchanged(opt, before)
