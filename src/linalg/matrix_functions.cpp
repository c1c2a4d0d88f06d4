#include "linalg/matrix_functions.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "linalg/cholesky_qr.h"

namespace lowbit::linalg {
namespace {

bool all_finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

at::Tensor symmetrize(const at::Tensor& a) { return (a + a.transpose(-2, -1)) * 0.5; }

// Q of the Householder QR (LAPACK geqrf + orgqr, or cuSOLVER's), without forming R:
// linalg_qr would also copy out its upper triangle, which is discarded (a fifth of the QR's
// time at order 1024 on a 2-core CPU; the same Q bit for bit).
void householder_q_into(const at::Tensor& q, const at::Tensor& x) {
  const auto [reflectors, tau] = at::geqrf(x);
  at::Tensor out = q;
  at::linalg_householder_product_out(out, reflectors, tau);
}

}  // namespace

at::Tensor finite_matrices(const at::Tensor& x) {
  const std::vector<int64_t> dims{-2, -1};
  return at::amax(x, dims).isfinite().logical_and_(at::amin(x, dims).isfinite());
}

void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, double beta) {
  if (out.dim() == 2 || !out.is_cpu()) {
    at::Tensor target = out;
    if (beta == 0.0) {
      at::matmul_out(target, a, b);
      if (alpha != 1.0) target.mul_(alpha);
    } else {
      target.dim() == 2 ? target.addmm_(a, b, beta, alpha) : target.baddbmm_(a, b, beta, alpha);
    }
    return;
  }
  for (int64_t i = 0; i < out.size(0); ++i) matmul_into(out[i], a[i], b[i], alpha, beta);
}

at::Tensor bjorck_orthonormalize(const at::Tensor& v, int steps) {
  at::Tensor x = v;
  for (int i = 0; i < steps; ++i) x = 1.5 * x - 0.5 * at::matmul(x, at::matmul(x.transpose(-2, -1), x));
  return x;
}

void bjorck_orthonormalize_(const at::Tensor& x, int steps, Workspace& workspace, int slot) {
  const at::TensorOptions options = x.options();
  const int64_t m = x.size(-1);
  std::vector<int64_t> square = x.sizes().vec();
  square[square.size() - 2] = m;
  for (int i = 0; i < steps; ++i) {
    const at::Tensor gram = workspace.take(slot, square, options);
    matmul_into(gram, x.transpose(-2, -1), x);
    const at::Tensor product = workspace.take_like(slot + 1, x);
    matmul_into(product, x, gram);
    x.mul_(1.5).add_(product, -0.5);
  }
}

Eigen qr_subspace_step(const at::Tensor& a, const at::Tensor& v) {
  const at::Tensor p = std::get<0>(at::linalg_qr(at::matmul(a, v)));
  const at::Tensor values = (p * at::matmul(a, p)).sum(-2);  // diag(P^T A P)
  return {values, p};
}

void qr_subspace_step_out(const at::Tensor& a, const at::Tensor& v, const at::Tensor& vectors,
                          const at::Tensor& values, Workspace& workspace, int slot, Orthonormalization method) {
  // Products are made transposed, as (A V)^T = V^T A^T, so that they are column-major, the
  // layout LAPACK works in: geqrf then copies its input without transposing it, and the
  // Householder product writes straight into a column-major `vectors` (the caller's choice:
  // its rows are then the stored eigenvectors, with no transposed copy).
  at::Tensor product_t = workspace.take(slot, a.sizes(), a.options());
  matmul_into(product_t, v.mT(), a.mT());
  if (method == Orthonormalization::Householder) {
    householder_q_into(vectors, product_t.mT());
  } else {
    TORCH_CHECK(vectors.dim() <= 3, "qr_subspace_step_out: CholeskyQR2 takes one matrix or one batch; got ",
                vectors.sizes());
    const at::Tensor x = product_t.mT();
    const at::Tensor failed = cholesky_qr2_into(vectors, x);
    // One host read per call; the matrices CholeskyQR2 cannot take (a Gram not positive
    // definite in fp64) take the Householder QR.
    if (failed.any().item<bool>()) {
      if (vectors.dim() == 2) {
        householder_q_into(vectors, x);
      } else {
        const at::Tensor rows = failed.nonzero().squeeze(1).cpu();
        for (int64_t k = 0; k < rows.numel(); ++k) {
          const int64_t i = rows[k].item<int64_t>();
          householder_q_into(vectors[i], x[i]);
        }
      }
    }
  }
  at::Tensor diagonal = values;
  matmul_into(product_t, vectors.mT(), a);  // P^T A
  // diag(P^T A P)_i = sum_k (P^T A)_ik (P^T)_ik (both contiguous when `vectors` is column-major).
  at::sum_out(diagonal, product_t.mul_(vectors.mT()), {-1});
}

