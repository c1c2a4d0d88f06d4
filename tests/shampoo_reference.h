// An independent dense fp64 Shampoo for the tests: same algorithm as the paper's
// 32-bit Shampoo with norm grafting, written with plain ATen calls and no lowbit code.
// With `caspr`, CASPR (Duvvuri et al. 2024) on the same statistics: Lt = (L + ridge)^(-1/2),
// Rt = (R + ridge)^(-1/2), J = Lt G + G Rt, U = Lt J + J Rt.
//
// Alongside its fp64 trajectory the reference carries fp32_error_bound(): a first-order
// bound on ||p_fp32 - p_ref||_F for an fp32 implementation of the same algorithm fed the
// same gradients (the gradients do not depend on the parameters, so errors add up and are
// never fed back through the loss). The budget, with u = 2^-24 and N the order of a factor:
//  1. Statistic. Each update L <- beta L + (1 - beta) G G^T rounds the product
//     (|fl(G G^T) - G G^T| <= n u |G| |G|^T, n = G's inner dimension, so
//     <= (1 - beta) n u ||G||_F^2 in Frobenius norm) and the sum (2u ||L||_F); older
//     errors decay with beta: e <- beta e + (1 - beta) n u ||G||_F^2 + 2u ||L||_F.
//  2. Root, backward error. An fp32 eigh is backward stable: exact for A + E with
//     ||E||_F <= p(N) u ||A||_F; LAPACK's own approximate error bounds take p(N) = 1, we take
//     p(N) = N. The ridge epsilon * lambda_max moves with lambda_max by <= epsilon ||E||, a
//     shift of ||.||_F <= sqrt(N) epsilon ||E||. So eta = (e + N u ||A||_F)(1 + sqrt(N) epsilon).
//  3. Root, forward error. For f(x) = (x + ridge)^(-1/p) and A = V diag(lambda) V^T the
//     Daleckii-Krein formula gives f(A + E) - f(A) = V (F o V^T E V) V^T to first order, with
//     F_ij the divided differences of f (|F_ij| <= |f'(min(lambda_i, lambda_j))|). Applied
//     to the matrix H it multiplies, row i of (F o E~) V^T H has norm
//     <= sqrt(sum_j F_ij^2 ||(V^T H)_j||^2) ||E~_i||, so ||df(A) H||_F <= eta c(H) with
//     c(H) = max_i sqrt(sum_j F_ij^2 ||(V^T H)_j||^2). This is where the conditioning enters:
//     F_ij reaches (1/p)(lambda_min + ridge)^(-1 - 1/p) (a relative error of up to
//     (1/p) u kappa, kappa = ||A|| / (lambda_min + ridge) <= 1/epsilon) only for pairs of small
//     eigenvalues that H actually excites. Forming V diag(f) V^T in fp32 adds
//     |dX| <= N u |V| diag(f) |V|^T =: N u W; the coupled Newton iteration (instead of eigh)
//     adds its stopping residual, ||M - I||_max <= tau = 1e-6 so X = (zA)^(-1/p) M^(1/p) is off
//     by (N + 1) tau / p relative (N tau for ||M - I||_2, tau for power iteration's
//     lambda_max in the ridge), and is otherwise taken as accurate as eigh (the coupled
//     iteration is stable, Iannazzo 2006; measured here it is more accurate than eigh).
//  4. Direction. Shampoo's Ghat = Lr G Rr: the L root error acts on H = G Rr, the R root's on
//     (Lr G)^T, plus (m + n) u || |Lr| |G| |Rr| ||_F for the two fp32 products. CASPR's
//     U = Lt J + J Rt with J = Lt G + G Rt: dLt acts on Lt G + 2 G Rt and, through Lt, on G,
//     dRt likewise, plus (m + n) u (|| |Lt| P ||_F + || P |Rt| ||_F) with P = |Lt||G| + |G||Rt|.
//     Grafting to ||G||_F: ||dD||_F <= 2 ||dGhat||_F ||G||_F / ||Ghat||_F + 3u ||G||_F.
//  5. SGD with momentum in fp32 (no weight decay here): the buffer error
//     b <- mu b + ||dD||_F + u (mu ||buf_old||_F + ||buf||_F) (a product and a sum rounded),
//     the parameter error E <- E + lr b + u (||p||_F + lr ||buf||_F).
// Items 1-4 are worst-case bounds and sit >= 100x above the realized error; item 5 alone
// (plain SGDM on an unpreconditioned parameter) is nearly attained (measured up to 0.43 of it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lowbit::testing {

struct ReferenceShampooConfig {
  double beta = 0.95, epsilon = 1e-6;
  int64_t stat_interval = 1, root_interval = 1, start = 1, max_dim = 1200;
  double lr = 0.1, momentum = 0.9;
  bool caspr = false;
  bool newton = false;  // the implementation's roots come from the coupled Newton iteration
};

