"""lowbit.Shampoo(preconditioner="caspr") against an independent float64 CASPR written
here (Duvvuri et al., ICLR 2024): the Kronecker factors L, R of Shampoo, their inverse
square roots L~ = (L + ridge)^(-1/2), R~ = (R + ridge)^(-1/2) (ridge = epsilon *
lambda_max), J = L~ G + G R~ and U = L~ J + J R~, grafted to the norm of G and applied by
SGDM or AdamW. No lowbit code is used by the reference."""

from __future__ import annotations

import io
import math

import pytest
import torch

import lowbit
from conftest import clones, make_params, quick, set_grads
from test_reference import CASES, ReferenceShampoo


class ReferenceCaspr(ReferenceShampoo):
    """32-bit CASPR for one parameter, in float64: Shampoo's statistics and first-order
    rules (test_reference.ReferenceShampoo), CASPR's roots and combination."""

    def inverse_fourth_root(self, a: torch.Tensor) -> torch.Tensor:
        # The reference's root hook: CASPR uses the inverse *square* root.
        values, vectors = torch.linalg.eigh((a + a.T) / 2)
        values = values.clamp_min(0)
        ridge = self.epsilon * values.max()
        return (vectors * (values + ridge).pow(-0.5)) @ vectors.T

    def combine(self, lh: torch.Tensor, g: torch.Tensor, rh: torch.Tensor) -> torch.Tensor:
        # U = L~ J + J R~ with J = L~ G + G R~ (instead of Shampoo's L^-1/4 G R^-1/4).
        j = lh @ g + g @ rh
        return lh @ j + j @ rh


# fp32 against fp64: fp32 eigenvalues are off by ~u * lambda_max (u = 6e-8), a relative
# error u / epsilon = 6e-4 at the ridge (epsilon = 1e-4), and CASPR weighs them by
# (lambda + ridge)^(-1) (L~^2), so direction components carry up to ~6e-4 relative error;
# ten steps of lr <= 0.05 move a parameter by at most ~1: 2e-3 with a factor-3 slack (the
# bound of the C++ test, tests/caspr_test.cpp). The Shampoo reference lands > 20x farther.
TOLERANCE = 2e-3


@pytest.mark.parametrize("case", CASES, ids=["T1=T2=1", "T1=2,T2=3,start=2", "blocks of 16"])
@pytest.mark.parametrize("root_method", ["eigen", "newton"])
@pytest.mark.parametrize("graft", ["sgdm", "adamw"])
def test_fp32_caspr_matches_the_float64_reference(case, root_method, graft):
    lr = 0.05 if graft == "sgdm" else 0.01
    ref_options = dict(case, lr=lr, graft=graft, epsilon=1e-4, weight_decay=1e-3)
    params = make_params(2)
    refs = [ReferenceCaspr(p, **ref_options) for p in params]
    shampoo_refs = [ReferenceShampoo(p, **ref_options) for p in params]
    opt = lowbit.Shampoo(params, bits=32, root_method=root_method, preconditioner="caspr", **ref_options)
    for k in range(10):
        set_grads(params, 300 + k)
        for r, s, p in zip(refs, shampoo_refs, params):
            r.step(p.grad)
            s.step(p.grad)
        opt.step()
        for i, (p, r) in enumerate(zip(params, refs)):
            diff = (p.detach().double() - r.p).abs().max().item()
            assert diff < TOLERANCE, (i, k, diff)
    assert opt.root_updates() > 0
    # The check can tell CASPR from Shampoo: the references differ far beyond the tolerance.
    gap = max((r.p - s.p).abs().max().item() for r, s in zip(refs[:2], shampoo_refs[:2]))
    assert gap > 20 * TOLERANCE, gap


def test_caspr_is_not_shampoo():
    params = make_params(4)
    other = clones(params)
    caspr = lowbit.Shampoo(params, bits=32, preconditioner="caspr", **quick())
    shampoo = lowbit.Shampoo(other, bits=32, **quick())
    for k in range(8):
        set_grads(params, k)
        set_grads(other, k)
        caspr.step()
        shampoo.step()
    assert (params[0] - other[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("bits", [32, 4])
def test_state_dict_round_trip_continues_bit_identically(bits):
    params = make_params(5)
    opt = lowbit.Shampoo(params, bits=bits, preconditioner="caspr", **quick())
    for k in range(6):
        set_grads(params, k)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clones(params)
    resumed = lowbit.Shampoo(resumed_params, bits=bits, preconditioner="caspr", **quick())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["preconditioner"] == "caspr"
    for k in range(6, 14):
        set_grads(params, k)
        set_grads(resumed_params, k)
        opt.step()
        resumed.step()
    assert opt.root_updates() > 1
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_a_shampoo_state_dict_does_not_load_into_caspr():
    params = make_params(6)
    shampoo = lowbit.Shampoo(params, **quick())
    set_grads(params, 0)
    shampoo.step()
    caspr = lowbit.Shampoo(clones(params), preconditioner="caspr", **quick())
    with pytest.raises(ValueError, match="preconditioner"):
        caspr.load_state_dict(shampoo.state_dict())


def test_bad_preconditioner_is_refused_naming_the_option():
    with pytest.raises(ValueError, match='preconditioner must be one of "shampoo", "caspr", "soap"; got "kfac"'):
        lowbit.Shampoo(make_params(1), preconditioner="kfac")
    with pytest.raises(TypeError, match="preconditioner must be a str"):
        lowbit.Shampoo(make_params(1), preconditioner=2)


def test_preconditioner_cannot_change_after_the_first_step():
    params = make_params(7)
    opt = lowbit.Shampoo(params, **quick())
    set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["preconditioner"] = "caspr"
    set_grads(params, 1)
    with pytest.raises((ValueError, RuntimeError), match="preconditioner"):
        opt.step()
    assert math.isfinite(params[0].sum().item())
