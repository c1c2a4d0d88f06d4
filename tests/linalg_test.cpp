// Matrix functions against dense fp64 references computed here.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "linalg/cholesky_qr.h"
#include "linalg/matrix_functions.h"
#include "linalg/workspace.h"

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

constexpr double kU64 = 0x1p-53;  // unit roundoff of fp64
constexpr double kU32 = 0x1p-24;  // and of fp32

// Conditioning of A^(-1/p) from an eigendecomposition, for bounds on roots computed at unit
// roundoff u (Higham, Functions of Matrices, 3.1 and 10.2): a backward-stable eigh is exact
// for A + E with ||E||_F <= N u ||A||_F (LAPACK's approximate error bounds use p(N) = 1, we
// take N); by the Daleckii-Krein formula f(A + E) - f(A) is bounded by the largest divided
// difference of f(x) = (x + ridge)^(-1/p), |f'(lambda_min + ridge)| = (1/p)(lambda_min +
// ridge)^(-1 - 1/p), times ||E||_F; forming V diag(f) V^T adds N u |V| f |V|^T, whose
// Frobenius norm is <= N f_max (|| |V| ||_F^2 = N). Relative to ||X||_F:
double root_relative_error_bound(const at::Tensor& a, double p, double epsilon, double u) {
  const at::Tensor values = at::linalg_eigvalsh(a.to(at::kDouble)).clamp_min(0);
  const double lambda_max = values.max().item<double>(), lambda_min = values.min().item<double>();
  const double ridge = epsilon * lambda_max, n = static_cast<double>(a.size(0));
  const double x_norm = (values + ridge).pow(-1.0 / p).norm().item<double>();
  const double f_max = std::pow(lambda_min + ridge, -1.0 / p);
  const double a_norm = a.to(at::kDouble).norm().item<double>();
  const double conditioning = std::pow(lambda_min + ridge, -1.0 - 1.0 / p) / p * n * u * a_norm * (1 + std::sqrt(n) * epsilon);
  return (conditioning + n * u * n * f_max) / x_norm;
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
  // Quadratic convergence: from ~0.02 the error is ~0.02^(2^k) in exact arithmetic, below
  // fp64 round-off after 4 steps, so step 6 sits at the rounding floor. Each step's two
  // products carry <= n u ||x||^3 relative error (||x||_2 ~ 1) and the (contracting)
  // iteration does not amplify it; the SVD's polar factor adds n u: so 3 n u in total.
  const double floor = 3 * 50 * kU64;
  const at::Tensor x = bjorck_orthonormalize(v, 6);
  EXPECT_LT(relative_error(x, polar), floor);
  EXPECT_LT((at::matmul(x.t(), x) - at::eye(50, at::kDouble)).abs().max().item<double>(), floor);
}

TEST(QrSubspaceStep, ExactEigenvectorsAreAFixedPointAndIterationConverges) {
  const at::Tensor spectrum = at::pow(2.0, -at::arange(40, at::kDouble) / 4);
  const at::Tensor a = spd_with_spectrum(spectrum, 2);
  const auto [values, vectors] = at::linalg_eigh(a);
  const Eigen step = qr_subspace_step(a, vectors);
  // The eigh in fp64 is exact for A + E, ||E|| <= n u ||A||; the QR step (backward stable
  // column by column, so A V's column scaling costs nothing) and P^T A P add as much again:
  // eigenvalues within 2 n u ||A|| (||A|| = 1), eigenvectors within 2 n u ||A|| / gap, the
  // smallest gap being lambda_min (1 - 2^(-1/4)).
  const double n_u = 40 * kU64;
  const double min_gap = spectrum.min().item<double>() * (1 - std::pow(2.0, -0.25));
  EXPECT_LT((step.values - values).abs().max().item<double>(), 2 * n_u);
  // Same eigenvectors up to sign.
  EXPECT_LT((at::matmul(step.vectors.t(), vectors).abs() - at::eye(40, at::kDouble)).abs().max().item<double>(),
            2 * n_u / min_gap);

  at::Tensor v = std::get<0>(at::linalg_qr(vectors + 0.05 * at::randn({40, 40}, at::kDouble)));
  Eigen e{};
  for (int i = 0; i < 200; ++i) {
    e = qr_subspace_step(a, v);
    v = e.vectors;
  }
  // Subspace iteration: the Rayleigh quotients converge like (lambda_i+1 / lambda_i)^(2k) =
  // 2^(-k/2), ~1e-30 after 200 steps, so what is left is rounding: 2 n u ||A|| as above,
  // relative to the smallest eigenvalue.
  const at::Tensor sorted = std::get<0>(e.values.sort());
  EXPECT_LT(((sorted - values).abs() / values).max().item<double>(), 2 * n_u / spectrum.min().item<double>());
}