class ReferenceShampooSgdm {
 public:
  static constexpr double kUnitRoundoff = 5.960464477539063e-08;  // 2^-24, fp32
  static constexpr double kNewtonTolerance = 1e-6;                 // inverse_root_newton's default

  ReferenceShampooSgdm(const at::Tensor& param, ReferenceShampooConfig c) : c_(c), p_(param.to(at::kDouble).clone()) {
    std::vector<int64_t> dims;
    for (int64_t d : param.sizes())
      if (d != 1) dims.push_back(d);
    if (dims.size() < 2) return;
    rows_ = dims[0];
    cols_ = p_.numel() / rows_;
    for (int64_t r = 0; r < rows_; r += c.max_dim)
      for (int64_t col = 0; col < cols_; col += c.max_dim) {
        const int64_t m = std::min(c.max_dim, rows_ - r), n = std::min(c.max_dim, cols_ - col);
        Block b{r, m, col, n, c.epsilon * at::eye(m, at::kDouble), c.epsilon * at::eye(n, at::kDouble), {}, {}};
        b.stat_error_L = kUnitRoundoff * b.L.norm().item<double>();
        b.stat_error_R = kUnitRoundoff * b.R.norm().item<double>();
        blocks_.push_back(b);
      }
  }

  void step(const at::Tensor& grad) {
    ++k_;
    const double u = kUnitRoundoff;
    const at::Tensor g = grad.to(at::kDouble);
    at::Tensor d = g;
    double direction_error_sq = 0;
    if (!blocks_.empty()) {
      const at::Tensor gm = g.reshape({rows_, cols_});
      at::Tensor out = gm.clone();
      for (Block& b : blocks_) {
        const at::Tensor gb = gm.slice(0, b.r, b.r + b.m).slice(1, b.c, b.c + b.n);
        const double g_norm = gb.norm().item<double>();
        if (k_ % c_.stat_interval == 0) {
          b.L = c_.beta * b.L + (1 - c_.beta) * gb.mm(gb.t());
          b.R = c_.beta * b.R + (1 - c_.beta) * gb.t().mm(gb);
          b.stat_error_L = c_.beta * b.stat_error_L + (1 - c_.beta) * b.n * u * g_norm * g_norm + 2 * u * b.L.norm().item<double>();
          b.stat_error_R = c_.beta * b.stat_error_R + (1 - c_.beta) * b.m * u * g_norm * g_norm + 2 * u * b.R.norm().item<double>();
        }
        if (k_ >= c_.start && k_ % c_.root_interval == 0) {
          b.Lroot = inverse_root(b.L, b.stat_error_L);
          b.Rroot = inverse_root(b.R, b.stat_error_R);
        }
        if (k_ >= c_.start && b.Lroot.x.defined()) {
          const Root& lr = b.Lroot;
          const Root& rr = b.Rroot;
          const at::Tensor& lx = lr.x;
          const at::Tensor& rx = rr.x;
          const double l2 = at::linalg_matrix_norm(lx, 2).item<double>();
          const double r2 = at::linalg_matrix_norm(rx, 2).item<double>();
          const double ml = static_cast<double>(b.m), nr = static_cast<double>(b.n);
          at::Tensor ghat;
          double dghat;  // item 4: bound on ||fl(Ghat) - Ghat||_F
          if (c_.caspr) {
            const at::Tensor lg = lx.mm(gb), gr = gb.mm(rx), j = lg + gr;
            ghat = lx.mm(j) + j.mm(rx);
            const at::Tensor left = lg + 2 * gr, right = 2 * lg + gr;
            dghat = lr.eta * (lr.c_left(left) + l2 * lr.c_left(gb)) + rr.eta * (rr.c_right(right) + r2 * rr.c_right(gb));
            dghat += ml * u * (norm(lr.w.mm(left.abs())) + l2 * norm(lr.w.mm(gb.abs()))) +
                     nr * u * (norm(right.abs().mm(rr.w)) + r2 * norm(gb.abs().mm(rr.w)));
            dghat += lr.nu * l2 * (norm(left) + norm(lg)) + rr.nu * r2 * (norm(right) + norm(gr));
            const at::Tensor pabs = lx.abs().mm(gb.abs()) + gb.abs().mm(rx.abs());
            dghat += (ml + nr) * u * (norm(lx.abs().mm(pabs)) + norm(pabs.mm(rx.abs())));
          } else {
            const at::Tensor lg = lx.mm(gb), gr = gb.mm(rx);
            ghat = lg.mm(rx);
            dghat = lr.eta * lr.c_left(gr) + rr.eta * rr.c_right(lg);
            dghat += ml * u * norm(lr.w.mm(gr.abs())) + nr * u * norm(lg.abs().mm(rr.w));
            dghat += lr.nu * l2 * norm(gr) + rr.nu * r2 * norm(lg);
            dghat += (ml + nr) * u * norm(lx.abs().mm(gb.abs()).mm(rx.abs()));
          }
          const double ghat_norm = ghat.norm().item<double>();
          const double dd = 2 * dghat * g_norm / ghat_norm + 3 * u * g_norm;
          direction_error_sq += dd * dd;
          out.slice(0, b.r, b.r + b.m).slice(1, b.c, b.c + b.n).copy_(ghat * g_norm / (ghat_norm + 1e-12));
        }
      }
      d = out.reshape(g.sizes());
    }
    const double old_buf_norm = buf_.defined() ? buf_.norm().item<double>() : 0.0;
    buf_ = buf_.defined() ? c_.momentum * buf_ + d : d.clone();
    p_ = p_ - c_.lr * buf_;
    const double buf_norm = buf_.norm().item<double>();
    buffer_error_ = c_.momentum * buffer_error_ + std::sqrt(direction_error_sq) +
                    u * (c_.momentum * old_buf_norm + buf_norm);
    param_error_ += c_.lr * buffer_error_ + u * (p_.norm().item<double>() + c_.lr * buf_norm);
  }

