"""lowbit.KFAC / SGDMBK / AdamWBK: one step against a float64 reference written here (its own
patch extraction with F.unfold and its own hooks), bit-identical resume through state_dict,
and errors that leave the optimizer and the parameters unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit

U = 2.0 ** -24  # fp32 unit roundoff


def model(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 5, bias=bias))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def reference_factors(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A, G and D = [dW, db] of both layers in float64 (KFC: A = (1/B) sum_it a a^T,
    G = (1/(B T)) sum_it Ds Ds^T with Ds = B dL/ds)."""
    net64 = nn.Sequential(*[m for m in __import__("copy").deepcopy(net)]).double()
    conv, lin = net64[0], net64[3]
    x = x.double()
    outs = {}
    h = conv(x)
    h.retain_grad()
    z = net64[2](net64[1](h))
    o = lin(z)
    o.retain_grad()
    F.cross_entropy(o, y).backward()
    b = x.shape[0]
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)  # [B T, 27]
    zin = z.detach()
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=patches.dtype)], 1)
        zin = torch.cat([zin, torch.ones(b, 1, dtype=zin.dtype)], 1)
    ds_conv = (h.grad * b).permute(0, 2, 3, 1).reshape(-1, 4)
    ds_lin = o.grad * b
    result = []
    for layer, a, ds, t in ((conv, patches, ds_conv, 9), (lin, zin, ds_lin, 1)):
        d = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            d = torch.cat([d, layer.bias.grad.reshape(-1, 1)], 1)
        result.append((a.T @ a / b, ds.T @ ds / (b * t), d))
    return result


def power(f, exponent, absolute, relative):
    v, q = torch.linalg.eigh(f)
    v = v.clamp_min(0)
    return (q * (v + absolute + relative * v.max()) ** exponent) @ q.T


def flat(layer):
    d = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return torch.cat([d, layer.bias.detach().reshape(-1, 1)], 1) if layer.bias is not None else d


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["kfac", "kfac-pi", "adamw-bk"])
def test_one_step_matches_float64_reference(bias, kind):
    net = model(bias)
    x, y = batch(1)
    refs = reference_factors(net, x, y)
    if kind.startswith("kfac"):
        opt = lowbit.KFAC(net, lr=0.1, damping=0.05, stat_interval=1, root_interval=1,
                          damping_mode="pi" if kind == "kfac-pi" else "tikhonov")
    else:
        opt = lowbit.AdamWBK(net, lr=0.1, eps=1.0, damping_input=1e-2, damping_output=1e-2, stat_interval=1,
                             root_interval=1)
    before = [flat(net[0]).double(), flat(net[3]).double()]
    F.cross_entropy(net(x), y).backward()
    opt.step()
    for (a, g, d), layer, old in zip(refs, (net[0], net[3]), before):
        pi_term = 0.0
        if kind.startswith("kfac"):
            # pi-damping (Martens & Grosse 2015, sec. 6.3): A + pi lambda I, G + (lambda / pi) I.
            pi = math.sqrt((float(a.trace()) / len(a)) / (float(g.trace()) / len(g))) if kind == "kfac-pi" else 1.0
            direction = power(g, -1, 0.05 / pi, 0) @ d @ power(a, -1, 0.05 * pi, 0)
            expected = -0.1 * direction  # the momentum buffer starts at the first direction
            kappa = torch.linalg.cond(g + 0.05 / pi * torch.eye(len(g), dtype=g.dtype)) + \
                torch.linalg.cond(a + 0.05 * pi * torch.eye(len(a), dtype=a.dtype))
            # The optimizer's pi: fp32 traces of n positive entries err by n u, pi by half the
            # ratio's (n_A + n_G + 2) u, + 2 u; a relative change delta of a damping perturbs each
            # damped factor by <= delta relative, amplified by its inverse's condition (kappa).
            if kind == "kfac-pi":
                pi_term = ((len(a) + len(g) + 2) / 2 + 2) * U * float(kappa)
        else:
            direction = power(g, -0.5, 0, 1e-2) @ d @ power(a, -0.5, 0, 1e-2)
            direction = direction * d.norm() / (direction.norm() + 1e-12)
            expected = -0.1 * direction / (direction.abs() + 1.0)  # AdamW step 1: m / (sqrt(v) + eps)
            kappa = 2 * math.sqrt(1 / 1e-2)
        change = flat(layer).double() - old
        # fp32 sums of k = B T + n_A + n_G terms err by k u; the inverse roots amplify a relative
        # perturbation by their condition kappa; x 4 for the two roots and the products.
        k = 8 * 9 + a.shape[0] + g.shape[0]
        bound = 4 * k * U * float(kappa) + 8 * U + pi_term
        error = float((change - expected).norm() / expected.norm())
        assert error < bound


def run(opt_factory, steps, seed0=10):
    net = model(True)
    opt = opt_factory(net)
    for s in range(steps):
        x, y = batch(seed0 + s)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("factory", [
    lambda net: lowbit.SGDMBK(net, lr=0.05, stat_interval=2, root_interval=3, factor="eigen4"),
    lambda net: lowbit.KFAC(net, lr=0.05, stat_interval=2, root_interval=3, factor="naive4", kl_clip=1e-3),
])
def test_resume_is_bit_identical(factory):
    straight, _ = run(factory, 7)
    net, opt = run(factory, 4)
    saved = {k: v.clone() for k, v in opt.state_dict()["state"].items()}
    lr = opt.state_dict()["lr"]
    fresh = model(True)
    fresh.load_state_dict(net.state_dict())
    opt2 = factory(fresh)
    opt2.load_state_dict({"state": saved, "lr": lr})
    for s in range(4, 7):
        x, y = batch(10 + s)
        opt2.zero_grad()
        F.cross_entropy(fresh(x), y).backward()
        opt2.step()
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_bad_input_changes_nothing():
    net, opt = run(lambda n: lowbit.AdamWBK(n, stat_interval=2, root_interval=3, factor="eigen4"), 3)
    state = {k: v.clone() for k, v in opt.state_dict()["state"].items()}
    params = [p.detach().clone() for p in net.parameters()]

    def unchanged():
        now = opt.state_dict()["state"]
        assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
        assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))

    x, y = batch(50)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    net[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        opt.step()
    unchanged()
    bad = dict(state)
    bad["layer0.G.statistic"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="layer0.G."):
        opt.load_state_dict({"state": bad, "lr": 1e-3})
    unchanged()
    with pytest.raises(RuntimeError, match="KfacOptions.damping"):
        lowbit.KFAC(model(False), damping=-1.0)
    with pytest.raises(RuntimeError, match="damping_mode"):
        lowbit.KFAC(model(False), damping_mode="factored")
    with pytest.raises(TypeError, match="must be the model"):
        lowbit.KFAC(list(net.parameters()))