// X = W diag(sigma) Z^T D: orthogonal W, Z, singular values log-spaced over [1, cond], and
// columns scaled by D over [1e-3, 1e3] (A V's columns carry the eigenvalues' spread).
at::Tensor scaled_columns(int64_t n, double cond, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor w = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  const at::Tensor z = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  const at::Tensor sigma = at::logspace(0, std::log10(cond), n, 10, at::kDouble);
  const at::Tensor d = at::logspace(-3, 3, n, 10, at::kDouble).index_select(0, at::randperm(n, at::kLong));
  return at::matmul(w * sigma.unsqueeze(0), z.t()) * d.unsqueeze(0);
}

// kappa_2 of x with unit columns: what CholeskyQR2 sees after its scaling.
double equilibrated_condition(const at::Tensor& x) {
  const at::Tensor s = at::linalg_svdvals(x / at::linalg_vector_norm(x, 2, {-2}, true));
  return (s.max() / s.min()).item<double>();
}

// CholeskyQR2 against an fp64 Householder QR (signs of Q's columns taken so that R's diagonal
// is positive, CholeskyQR's convention), for a batch of fp32 matrices whose columns span six
// orders of magnitude. Both QRs are backward stable to c n^(3/2) u64 ||X|| (Yamamoto et al.
// 2015 for CholeskyQR2 while kappa(X D) < u64^(-1/2); Higham 19.4 for Householder), so each Q
// is within sqrt(2) kappa(X D) times that of the exact Q (the QR's perturbation bound; the
// column scaling D leaves Q as it is): together 4 kappa n^(3/2) u64, plus the final rounding
// to fp32 (u32, entries at most 1). Orthogonality: rounding each entry of Q by u32 moves
// (Q^T Q)_ij by at most 2 u32 (Cauchy-Schwarz over unit columns), CholeskyQR2's own error is
// at most 6 (n^2 + n(n + 1)) u64 (Yamamoto et al., Theorem 3.3), and the fp64 check adds n u64.
TEST(CholeskyQr2, MatchesAnFp64HouseholderQrAcrossColumnScales) {
  const int64_t n = 64;
  const std::vector<double> conds = {1.0, 1e3, 1e5};
  std::vector<at::Tensor> xs;
  for (size_t i = 0; i < conds.size(); ++i) xs.push_back(scaled_columns(n, conds[i], 10 + i).to(at::kFloat));
  const at::Tensor x = at::stack(xs);
  const at::Tensor q = at::empty({3, n, n}).mT();  // column-major, as the subspace step hands it over
  const at::Tensor failed = cholesky_qr2_into(q, x);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_FALSE(failed[i].item<bool>()) << "matrix " << i;
    const at::Tensor xi = x[i].to(at::kDouble);
    const auto [qr_q, qr_r] = at::linalg_qr(xi);
    const at::Tensor want = qr_q * at::sign(qr_r.diagonal()).unsqueeze(0);
    const double kappa = equilibrated_condition(xi), nn = static_cast<double>(n);
    const double bound = kU32 + 4 * kappa * std::pow(nn, 1.5) * kU64;
    EXPECT_LE((q[i].to(at::kDouble) - want).abs().max().item<double>(), bound) << "matrix " << i << ", kappa " << kappa;
    const at::Tensor qd = q[i].to(at::kDouble);
    const double orthogonality = (at::matmul(qd.t(), qd) - at::eye(n, at::kDouble)).abs().max().item<double>();
    EXPECT_LE(orthogonality, 2 * kU32 + (6 * (nn * nn + nn * (nn + 1)) + nn) * kU64) << "matrix " << i;
  }
}

