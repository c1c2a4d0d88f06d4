"""lowbit.Shampoo against an independent pure-PyTorch Shampoo written here from the paper
(Wang et al. 2024, ../shared/reference/4bit-shampoo.md): dense fp64 statistics, inverse
fourth roots by eigendecomposition, grafting by norm, SGDM or AdamW. No lowbit code is
used by the reference."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch

import lowbit
from conftest import clones, make_params, set_grads


class ReferenceShampoo:
    """32-bit Shampoo of the paper for one parameter, in float64."""

    def __init__(self, p: torch.Tensor, *, lr: float, graft: str, momentum: float = 0.9, nesterov: bool = False,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, stat_decay: float = 0.95,
                 epsilon: float = 1e-6, stat_interval: int = 1, root_interval: int = 1,
                 start_preconditioning_step: int = 1, max_preconditioner_dim: int = 1200) -> None:
        self.p = p.detach().to(torch.float64).clone()
        self.lr, self.graft, self.momentum, self.nesterov = lr, graft, momentum, nesterov
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.beta, self.epsilon = stat_decay, epsilon
        self.t1, self.t2, self.start = stat_interval, root_interval, start_preconditioning_step
        self.k = 0
        self.buf: Optional[torch.Tensor] = None
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)
        # Shape rule of the paper: drop unit dimensions, view (d0, rest), chunks of max_dim.
        dims = [d for d in p.shape if d != 1]
        self.blocks: List[dict] = []
        if len(dims) >= 2:
            self.rows, self.cols = dims[0], math.prod(dims[1:])
            n = max_preconditioner_dim
            for r in range(0, self.rows, n):
                for c in range(0, self.cols, n):
                    m, k = min(n, self.rows - r), min(n, self.cols - c)
                    self.blocks.append(dict(r=r, m=m, c=c, n=k, L=epsilon * torch.eye(m, dtype=torch.float64),
                                            R=epsilon * torch.eye(k, dtype=torch.float64), Lh=None, Rh=None))

    def inverse_fourth_root(self, a: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh((a + a.T) / 2)
        values = values.clamp_min(0)
        ridge = self.epsilon * values.max()
        return (vectors * (values + ridge).pow(-0.25)) @ vectors.T

    def combine(self, lh: torch.Tensor, g: torch.Tensor, rh: torch.Tensor) -> torch.Tensor:
        """A block's preconditioned gradient from its roots: Shampoo's L^-1/4 G R^-1/4."""
        return lh @ g @ rh

    def step(self, grad: torch.Tensor) -> None:
        self.k += 1
        g = grad.to(torch.float64)
        d = g
        if self.blocks:
            gm = g.reshape(self.rows, self.cols)
            out = gm.clone()
            for b in self.blocks:
                gb = gm[b["r"]:b["r"] + b["m"], b["c"]:b["c"] + b["n"]]
                if self.k % self.t1 == 0:
                    b["L"] = self.beta * b["L"] + (1 - self.beta) * gb @ gb.T
                    b["R"] = self.beta * b["R"] + (1 - self.beta) * gb.T @ gb
                if self.k >= self.start and self.k % self.t2 == 0:
                    b["Lh"], b["Rh"] = self.inverse_fourth_root(b["L"]), self.inverse_fourth_root(b["R"])
                if self.k >= self.start and b["Lh"] is not None:
                    ghat = self.combine(b["Lh"], gb, b["Rh"])
                    out[b["r"]:b["r"] + b["m"], b["c"]:b["c"] + b["n"]] = ghat * gb.norm() / (ghat.norm() + 1e-12)
            d = out.reshape(g.shape)
        if self.graft == "sgdm":
            d = d + self.weight_decay * self.p
            self.buf = d.clone() if self.buf is None else self.momentum * self.buf + d
            d = d + self.momentum * self.buf if self.nesterov else self.buf
            self.p = self.p - self.lr * d
        else:
            b1, b2 = self.betas
            self.p = self.p * (1 - self.lr * self.weight_decay)
            self.m = b1 * self.m + (1 - b1) * d
            self.v = b2 * self.v + (1 - b2) * d * d
            denom = (self.v / (1 - b2 ** self.k)).sqrt() + self.eps
            self.p = self.p - self.lr / (1 - b1 ** self.k) * self.m / denom


CASES = [
    dict(stat_interval=1, root_interval=1, start_preconditioning_step=1, max_preconditioner_dim=1200),
    dict(stat_interval=2, root_interval=3, start_preconditioning_step=2, max_preconditioner_dim=1200),
    dict(stat_interval=1, root_interval=2, start_preconditioning_step=1, max_preconditioner_dim=16),
]


U32 = 2.0 ** -24  # unit roundoff of fp32
NEWTON_TOLERANCE = 1e-6  # inverse_root_newton's stopping residual (and power iteration's)


class Fp32ErrorBudget:
    """First-order bound on ||p_fp32 - p_ref||_F for an fp32 implementation of the reference's
    algorithm fed the same gradients: the derivation of tests/shampoo_reference.h (C++), items
    1-5, plus AdamW for the "adamw" graft. In short: statistic rounding (a few u per update,
    decaying with beta); the eigh's backward error N u ||A||_F (LAPACK's approximate bounds take
    p(N) = 1, we take N) and the ridge it moves; its forward effect on the root through the
    divided differences F_ij of f(x) = (x + ridge)^(-1/4) (Daleckii-Krein: ||df(A) h|| <=
    eta max_i sqrt(sum_j F_ij^2 (V^T h)_j^2) for a vector h, so u kappa / 4 with kappa = ||A|| /
    (lambda_min + ridge) <= 1/epsilon only on the directions h excites); forming the root
    (N u |V| f |V|^T) and the two products ((m + n) u |Lr||G||Rr|); Newton's stopping residual
    ((N + 1) tau / 4 relative); grafting (2 ||dGhat|| ||G|| / ||Ghat|| + 3u ||G||). Then the
    first-order rule in fp32:
    - SGDM: buffer error b <- mu b + ||dD|| + wd E + u (mu ||buf_old|| + ||buf|| + wd ||p||),
      E <- E + lr b + u (||p|| + lr ||buf||).
    - AdamW works per element, so the direction error is bounded per element too: the L root's
      error on column c of H = G Rr by eta_L max_i sqrt(sum_j F_ij^2 (V^T H_c)_j^2), the R
      root's on row r of K = Lr G likewise, the rounding terms elementwise, and the grafting
      scale s = ||G|| / ||Ghat|| by s ||dGhat|| / ||Ghat||: |dD_e| <= s (|dGhat_e| + |Ghat_e|
      ||dGhat|| / ||Ghat||) + 3u |D_e|. Then |dm_e| <= sum_j (1 - b1) b1^(k-j) |dD_j,e| and, by
      the triangle inequality in the weighted 2-norm, |d sqrt(v_e)| <= sqrt(sum_j (1 - b2)
      b2^(k-j) dD_j,e^2); fp32 rounding of the moments adds e_m <- b1 e_m + 2u (|m_old| + |D| +
      |m|) and e_v <- b2 e_v + 2u (v_old + D^2 + v) (|d sqrt(v)| <= min(sqrt(e_v),
      e_v / (2 sqrt(v))), the square root being concave); the step
      lr m^ / (sqrt(v^) + eps) moves by lr (|dm^| + |m^| |d sqrt(v^)| / denom) / denom, plus
      8u of itself for the square root, the bias corrections, eps, the division and lr;
      E <- E (1 - lr wd) + ||that||_F + u (||p|| + lr wd ||p||)."""

    def __init__(self, ref: "ReferenceShampoo", newton: bool) -> None:
        self.ref, self.newton = ref, newton
        self.stat_error = [[U32 * b["L"].norm().item(), U32 * b["R"].norm().item()] for b in ref.blocks]
        self.roots: List[Optional[tuple]] = [None for _ in ref.blocks]
        self.buffer_error = 0.0
        self.param_error = 0.0
        self.direction_bounds: List[torch.Tensor] = []  # per step, per element |dD| bounds (AdamW)
        self.m_rounding = torch.zeros_like(ref.p)
        self.v_rounding = torch.zeros_like(ref.p)

    def _root(self, a: torch.Tensor, stat_error: float) -> dict:
        eps = self.ref.epsilon
        values, vectors = torch.linalg.eigh((a + a.T) / 2)
        values = values.clamp_min(0)
        ridge = eps * values.max()
        f = (values + ridge).pow(-0.25)
        fprime = (values + ridge).pow(-1.25) / 4
        gap = (values[:, None] - values[None, :]).abs()
        quotient = (f[:, None] - f[None, :]).abs() / gap.clamp_min(1e-300)
        tie = torch.maximum(fprime[:, None], fprime[None, :])  # |f'| decreasing: bound at the smaller one
        dd = torch.where(gap > 1e-8 * (values.max() + ridge), torch.minimum(quotient, tie), tie)
        n = a.shape[0]
        return dict(x=(vectors * f) @ vectors.T, v=vectors, f2=dd ** 2, w=(vectors.abs() * f) @ vectors.abs().T,
                    eta=(stat_error + n * U32 * a.norm().item()) * (1 + math.sqrt(n) * eps),
                    nu=(n + 1) * NEWTON_TOLERANCE / 4 if self.newton else 0.0)

    def after_step(self, grad: torch.Tensor, p_before: torch.Tensor, buf_before: Optional[torch.Tensor],
                   m_before: torch.Tensor, v_before: torch.Tensor) -> None:
        """Call right after ref.step(grad) with the reference's state from before it."""
        r, u = self.ref, U32
        g = grad.to(torch.float64)
        direction_error_sq = 0.0
        elementwise = torch.zeros(r.rows, r.cols, dtype=torch.float64) if r.blocks else torch.zeros_like(g)
        d = g.clone()
        if r.blocks:
            gm = g.reshape(r.rows, r.cols)
            d = gm.clone()
            for i, b in enumerate(r.blocks):
                rows, cols = slice(b["r"], b["r"] + b["m"]), slice(b["c"], b["c"] + b["n"])
                gb = gm[rows, cols]
                g_norm = gb.norm().item()
                if r.k % r.t1 == 0:
                    for side, (stat, inner) in enumerate(((b["L"], b["n"]), (b["R"], b["m"]))):
                        self.stat_error[i][side] = (r.beta * self.stat_error[i][side] + (1 - r.beta) * inner * u * g_norm ** 2
                                                    + 2 * u * stat.norm().item())
                if r.k >= r.start and r.k % r.t2 == 0:
                    self.roots[i] = (self._root(b["L"], self.stat_error[i][0]), self._root(b["R"], self.stat_error[i][1]))
                if r.k >= r.start and self.roots[i] is not None:
                    lr_, rr_ = self.roots[i]
                    lx, rx = lr_["x"], rr_["x"]
                    l2, r2 = torch.linalg.matrix_norm(lx, 2).item(), torch.linalg.matrix_norm(rx, 2).item()
                    h, k = gb @ rx, lx @ gb  # what the L root and the R root act on
                    ghat = k @ rx
                    # Per column of H / per row of K, then per element (item 3 and 4, elementwise).
                    col_l = (lr_["f2"] @ (lr_["v"].T @ h).pow(2)).max(0).values.sqrt()
                    row_r = ((k @ rr_["v"]).pow(2) @ rr_["f2"]).max(1).values.sqrt()
                    err = lr_["eta"] * col_l[None, :] + rr_["eta"] * row_r[:, None]
                    err = err + b["m"] * u * (lr_["w"] @ h.abs()) + b["n"] * u * (k.abs() @ rr_["w"])
                    err = err + lr_["nu"] * l2 * h.norm(dim=0)[None, :] + rr_["nu"] * r2 * k.norm(dim=1)[:, None]
                    err = err + (b["m"] + b["n"]) * u * (lx.abs() @ gb.abs() @ rx.abs())
                    # The same in Frobenius norm (the column / row bounds squared and summed).
                    dghat = (lr_["eta"] * col_l.norm() + rr_["eta"] * row_r.norm()).item()
                    dghat += b["m"] * u * (lr_["w"] @ h.abs()).norm().item() + b["n"] * u * (k.abs() @ rr_["w"]).norm().item()
                    dghat += lr_["nu"] * l2 * h.norm().item() + rr_["nu"] * r2 * k.norm().item()
                    dghat += (b["m"] + b["n"]) * u * (lx.abs() @ gb.abs() @ rx.abs()).norm().item()
                    ghat_norm = ghat.norm().item()
                    scale = g_norm / ghat_norm
                    dd = 2 * dghat * scale + 3 * u * g_norm
                    direction_error_sq += dd * dd
                    elementwise[rows, cols] = scale * (err + ghat.abs() * dghat / ghat_norm) + 3 * u * scale * ghat.abs()
                    d[rows, cols] = ghat * scale
            elementwise, d = elementwise.reshape(g.shape), d.reshape(g.shape)
        d_err = math.sqrt(direction_error_sq)
        p_norm, wd = p_before.norm().item(), r.weight_decay
        if r.graft == "sgdm":
            old = 0.0 if buf_before is None else buf_before.norm().item()
            buf = r.buf.norm().item()
            self.buffer_error = (r.momentum * self.buffer_error + d_err + wd * self.param_error
                                 + u * (r.momentum * old + buf + wd * p_norm))
            self.param_error += r.lr * self.buffer_error + u * (r.p.norm().item() + r.lr * buf)
        else:
            b1, b2 = r.betas
            k = r.k
            self.direction_bounds.append(elementwise)
            dm = sum((1 - b1) * b1 ** (k - j) * e for j, e in enumerate(self.direction_bounds, start=1))
            dsv = sum((1 - b2) * b2 ** (k - j) * e * e for j, e in enumerate(self.direction_bounds, start=1)).sqrt()
            self.m_rounding = b1 * self.m_rounding + 2 * u * (m_before.abs() + d.abs() + r.m.abs())
            self.v_rounding = b2 * self.v_rounding + 2 * u * (v_before + d * d + r.v)
            m_hat = r.m / (1 - b1 ** k)
            denom = (r.v / (1 - b2 ** k)).sqrt() + r.eps
            step = r.lr * m_hat / denom
            dm_hat = (dm + self.m_rounding) / (1 - b1 ** k)
            # sqrt(v + e) - sqrt(v) <= min(sqrt(e), e / (2 sqrt(v))) (concavity)
            v_sqrt_rounding = torch.minimum(self.v_rounding.sqrt(), self.v_rounding / (2 * r.v.sqrt()).clamp_min(1e-300))
            dsv_hat = (dsv + v_sqrt_rounding) / math.sqrt(1 - b2 ** k)
            dstep = r.lr * (dm_hat + m_hat.abs() * dsv_hat / denom) / denom + 8 * u * step.abs()
            self.param_error = (self.param_error * (1 - r.lr * wd) + dstep.norm().item()
                                + u * (r.p.norm().item() + r.lr * wd * p_norm))

    def bound(self) -> float:
        return self.param_error