  const at::Tensor& param() const { return p_; }
  // First-order bound on ||p_fp32 - param()||_F after the steps so far (see the top).
  double fp32_error_bound() const { return param_error_; }

 private:
  static double norm(const at::Tensor& t) { return t.norm().item<double>(); }

  // A root (A + epsilon * lambda_max * I)^(-1/p) (eigenvalues clamped at 0) with what item 3
  // of the budget needs: eigenvectors V, squared divided differences F^2, W = |V| f |V|^T,
  // the backward error eta and the Newton-only relative error nu.
  struct Root {
    at::Tensor x, v, f2, w;
    double eta = 0, nu = 0;
    // max_i sqrt(sum_j F_ij^2 ||(V^T H)_j||^2): the root's error acting on H from the left.
    double c_left(const at::Tensor& h) const {
      return std::sqrt(f2.mv(v.t().mm(h).pow(2).sum(1)).max().item<double>());
    }
    // The same acting from the right (H X): columns of H V.
    double c_right(const at::Tensor& h) const {
      return std::sqrt(f2.mv(h.mm(v).pow(2).sum(0)).max().item<double>());
    }
  };

  Root inverse_root(const at::Tensor& a, double stat_error) const {
    const double p = c_.caspr ? 2.0 : 4.0, u = kUnitRoundoff;
    auto [values, vectors] = at::linalg_eigh((a + a.t()) / 2);
    values = values.clamp_min(0);
    const double lambda_max = values.max().item<double>();
    const double ridge = c_.epsilon * lambda_max;
    const at::Tensor f = (values + ridge).pow(-1.0 / p);
    Root root;
    root.x = (vectors * f.unsqueeze(0)).mm(vectors.t());
    root.v = vectors;
    root.w = (vectors.abs() * f.unsqueeze(0)).mm(vectors.abs().t());
    // |f'| is decreasing, so a divided difference is at most |f'| at the smaller eigenvalue;
    // that bound also stands in for (near-)ties, where the quotient would cancel.
    const at::Tensor fprime = (values + ridge).pow(-1.0 / p - 1) / p;
    const at::Tensor gap = (values.unsqueeze(1) - values.unsqueeze(0)).abs();
    const at::Tensor quotient = (f.unsqueeze(1) - f.unsqueeze(0)).abs() / gap.clamp_min(1e-300);
    const at::Tensor tie_bound = at::maximum(fprime.unsqueeze(1), fprime.unsqueeze(0));
    const at::Tensor dd = at::where(gap > 1e-8 * (lambda_max + ridge), at::minimum(quotient, tie_bound), tie_bound);
    root.f2 = dd.pow(2);
    const double n = static_cast<double>(a.size(0));
    root.eta = (stat_error + n * u * a.norm().item<double>()) * (1 + std::sqrt(n) * c_.epsilon);
    if (c_.newton) root.nu = (n + 1) * kNewtonTolerance / p;
    return root;
  }

  struct Block {
    int64_t r, m, c, n;
    at::Tensor L, R;
    Root Lroot, Rroot;
    double stat_error_L = 0, stat_error_R = 0;
  };
  ReferenceShampooConfig c_;
  at::Tensor p_, buf_;
  int64_t rows_ = 0, cols_ = 0, k_ = 0;
  double buffer_error_ = 0, param_error_ = 0;
  std::vector<Block> blocks_;
};

}  // namespace lowbit::testing
