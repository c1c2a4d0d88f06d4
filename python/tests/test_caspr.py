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


U32 = 2.0 ** -24


def conditioning(a: torch.Tensor, epsilon: float) -> float:
    """kappa of the regularized statistic a + epsilon lambda_max I whose root is taken."""
    values = torch.linalg.eigvalsh((a + a.T) / 2).clamp_min(0)
    ridge = epsilon * values[-1]
    return ((values[-1] + ridge) / (values[0] + ridge)).item()


@pytest.mark.parametrize("case", CASES, ids=["T1=T2=1", "T1=2,T2=3,start=2", "blocks of 16"])
@pytest.mark.parametrize("root_method", ["eigen", "newton"])
@pytest.mark.parametrize("graft", ["sgdm", "adamw"])
def test_fp32_caspr_matches_the_float64_reference(case, root_method, graft):
    """fp32 against fp64, the distance accumulated step by step from the reference's own
    quantities (u = 2^-24):
    - the rounding of p (weight decay or momentum, then the update): 2u max|p| per step;
    - a relative error delta of the step: an fp32 inverse square root of a statistic with
      condition number kappa (of L + ridge, ridge = epsilon lambda_max; at most 1 + 1 /
      epsilon) errs by 1/2 n u kappa (a backward error n u ||L|| of the fp32 statistic and
      its eigh, through x^(-1/2)); the coupled Newton iteration stops 1e-6 from its fixed
      point and its power-iteration lambda_max is 1e-6 off (5e-7 on the root): 1.5e-6 more.
      U = L~^2 G + 2 L~ G R~ + G R~^2 holds two roots per term: delta = 2 (1/2 n u kappa
      [+ 1.5e-6]), with kappa the largest so far (the roots in use come from earlier
      statistics), times the reference's step |dp| (momentum mixes earlier directions,
      each within delta)."""
    lr = 0.05 if graft == "sgdm" else 0.01
    epsilon = 1e-4
    ref_options = dict(case, lr=lr, graft=graft, epsilon=epsilon, weight_decay=1e-3)
    params = make_params(2)
    refs = [ReferenceCaspr(p, **ref_options) for p in params]
    shampoo_refs = [ReferenceShampoo(p, **ref_options) for p in params]
    opt = lowbit.Shampoo(params, bits=32, root_method=root_method, preconditioner="caspr", **ref_options)
    tolerance = [0.0] * len(params)
    kappa = [1.0] * len(params)
    newton = 1.5e-6 if root_method == "newton" else 0.0
    for k in range(10):
        set_grads(params, 300 + k)
        before = [r.p.clone() for r in refs]
        for r, s, p in zip(refs, shampoo_refs, params):
            r.step(p.grad)
            s.step(p.grad)
        opt.step()
        for i, (p, r) in enumerate(zip(params, refs)):
            order = max((max(b["m"], b["n"]) for b in r.blocks), default=1)
            for b in r.blocks:
                kappa[i] = max(kappa[i], conditioning(b["L"], epsilon), conditioning(b["R"], epsilon))
            delta = 2 * (0.5 * order * U32 * kappa[i] + newton) if r.blocks else 4 * U32
            tolerance[i] += 2 * U32 * r.p.abs().max().item() + delta * (r.p - before[i]).abs().max().item()
            diff = (p.detach().double() - r.p).abs().max().item()
            assert diff <= tolerance[i], (i, k, diff, tolerance[i])
    assert opt.root_updates() > 0
    # The check can tell CASPR from Shampoo: the references differ beyond the tolerance.
    gap = max((r.p - s.p).abs().max().item() for r, s in zip(refs[:2], shampoo_refs[:2]))
    assert gap > max(tolerance[:2]), (gap, tolerance)


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
    # Further apart than the rounding of eight fp32 steps (2u max|p| each) could put them.
    assert (params[0] - other[0]).abs().max().item() > 8 * 2 * U32 * other[0].abs().max().item()


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