// A Gram matrix that is not positive definite in fp64 (a repeated column, a zero column) is
// reported, alone in its batch; the subspace step then takes the Householder QR for it, whose
// Q is the Householder method's bit for bit, and keeps CholeskyQR2's for the others.
TEST(CholeskyQr2, ReportsRankDeficientMatricesAndTheSubspaceStepFallsBackForThemAlone) {
  const int64_t n = 24;
  at::manual_seed(5);
  const at::Tensor a = at::stack({spd_with_spectrum(at::logspace(0, -2, n, 10, at::kDouble), 6),
                                  spd_with_spectrum(at::logspace(0, -2, n, 10, at::kDouble), 7)})
                           .to(at::kFloat);
  at::Tensor v = std::get<0>(at::linalg_qr(at::randn({2, n, n}))).contiguous();
  v[1].select(1, 3).copy_(v[1].select(1, 2));  // A V's columns 2 and 3 equal: rank n - 1
  at::Tensor x = at::matmul(a, v);
  const at::Tensor q = at::empty({2, n, n});
  const at::Tensor failed = cholesky_qr2_into(q, x);
  EXPECT_FALSE(failed[0].item<bool>());
  EXPECT_TRUE(failed[1].item<bool>());
  // Nearly dependent columns (kappa(X D) = 1e12, beyond fp64's u^(-1/2)) whose Gram a Cholesky
  // may still factor: reported all the same.
  EXPECT_TRUE(cholesky_qr2_into(at::empty({n, n}, at::kDouble), scaled_columns(n, 1e12, 8)).item<bool>());
  at::Tensor zero_column = x[0].clone();
  zero_column.select(1, 5).zero_();
  EXPECT_TRUE(cholesky_qr2_into(at::empty({n, n}), zero_column).item<bool>());

  Workspace workspace;
  const at::Tensor by_cholesky = at::empty({2, n, n}).mT(), by_householder = at::empty({2, n, n}).mT();
  const at::Tensor values_c = at::empty({2, n}), values_h = at::empty({2, n});
  qr_subspace_step_out(a, v, by_cholesky, values_c, workspace, 0, Orthonormalization::CholeskyQr2);
  qr_subspace_step_out(a, v, by_householder, values_h, workspace, 0, Orthonormalization::Householder);
  EXPECT_TRUE(at::equal(by_cholesky[1], by_householder[1]));
  EXPECT_TRUE(at::equal(values_c[1], values_h[1]));
  // Matrix 0 by CholeskyQR2: the Householder Q up to column signs, within the bound above
  // (here on A V with kappa(A V D) <= kappa(A) = 100, both in fp32 arithmetic for the
  // Householder side: 2 kappa n^(3/2) u32 for it, u32 for the rounding of the other); its
  // eigenvalue estimates diag(P^T A P) are sign-free: within 2 of those Q errors times ||A|| = 1
  // plus the two fp32 products' n u32 each.
  const double kappa = 100, nn = static_cast<double>(n);
  const double q_bound = kU32 + 2 * kappa * std::pow(nn, 1.5) * kU32;
  const at::Tensor signs = at::sign((by_cholesky[0] * by_householder[0]).sum(0));
  EXPECT_LE((by_cholesky[0] - by_householder[0] * signs.unsqueeze(0)).abs().max().item<double>(), q_bound);
  EXPECT_LE((values_c[0] - values_h[0]).abs().max().item<double>(), 2 * nn * q_bound + 2 * nn * kU32);
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
  // fp64 factors rounded to fp32 (u each for V, lambda, V^T) and multiplied in fp32
  // (n u |V| |Lambda| |V|^T, Frobenius norm <= n u n lambda_max): relative to ||A||_F.
  const double a_norm = a.to(at::kDouble).norm().item<double>();
  EXPECT_LT(relative_error(at::matmul(e->vectors * e->values.unsqueeze(0), e->vectors.t()), a),
            3 * kU32 + 20 * kU32 * 20 * 10.0 / a_norm);

  const EighSolver returns_nan = [](const at::Tensor& m) {
    return std::make_tuple(at::full({m.size(0)}, NAN, m.options()), at::eye(m.size(0), m.options()));
  };
  EXPECT_FALSE(eigh_with_fallback(a, returns_nan).has_value());
}