EighSolver default_eigh_solver() {
  return [](const at::Tensor& a) { return at::linalg_eigh(a); };
}

namespace {

// The eigendecomposition of symmetrize(a) in a's dtype, then in fp64 if the solver throws
// (or, with `require_finite`, returns NaN/Inf: a host read), in a's dtype; none if both fail.
std::optional<Eigen> eigh_in_two_precisions(const at::Tensor& a, const EighSolver& solver, bool require_finite) {
  for (const at::ScalarType dtype : {a.scalar_type(), at::kDouble}) {
    try {
      const auto [values, vectors] = solver(symmetrize(a.to(dtype)));
      if (!require_finite || (all_finite(values) && all_finite(vectors)))
        return Eigen{values.to(a.scalar_type()), vectors.to(a.scalar_type())};
    } catch (const c10::Error&) {
      // fall through to the next precision
    }
    if (dtype == at::kDouble) break;
  }
  return std::nullopt;
}

}  // namespace

std::optional<Eigen> eigh_with_fallback(const at::Tensor& a, const EighSolver& solver) {
  return eigh_in_two_precisions(a, solver, /*require_finite=*/true);
}

Eigen eigh_batched(const at::Tensor& a, const EighSolver& solver) {
  // Non-finite results are not looked for here (that would read the device): the caller masks them.
  if (std::optional<Eigen> all = eigh_in_two_precisions(a, solver, /*require_finite=*/false)) return *all;
  const int64_t n = a.size(-1);
  const at::Tensor flat = a.reshape({-1, n, n});
  Eigen out{at::full(flat.sizes().slice(0, 2), NAN, a.options()), at::full(flat.sizes(), NAN, a.options())};
  if (flat.size(0) > 1)
    for (int64_t i = 0; i < flat.size(0); ++i)
      if (std::optional<Eigen> one = eigh_in_two_precisions(flat[i], solver, /*require_finite=*/false)) {
        out.values[i].copy_(one->values);
        out.vectors[i].copy_(one->vectors);
      }
  return {out.values.view(a.sizes().slice(0, a.dim() - 1)), out.vectors.view(a.sizes())};
}

double max_eigenvalue_power_iteration(const at::Tensor& a, int max_iterations, double tolerance) {
  const int64_t n = a.size(0);
  at::Tensor x = at::ones({n, 1}, a.options()) / std::sqrt(static_cast<double>(n));
  double lambda = 0.0;
  for (int i = 0; i < max_iterations; ++i) {
    const at::Tensor y = at::matmul(a, x);
    const double next = (x * y).sum().item<double>();  // Rayleigh quotient, x has unit norm
    const double norm = y.norm().item<double>();
    if (!(norm > 0.0)) return 0.0;
    x = y / norm;
    if (std::fabs(next - lambda) <= tolerance * std::fabs(next)) return next;
    lambda = next;
  }
  return lambda;
}