@pytest.mark.parametrize("case", CASES, ids=["T1=T2=1", "T1=2,T2=3,start=2", "blocks of 16"])
@pytest.mark.parametrize("root_method", ["eigen", "newton"])
@pytest.mark.parametrize("graft", ["sgdm", "adamw"])
def test_fp32_shampoo_matches_the_reference(case, root_method, graft):
    """fp32 lowbit.Shampoo against the fp64 reference within the derived Fp32ErrorBudget, in
    ||.||_F at every step. (The old fixed 2e-4 on max |diff| failed at 2.24e-4 on an AVX-512
    Xeon: the conditioning enters as kappa / 4 with kappa up to 1/epsilon = 1e4, not as
    kappa^(1/4).) Measured (MKL AVX-512, AVX2, SSE4.2): at most 3e-3 of the bound on the
    preconditioned parameters once preconditioning has started, 0.49 (SGDM) / 0.07 (AdamW) on
    the others, whose bound is plain fp32 rounding. The bound still sees a slip: the reference
    with statistics every T1 + 1 steps lands 12x to 360x outside it with SGDM, 2x to 56x with
    AdamW (a property of the fp64 trajectories; ours is within 1e-2 of the bound of them)."""
    lr = 0.05 if graft == "sgdm" else 0.01
    options = dict(case, lr=lr, graft=graft, bits=32, epsilon=1e-4, root_method=root_method,
                   weight_decay=1e-3)
    params = make_params(2)
    ref_options = {k: v for k, v in options.items() if k not in ("bits", "root_method")}
    refs = [ReferenceShampoo(p, **ref_options) for p in params]
    slipped = [ReferenceShampoo(p, **dict(ref_options, stat_interval=case["stat_interval"] + 1)) for p in params]
    budgets = [Fp32ErrorBudget(r, newton=root_method == "newton") for r in refs]
    opt = lowbit.Shampoo(params, **options)
    for k in range(10):
        set_grads(params, 300 + k)
        for r, s, budget, p in zip(refs, slipped, budgets, params):
            before = (r.p.clone(), None if r.buf is None else r.buf.clone(), r.m.clone(), r.v.clone())
            r.step(p.grad)
            s.step(p.grad)
            budget.after_step(p.grad, *before)
        opt.step()
        for i, (p, r, budget) in enumerate(zip(params, refs, budgets)):
            diff = (p.detach().double() - r.p).norm().item()
            assert diff <= budget.bound(), f"parameter {i} step {k}: |diff|_F {diff:.3g} > bound {budget.bound():.3g}"
    assert opt.root_updates() > 0
    # Sharpness: statistics updated a step late must land outside the bound (the two
    # preconditioned parameters).
    for i in range(2):
        slip = (params[i].detach().double() - slipped[i].p).norm().item()
        assert slip > budgets[i].bound(), f"parameter {i}: slipped reference only {slip:.3g} from ours"


