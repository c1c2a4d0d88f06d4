#include "linalg/matrix_functions.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace lowbit::linalg {
namespace {

bool all_finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

at::Tensor symmetrize(const at::Tensor& a) { return (a + a.transpose(-2, -1)) * 0.5; }

}  // namespace

at::Tensor bjorck_orthonormalize(const at::Tensor& v, int steps) {
  at::Tensor x = v;
  for (int i = 0; i < steps; ++i) x = 1.5 * x - 0.5 * at::matmul(x, at::matmul(x.transpose(-2, -1), x));
  return x;
}

Eigen qr_subspace_step(const at::Tensor& a, const at::Tensor& v) {
  const at::Tensor p = std::get<0>(at::linalg_qr(at::matmul(a, v)));
  const at::Tensor values = (p * at::matmul(a, p)).sum(-2);  // diag(P^T A P)
  return {values, p};
}

EighSolver default_eigh_solver() {
  return [](const at::Tensor& a) { return at::linalg_eigh(a); };
}

std::optional<Eigen> eigh_with_fallback(const at::Tensor& a, const EighSolver& solver) {
  for (const at::ScalarType dtype : {a.scalar_type(), at::kDouble}) {
    try {
      const auto [values, vectors] = solver(symmetrize(a.to(dtype)));
      if (all_finite(values) && all_finite(vectors))
        return Eigen{values.to(a.scalar_type()), vectors.to(a.scalar_type())};
    } catch (const c10::Error&) {
      // fall through to the next precision
    }
    if (dtype == at::kDouble) break;
  }
  return std::nullopt;
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

at::Tensor inverse_root_from_eigen(const Eigen& e, double p, double epsilon) {
  const at::Tensor values = e.values.clamp_min(0);
  const double lambda_max = values.max().item<double>();
  // Epsilon relative to lambda_max (absolute when the matrix is zero) keeps the root bounded.
  const double ridge = lambda_max > 0 ? epsilon * lambda_max : epsilon;
  const at::Tensor scaled = (values + ridge).pow(-1.0 / p);
  return at::matmul(e.vectors * scaled.unsqueeze(0), e.vectors.transpose(0, 1));
}

std::optional<at::Tensor> inverse_root_eigen(const at::Tensor& a, double p, double epsilon,
                                             const EighSolver& solver) {
  const std::optional<Eigen> e = eigh_with_fallback(a, solver);
  if (!e) return std::nullopt;
  return inverse_root_from_eigen(*e, p, epsilon);
}

// Coupled Newton (Schur-Newton) iteration for A^(-1/p), as in the Shampoo papers:
// M_0 = z A, X_0 = z^(1/p) I with z = (1 + p) / (2 ||A||_F); then
// T = ((p + 1) I - M) / p, X <- X T, M <- T^p M, until M is close to I. The Frobenius
// norm (>= lambda_max) keeps every eigenvalue of M_0 in (0, (1 + p) / 2], where the
// iteration raises the small ones monotonically; power iteration gives lambda_max for
// the epsilon ridge.
at::Tensor inverse_root_newton(const at::Tensor& a_in, int p, double epsilon, int max_iterations,
                               double tolerance) {
  const int64_t n = a_in.size(0);
  const at::Tensor identity = at::eye(n, a_in.options());
  const at::Tensor a = symmetrize(a_in);
  const double lambda_max = max_eigenvalue_power_iteration(a);
  const double ridge = lambda_max > 0 ? epsilon * lambda_max : epsilon;
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