at::Tensor inverse_root_spectrum(const at::Tensor& values_in, double p, double epsilon, double damping) {
  const at::Tensor values = values_in.clamp_min(0);
  const at::Tensor lambda_max = values.amax(-1, /*keepdim=*/true);
  // Epsilon relative to lambda_max (absolute when the matrix is zero) keeps the root bounded.
  at::Tensor ridge = at::where(lambda_max > 0, lambda_max * epsilon, at::full_like(lambda_max, epsilon));
  if (damping != 0) ridge = ridge + damping;
  // The power is taken in fp64 and rounded once to the working dtype. Vectorized fp32 pow
  // (SLEEF, 1 ulp) and the scalar pow that handles a vector's tail can round the same input
  // differently, so in fp32 a factor's root would depend on where it sits in the batch;
  // fp64 pow is within 1 fp64 ulp on both paths, which rounds to the same fp32 value
  // except within 2^-29 relative of a rounding midpoint.
  const at::Tensor damped = values + ridge;
  if (damped.scalar_type() == at::kDouble) return damped.pow(-1.0 / p);
  return damped.to(at::kDouble).pow_(-1.0 / p).to(damped.scalar_type());
}

at::Tensor inverse_root_from_eigen(const Eigen& e, double p, double epsilon, double damping) {
  const at::Tensor scaled = inverse_root_spectrum(e.values, p, epsilon, damping);
  return at::matmul(e.vectors * scaled.unsqueeze(-2), e.vectors.transpose(-2, -1));
}

void recompose_out(const at::Tensor& out, const at::Tensor& vectors, const at::Tensor& d, Workspace& workspace,
                   int slot) {
  at::Tensor scaled = workspace.take_like(slot, vectors);
  at::mul_out(scaled, vectors, d.unsqueeze(-2));
  matmul_into(out, scaled, vectors.transpose(-2, -1));
}

std::optional<at::Tensor> inverse_root_eigen(const at::Tensor& a, double p, double epsilon,
                                             const EighSolver& solver, double damping) {
  const std::optional<Eigen> e = eigh_with_fallback(a, solver);
  if (!e) return std::nullopt;
  return inverse_root_from_eigen(*e, p, epsilon, damping);
}

// Coupled Newton (Schur-Newton) iteration for A^(-1/p), as in the Shampoo papers:
// M_0 = z A, X_0 = z^(1/p) I with z = (1 + p) / (2 ||A||_F); then
// T = ((p + 1) I - M) / p, X <- X T, M <- T^p M, until M is close to I. The Frobenius
// norm (>= lambda_max) keeps every eigenvalue of M_0 in (0, (1 + p) / 2], where the
// iteration raises the small ones monotonically; power iteration gives lambda_max for
// the epsilon ridge.
at::Tensor inverse_root_newton(const at::Tensor& a_in, int p, double epsilon, int max_iterations,
                               double tolerance, double damping) {
  const int64_t n = a_in.size(0);
  const at::Tensor identity = at::eye(n, a_in.options());
  const at::Tensor a = symmetrize(a_in);
  const double lambda_max = max_eigenvalue_power_iteration(a);
  const double ridge = (lambda_max > 0 ? epsilon * lambda_max : epsilon) + damping;
  const at::Tensor damped = a + ridge * identity;
  const double z = (1.0 + p) / (2.0 * damped.norm().item<double>());
  at::Tensor root = identity * std::pow(z, 1.0 / p);
  at::Tensor m = damped * z;
  double error = (m - identity).abs().max().item<double>();
  for (int i = 0; i < max_iterations && error > tolerance; ++i) {
    const at::Tensor t = ((p + 1.0) * identity - m) / static_cast<double>(p);
    const at::Tensor next_root = at::matmul(root, t);
    const at::Tensor next_m = at::matmul(at::linalg_matrix_power(t, p), m);
    const double next_error = (next_m - identity).abs().max().item<double>();
    // The iteration can diverge in finite precision: keep the last improving iterate.
    if (!std::isfinite(next_error) || next_error > error * 1.2) break;
    root = next_root;
    m = next_m;
    error = next_error;
  }
  return root;
}

}  // namespace lowbit::linalg
