// Matrix functions against dense fp64 references computed here.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "linalg/matrix_functions.h"

namespace lowbit::linalg {
namespace {

// Q diag(values) Q^T with a random orthogonal Q (fp64).
at::Tensor spd_with_spectrum(const at::Tensor& values, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t n = values.numel();
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  return at::matmul(q * values.to(at::kDouble).unsqueeze(0), q.t());
}

double relative_error(const at::Tensor& got, const at::Tensor& want) {
  return ((got.to(at::kDouble) - want.to(at::kDouble)).norm() / want.to(at::kDouble).norm()).item<double>();
}

TEST(Bjorck, ConvergesToThePolarFactor) {
  at::manual_seed(1);
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({50, 50}, at::kDouble)));
  const at::Tensor v = q + 0.02 * at::randn({50, 50}, at::kDouble);
  const auto [u, s, wt] = at::linalg_svd(v, false);
  const at::Tensor polar = at::matmul(u, wt);
  double previous = relative_error(v, polar);
  for (int steps = 1; steps <= 4; ++steps) {
    const double now = relative_error(bjorck_orthonormalize(v, steps), polar);
    EXPECT_LT(now, previous) << steps << " steps";
    previous = now;
  }
  // Quadratic convergence: two more steps reach fp64 round-off.
  const at::Tensor x = bjorck_orthonormalize(v, 6);
  EXPECT_LT(relative_error(x, polar), 1e-12);
  EXPECT_LT((at::matmul(x.t(), x) - at::eye(50, at::kDouble)).abs().max().item<double>(), 1e-12);
}

TEST(QrSubspaceStep, ExactEigenvectorsAreAFixedPointAndIterationConverges) {
  const at::Tensor spectrum = at::pow(2.0, -at::arange(40, at::kDouble) / 4);
  const at::Tensor a = spd_with_spectrum(spectrum, 2);
  const auto [values, vectors] = at::linalg_eigh(a);
  const Eigen step = qr_subspace_step(a, vectors);
  EXPECT_LT((step.values - values).abs().max().item<double>(), 1e-12);
  // Same eigenvectors up to sign.
  EXPECT_LT((at::matmul(step.vectors.t(), vectors).abs() - at::eye(40, at::kDouble)).abs().max().item<double>(), 1e-10);

  at::Tensor v = std::get<0>(at::linalg_qr(vectors + 0.05 * at::randn({40, 40}, at::kDouble)));
  Eigen e{};
  for (int i = 0; i < 200; ++i) {
    e = qr_subspace_step(a, v);
    v = e.vectors;
  }
  const at::Tensor sorted = std::get<0>(e.values.sort());
  EXPECT_LT(((sorted - values).abs() / values).max().item<double>(), 1e-6);
}

TEST(EighWithFallback, RetriesInDoubleThenGivesUp) {
  const at::Tensor a = spd_with_spectrum(at::linspace(1, 10, 20, at::kDouble), 3).to(at::kFloat);
  int calls = 0;
  const EighSolver fails_in_float = [&](const at::Tensor& m) {
    ++calls;
    TORCH_CHECK(m.scalar_type() == at::kDouble, "injected failure");
    return at::linalg_eigh(m);
  };
  const std::optional<Eigen> e = eigh_with_fallback(a, fails_in_float);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(e->values.scalar_type(), at::kFloat);
  EXPECT_LT(relative_error(at::matmul(e->vectors * e->values.unsqueeze(0), e->vectors.t()), a), 1e-5);

  const EighSolver returns_nan = [](const at::Tensor& m) {
    return std::make_tuple(at::full({m.size(0)}, NAN, m.options()), at::eye(m.size(0), m.options()));
  };
  EXPECT_FALSE(eigh_with_fallback(a, returns_nan).has_value());
}

TEST(PowerIteration, FindsTheLargestEigenvalue) {
  const at::Tensor a = spd_with_spectrum(at::cat({at::linspace(0.1, 1, 30, at::kDouble), at::full({1}, 5.0, at::kDouble)}), 4);
  EXPECT_NEAR(max_eigenvalue_power_iteration(a, 1000, 1e-12), 5.0, 1e-8);
}

// X = A^(-1/p) must satisfy X^p (A + eps * lambda_max * I) = I and be symmetric.
void expect_inverse_root(const at::Tensor& x, const at::Tensor& a, int p, double epsilon, double tol) {
  const at::Tensor a64 = a.to(at::kDouble), x64 = x.to(at::kDouble);
  const double lambda_max = at::linalg_eigvalsh(a64).max().item<double>();
  const at::Tensor damped = a64 + epsilon * lambda_max * at::eye(a.size(0), at::kDouble);
  const at::Tensor residual = at::matmul(at::linalg_matrix_power(x64, p), damped) - at::eye(a.size(0), at::kDouble);
  EXPECT_LT(residual.abs().max().item<double>(), tol);
  EXPECT_LT((x64 - x64.t()).abs().max().item<double>(), tol);
}

TEST(InverseRoot, EigenSatisfiesTheDefiningEquation) {
  for (double cond : {1e2, 1e4, 1e6}) {
    const at::Tensor a = spd_with_spectrum(at::logspace(0, -std::log10(cond), 64, 10, at::kDouble), 5);
    const std::optional<at::Tensor> x = inverse_root_eigen(a, 4, 1e-6);
    ASSERT_TRUE(x.has_value());
    expect_inverse_root(*x, a, 4, 1e-6, 1e-8);
  }
}

TEST(InverseRoot, NewtonMatchesEigenInDouble) {
  for (double cond : {1e2, 1e4}) {
    const at::Tensor a = spd_with_spectrum(at::logspace(0, -std::log10(cond), 48, 10, at::kDouble), 6);
    const at::Tensor newton = inverse_root_newton(a, 4, 1e-6, 200, 1e-12);
    expect_inverse_root(newton, a, 4, 1e-6, 1e-6);
    EXPECT_LT(relative_error(newton, *inverse_root_eigen(a, 4, 1e-6)), 1e-6) << "cond " << cond;
  }
}

TEST(InverseRoot, Float32ResultsStayCloseToTheDoubleReference) {
  const at::Tensor a = spd_with_spectrum(at::logspace(0, -3, 64, 10, at::kDouble), 7);
  const at::Tensor reference = *inverse_root_eigen(a, 4, 1e-4);
  EXPECT_LT(relative_error(*inverse_root_eigen(a.to(at::kFloat), 4, 1e-4), reference), 1e-4);
  EXPECT_LT(relative_error(inverse_root_newton(a.to(at::kFloat), 4, 1e-4), reference), 1e-3);
}

TEST(InverseRoot, ZeroMatrixGivesABoundedRoot) {
  const at::Tensor zero = at::zeros({8, 8});
  const at::Tensor x = *inverse_root_eigen(zero, 4, 1e-6);
  EXPECT_TRUE(x.isfinite().all().item<bool>());
  EXPECT_TRUE(inverse_root_newton(zero, 4, 1e-6).isfinite().all().item<bool>());
}

}  // namespace
}  // namespace lowbit::linalg