TEST(PowerIteration, FindsTheLargestEigenvalue) {
  const at::Tensor a = spd_with_spectrum(at::cat({at::linspace(0.1, 1, 30, at::kDouble), at::full({1}, 5.0, at::kDouble)}), 4);
  // Rayleigh quotients of power iteration on an SPD matrix rise monotonically, with ratio
  // rho = (lambda_2 / lambda_1)^2 = 0.04; stopping at a change <= 1e-12 * 5 leaves at most
  // change * rho / (1 - rho), plus fp64 rounding of A x (n u ||A||, n = 31).
  const double rho = 0.04;
  EXPECT_NEAR(max_eigenvalue_power_iteration(a, 1000, 1e-12), 5.0, 5 * (1e-12 * rho / (1 - rho) + 31 * kU64));
}

// X = A^(-1/p) must satisfy X^p (A + eps * lambda_max * I) = I and be symmetric. With X
// exact for A + E (a backward error ||E||_2 <= eta ||A||_2), X^p (A_d + E) = I, so the
// residual is -X^p E: ||.||_2 <= eta kappa, kappa = (lambda_max + ridge) / (lambda_min + ridge);
// the p - 1 + 1 fp64 products forming it here add p n u kappa. X = V f V^T is symmetric up
// to its products' rounding, n u ||X||_2 per entry, in both orders: 2 n u ||X||_2 per product
// that formed X (`products`: 1 for eigh, one per iteration for Newton).
void expect_inverse_root(const at::Tensor& x, const at::Tensor& a, int p, double epsilon, double eta,
                         double products = 1) {
  const at::Tensor a64 = a.to(at::kDouble), x64 = x.to(at::kDouble);
  const at::Tensor values = at::linalg_eigvalsh(a64).clamp_min(0);
  const double lambda_max = values.max().item<double>(), ridge = epsilon * lambda_max;
  const double kappa = (lambda_max + ridge) / (values.min().item<double>() + ridge);
  const double n = static_cast<double>(a.size(0));
  const at::Tensor damped = a64 + ridge * at::eye(a.size(0), at::kDouble);
  const at::Tensor residual = at::matmul(at::linalg_matrix_power(x64, p), damped) - at::eye(a.size(0), at::kDouble);
  EXPECT_LT(residual.abs().max().item<double>(), (eta + p * n * kU64) * kappa);
  EXPECT_LT((x64 - x64.t()).abs().max().item<double>(),
            products * 2 * n * kU64 * at::linalg_matrix_norm(x64, 2).item<double>());
}

TEST(InverseRoot, EigenSatisfiesTheDefiningEquation) {
  for (double cond : {1e2, 1e4, 1e6}) {
    const at::Tensor a = spd_with_spectrum(at::logspace(0, -std::log10(cond), 64, 10, at::kDouble), 5);
    const std::optional<at::Tensor> x = inverse_root_eigen(a, 4, 1e-6);
    ASSERT_TRUE(x.has_value());
    // fp64 eigh: eta = n u (times 1 + sqrt(n) epsilon for the ridge it moves), plus n u
    // for forming V f V^T.
    expect_inverse_root(*x, a, 4, 1e-6, 2 * 64 * kU64 * (1 + 8e-6));
  }
}