def mixer(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """A symmetric matrix with eigenvalues log-spaced over [1, cond] in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return ((q * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T).float()


def direction_errors(bits: int, eigen_update: str, steps: int = 30):
    """Per step: ||d - d_ref|| / ||d_ref|| of lowbit's step direction d against exact Shampoo's
    d_ref, and the same for the raw gradient. SGD with lr 1 and no momentum makes the
    step the direction itself; the gradients are fixed in advance, so both optimizers
    see identical statistics and only the preconditioner's storage differs."""
    shapes = [(96, 80), (64, 3, 3, 3)]
    gen = torch.Generator().manual_seed(1)
    # Correlated gradients G = A Z B (A, B of condition 30): Shampoo's direction is far from G.
    mix = [(mixer(s[0], 30, gen), mixer(math.prod(s[1:]), 30, gen)) for s in shapes]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    options = dict(lr=1.0, graft="sgdm", momentum=0.0, epsilon=1e-4, stat_interval=1, root_interval=1)
    opt = lowbit.Shampoo(params, bits=bits, eigen_update=eigen_update, min_quant_numel=256, **options)
    refs = [ReferenceShampoo(p, **options) for p in params]
    errors, gradient_errors = [], []
    for _ in range(steps):
        before = [p.detach().clone() for p in params] + [r.p.clone() for r in refs]
        for p, r, (a, b) in zip(params, refs, mix):
            p.grad = (a @ torch.randn(a.shape[0], b.shape[0], generator=gen) @ b).reshape(p.shape)
            r.step(p.grad)
        opt.step()
        for i, (p, r) in enumerate(zip(params, refs)):
            d, d_ref = (before[i] - p.detach()).double(), before[len(params) + i] - r.p
            errors.append(((d - d_ref).norm() / d_ref.norm()).item())
            gradient_errors.append(((p.grad.double() - d_ref).norm() / d_ref.norm()).item())
    return sum(errors) / len(errors), sum(gradient_errors) / len(gradient_errors)


# Error of low-bit Shampoo: the mean relative error of the step direction against exact
# (fp64, unquantized) Shampoo over 30 steps that update statistics and roots every step
# (T1 = T2 = 1, the most re-quantization), blocks of 96/80 and 64/27. Measured 0.28 with
# "eigh", 0.31 with the paper's QR step, 0.02 at 8 bits; the raw gradient ~0.5. Each
# inverse root has NRE ~0.06 from its 4-bit eigenvectors (docs/quant_error.md, the paper's
# Table 1), ~0.09 with its 4-bit off-diagonal, and the error compounds through statistics
# rebuilt from quantized eigenvectors, so no bound follows from the codec alone without a
# fitted factor. What does follow, with no tolerance: 8-bit codes err at most 1/8 as much
# per entry as 4-bit ones (the linear-2 tables' largest rounding errors: 0.0078 and 0.1244),
# so 8-bit Shampoo is closer to exact Shampoo than 4-bit Shampoo is; and low-bit Shampoo is
# closer to exact Shampoo than the raw gradient is (else preconditioning did nothing). The
# paper's step with its QR by CholeskyQR2 ("cholesky_qr") is the same maths (tests/linalg_test.cpp
# bounds its Q against a Householder one), so it must be closer than the gradient as well.
def test_low_bit_shampoo_is_closer_to_the_reference_than_coarser_storage_and_the_gradient():
    variants = ((8, "eigh"), (4, "eigh"), (4, "qr"), (4, "cholesky_qr"))
    errors = {(bits, update): direction_errors(bits, update) for bits, update in variants}
    gradient_error = errors[(4, "eigh")][1]
    assert errors[(8, "eigh")][0] < errors[(4, "eigh")][0] < gradient_error, errors
    assert errors[(4, "qr")][0] < gradient_error, errors
    assert errors[(4, "cholesky_qr")][0] < gradient_error, errors