TEST(InverseRoot, NewtonMatchesEigenInDouble) {
  for (double cond : {1e2, 1e4}) {
    const at::Tensor a = spd_with_spectrum(at::logspace(0, -std::log10(cond), 48, 10, at::kDouble), 6);
    const at::Tensor newton = inverse_root_newton(a, 4, 1e-6, 200, 1e-12);
    // Coupled Newton keeps M = X^p (A + ridge) (Iannazzo 2006, stable) and stops at
    // max|M - I| <= tau = 1e-12, ||M - I||_2 <= n tau; rounding drift of its ~10-20
    // iterations is taken as the eigh's backward error (2 n u). Power iteration's lambda_max
    // (tolerance 1e-6) moves the ridge by <= 1e-6 epsilon lambda_max: relative 1e-12 of A.
    const double n = 48, tau = 1e-12;
    // Its iterations: M_0 = z A_d has eigenvalues down to ~(5/2) / (sqrt(n) kappa); each
    // step multiplies a small one by ((p + 1) / p)^p = 2.44 until it nears 1, then ~6
    // quadratic steps reach tau. Each product X T adds its own asymmetry.
    const double kappa_d = cond / (1 + 1e-6 * cond);
    const double iterations = std::ceil(std::log(2 * std::sqrt(n) * kappa_d / 5) / (4 * std::log(1.25))) + 6;
    expect_inverse_root(newton, a, 4, 1e-6, n * tau + 2 * n * kU64 + 1e-12, iterations);
    // Against the eigh root: X^4 = A_d^-1 (I + R), ||R||_F <= n tau, and the 4th root's
    // divided differences over A_d^-1's spectrum are <= (1/4)(lambda_max + ridge)^(3/4), so
    // ||dX||_F <= (1/4) kappa^(3/4) n tau ||X||_2; plus both roots' rounding.
    const at::Tensor values = at::linalg_eigvalsh(a);
    const double ridge = 1e-6 * values.max().item<double>();
    const double kappa = (values.max().item<double>() + ridge) / (values.min().item<double>() + ridge);
    EXPECT_LT(relative_error(newton, *inverse_root_eigen(a, 4, 1e-6)),
              std::pow(kappa, 0.75) * n * tau / 4 + 2 * root_relative_error_bound(a, 4, 1e-6, kU64)) << "cond " << cond;
  }
}

TEST(InverseRoot, Float32ResultsStayCloseToTheDoubleReference) {
  const at::Tensor a = spd_with_spectrum(at::logspace(0, -3, 64, 10, at::kDouble), 7);
  const at::Tensor reference = *inverse_root_eigen(a, 4, 1e-4);
  // fp32: the eigh bound at u = 2^-24 (~3e-4 here: lambda_min + ridge = 1.1e-3 makes
  // the divided differences up to ~1.4e3 times the root's scale); plus the fp64 reference's
  // own (negligible) and the fp32 input A (rounded by u: a backward error of its own).
  const double eigen_bound = root_relative_error_bound(a, 4, 1e-4, kU32) * (1 + 1.0 / 64) +
                             root_relative_error_bound(a, 4, 1e-4, kU64);
  EXPECT_LT(relative_error(*inverse_root_eigen(a.to(at::kFloat), 4, 1e-4), reference), eigen_bound);
  // Newton in fp32 stops at its default tau = 1e-6 (n tau / 4 relative) or where fp32
  // stalls it, which we take as the eigh's bound.
  EXPECT_LT(relative_error(inverse_root_newton(a.to(at::kFloat), 4, 1e-4), reference), eigen_bound + 64 * 1e-6 / 4);
}

TEST(InverseRoot, ZeroMatrixGivesABoundedRoot) {
  const at::Tensor zero = at::zeros({8, 8});
  const at::Tensor x = *inverse_root_eigen(zero, 4, 1e-6);
  EXPECT_TRUE(x.isfinite().all().item<bool>());
  EXPECT_TRUE(inverse_root_newton(zero, 4, 1e-6).isfinite().all().item<bool>());
}

}  // namespace
}  // namespace lowbit::linalg
