// The Table 1 error analysis: metrics, synthetic matrices, the fp64 reference and the
// orderings the paper reports (order 256 keeps the suite fast).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <tuple>

#include "analysis/quant_error.h"

namespace lowbit::analysis {
namespace {

constexpr int64_t kOrder = 256;
constexpr double kEpsilon = 1e-4;
constexpr double kU = 0x1p-53;  // fp64 unit roundoff

// A sum of n fp64 terms is within gamma_n = n u / (1 - n u) of the exact sum, relative to the
// sum of the terms' magnitudes (Higham 3.1): Frobenius norms and inner products of the 20 x 20
// test matrices (400 terms) are within gamma_400 ~ 4.4e-14, whatever the summation order.
constexpr double gamma(double n) { return n * kU / (1 - n * kU); }

// Tolerance in degrees for an angle computed as acos(<f, g> / (||f|| ||g||)) whose cosine is
// off by at most dc: |d acos| <= dc / sin(angle), and near 0 or 180 degrees, where that
// diverges, acos(1 - dc) <= sqrt(2 dc) (the cosine is clamped to [-1, 1]).
double angle_tolerance_deg(double angle_deg, double dc) {
  const double s = std::sin(angle_deg * M_PI / 180.0);
  const double radians = s > std::sqrt(2 * dc) ? dc / s : std::sqrt(2 * dc);
  return radians * 180.0 / M_PI;
}

at::Tensor symmetric_test_matrix() {
  const at::Tensor x = at::randn({20, 20}, at::kDouble);
  return x + x.t();
}

TEST(QuantErrorMetrics, NormalizedRelativeErrorOfKnownPairs) {
  at::manual_seed(3);
  const at::Tensor f = symmetric_test_matrix();
  EXPECT_EQ(normalized_relative_error(f, f), 0.0);
  // f - 2f = -f and f - 0 = f are exact, so the ratio is of two norms of the same values,
  // each within gamma_400 (their summation orders may differ), and one division (u).
  EXPECT_NEAR(normalized_relative_error(f, 2 * f), 1.0, 2 * gamma(400) + kU);
  EXPECT_NEAR(normalized_relative_error(f, at::zeros_like(f)), 1.0, 2 * gamma(400) + kU);
  // Rounding to fp32 moves each element by <= 2^-24 of itself: NRE <= 2^-24, plus the fp64
  // arithmetic of the metric (a few gamma_400 relative to that).
  EXPECT_NEAR(normalized_relative_error(f, f.to(at::kFloat)), 0.0, 0x1p-24 * (1 + 3 * gamma(400)));
  EXPECT_THROW(normalized_relative_error(f, f.narrow(0, 0, 10)), c10::Error);
}

TEST(QuantErrorMetrics, AngleOfKnownPairs) {
  at::manual_seed(4);
  const at::Tensor f = symmetric_test_matrix();
  // The cosine is off by <= 3 gamma_400 + 2u (the inner product and the two norms, the
  // product and division), so the angle by sqrt(2 dc) at 0 and 180 degrees (~2e-5 deg).
  const double dc = 3 * gamma(400) + 2 * kU;
  EXPECT_NEAR(angle_error_deg(f, f), 0.0, angle_tolerance_deg(0, dc));
  EXPECT_NEAR(angle_error_deg(f, 2 * f), 0.0, angle_tolerance_deg(0, dc));
  EXPECT_NEAR(angle_error_deg(f, -f), 180.0, angle_tolerance_deg(180, dc));
  // An antisymmetric matrix is Frobenius-orthogonal to every symmetric one, so mixing the
  // two unit matrices with (cos t, sin t) gives exactly the angle t.
  const at::Tensor x = at::randn({20, 20}, at::kDouble);
  const at::Tensor h = x - x.t();
  // (Here the slope of acos is 1 / sin(angle): <= 2 at 30 degrees; g itself is built with
  // ~4u of rounding per element, which moves the cosine by <= 4u more.)
  EXPECT_NEAR(angle_error_deg(f, h), 90.0, angle_tolerance_deg(90, dc));
  const double t = 30.0 * M_PI / 180.0;
  const at::Tensor g = std::cos(t) * f / f.norm() + std::sin(t) * h / h.norm();
  EXPECT_NEAR(angle_error_deg(f, g), 30.0, angle_tolerance_deg(30, dc + 4 * kU));
  EXPECT_NEAR(angle_error_deg(f, 5 * g), 30.0, angle_tolerance_deg(30, dc + 5 * kU));
  EXPECT_THROW(angle_error_deg(f, at::zeros_like(f)), c10::Error);
}

// The documented spectra, written out again here rather than taken from the library.
at::Tensor documented_spectrum(const std::string& name, int64_t n) {
  at::Tensor values = at::empty({n}, at::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    const double position = static_cast<double>(i) / static_cast<double>(n - 1);
    double v = 0;
    if (name == "geometric-1e2") v = std::pow(1e2, -position);
    if (name == "geometric-1e4") v = std::pow(1e4, -position);
    if (name == "geometric-1e6") v = std::pow(1e6, -position);
    if (name == "fast-decay") v = std::pow(static_cast<double>(i + 1), -4.0);
    if (name == "two-clusters") v = i < n / 2 ? 1.0 : 1e-3;
    values[i] = v;
  }
  return values;
}

TEST(QuantErrorMatrices, SpectraAreAsDocumented) {
  ASSERT_EQ(synthetic_matrix_names().size(), 5u);
  for (const std::string& name : synthetic_matrix_names()) {
    const at::Tensor expected = documented_spectrum(name, kOrder);
    // Both sides evaluate b^(-t) in fp64: pow is within an ulp or two, and an exponent t
    // computed another way (i / (n - 1) vs i * (1 / (n - 1))) may differ by u, which moves
    // b^(-t) by ln(b) t u <= ln(1e6) u = 13.8u; on both sides: <= 2 (13.8 + 2) u < 32u.
    EXPECT_TRUE(at::allclose(synthetic_spectrum(name, kOrder), expected, 32 * kU, 0)) << name;
    const at::Tensor a = synthetic_spd_matrix(name, kOrder, 7);
    ASSERT_EQ(a.scalar_type(), at::kDouble);
    EXPECT_TRUE(at::equal(a, a.t())) << name;
    const at::Tensor computed = at::flip(at::linalg_eigvalsh(a), {0});  // descending, as documented
    // Forming Q diag(lambda) Q^T and eigvalsh each move an eigenvalue by <= n u ||A||
    // (Weyl's inequality on their backward errors; LAPACK's p(n) = 1, we take n).
    EXPECT_LT((computed - expected).abs().max().item<double>(), 2 * kOrder * kU * expected.max().item<double>()) << name;
  }
}

TEST(QuantErrorMatrices, SeededAndRejectsBadInput) {
  const at::Tensor a = synthetic_spd_matrix("two-clusters", 32, 1);
  EXPECT_TRUE(at::equal(a, synthetic_spd_matrix("two-clusters", 32, 1)));
  EXPECT_FALSE(at::allclose(a, synthetic_spd_matrix("two-clusters", 32, 2)));
  EXPECT_THROW(synthetic_spd_matrix("no-such-matrix", 32, 1), c10::Error);
  EXPECT_THROW(synthetic_spd_matrix("two-clusters", 0, 1), c10::Error);
  QuantErrorOptions options;
  options.order = 16;
  options.matrices = {"two-clusters", "typo"};
  EXPECT_THROW(quant_error_table(options), c10::Error);
}

TEST(QuantErrorReference, IsTheRegularizedInverseFourthRoot) {
  for (const std::string& name : synthetic_matrix_names()) {
    const at::Tensor a = synthetic_spd_matrix(name, kOrder, 5);
    const at::Tensor f = reference_inverse_fourth_root(a, kEpsilon);
    const double lambda_max = at::linalg_eigvalsh(a).max().item<double>();
    const at::Tensor identity = at::eye(kOrder, at::kDouble);
    const at::Tensor product = at::matmul(at::linalg_matrix_power(f, 4), a + kEpsilon * lambda_max * identity);
    // f is exact for A + E, ||E|| <= 2 n u ||A|| (eigh, then forming V f V^T), so
    // f^4 (A + ridge) - I = -f^4 E, <= 2 n u kappa with kappa = (lambda_max + ridge) /
    // (lambda_min + ridge) (<= 1 / epsilon); the 4 products here add 4 n u kappa.
    const at::Tensor values = at::linalg_eigvalsh(a);
    const double ridge = kEpsilon * lambda_max;
    const double kappa = (lambda_max + ridge) / (values.min().item<double>() + ridge);
    EXPECT_LT((product - identity).abs().max().item<double>(), 6 * kOrder * kU * kappa) << name;
  }
}

// matrix, mapping, bits, method, OR, updates, EF
using Key = std::tuple<std::string, std::string, int, std::string, bool, int, bool>;

class QuantErrorTable : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    QuantErrorOptions options;
    options.order = kOrder;
    options.epsilon = kEpsilon;
    options.matrices = {"two-clusters", "geometric-1e4"};
    rows_ = new std::vector<QuantErrorRow>(quant_error_table(options));
    by_key_ = new std::map<Key, QuantErrorRow>();
    for (const QuantErrorRow& r : *rows_)
      (*by_key_)[{r.matrix, r.mapping, r.bits, r.quantized, r.rectified, r.updates, r.error_feedback}] = r;
  }
  static void TearDownTestSuite() {
    delete rows_;
    delete by_key_;
  }
  static const QuantErrorRow& row(const std::string& matrix, const std::string& mapping, int bits,
                                  const std::string& quantized, bool rectified, int updates = 1,
                                  bool error_feedback = false) {
    return by_key_->at({matrix, mapping, bits, quantized, rectified, updates, error_feedback});
  }
  static inline std::vector<QuantErrorRow>* rows_ = nullptr;
  static inline std::map<Key, QuantErrorRow>* by_key_ = nullptr;
};

const std::vector<std::string> kMatrices{"two-clusters", "geometric-1e4"};
const std::vector<std::string> kMappings{"linear2", "dynamic"};
// (quantized, rectified) of the three methods, best last.
const std::vector<std::pair<std::string, bool>> kMethods{
    {"matrix", false}, {"eigenvectors", false}, {"eigenvectors", true}};

TEST_F(QuantErrorTable, HasEveryRowOnce) {
  // matrices x (table mappings x bits x (4 + 3 Cholesky) methods + kashin x bits {4, 3} x 4 methods)
  EXPECT_EQ(rows_->size(), 2u * (2 * 3 * 7 + 2 * 4));
  EXPECT_EQ(by_key_->size(), rows_->size());
  for (const QuantErrorRow& r : *rows_) {
    EXPECT_TRUE(std::isfinite(r.nre) && r.nre > 0) << r.matrix << " " << r.mapping << " " << r.bits;
    EXPECT_TRUE(r.angle_deg > 0 && r.angle_deg < 90) << r.matrix << " " << r.mapping << " " << r.bits;
  }
}

// The paper's Table 1 ordering at 4 bits: QM=U with Björck < QM=U < QM=A. These and the
// orderings below compare deterministic quantities (fixed seed, nearest rounding); what can
// move them between machines is fp32 rounding in the eigenvector paths, measured at <= 1%
// of a value between MKL's AVX-512 and SSE4.2 paths (e.g. NRE 0.1561 vs 0.1549), the
// matrix rows being identical. Every ordering asserted holds by >= 2% (the tightest: QM = A
// at 4 vs 3 bits on two-clusters, 0.656 vs 0.677 and 0.664 vs 0.679, both near the
// saturation of quantizing A itself); the others by >= 2x (docs/quant_error.md).
TEST_F(QuantErrorTable, EigenvectorQuantizationBeatsMatrixQuantizationAndBjorckHelps) {
  for (const std::string& matrix : kMatrices) {
    for (const std::string& mapping : kMappings) {
      const QuantErrorRow& naive = row(matrix, mapping, 4, "matrix", false);
      const QuantErrorRow& eigen = row(matrix, mapping, 4, "eigenvectors", false);
      const QuantErrorRow& rectified = row(matrix, mapping, 4, "eigenvectors", true);
      EXPECT_LT(rectified.nre, eigen.nre) << matrix << " " << mapping;
      EXPECT_LT(eigen.nre, naive.nre) << matrix << " " << mapping;
      EXPECT_LT(rectified.angle_deg, eigen.angle_deg) << matrix << " " << mapping;
      EXPECT_LT(eigen.angle_deg, naive.angle_deg) << matrix << " " << mapping;
    }
  }
}

// Issue 20: the paper's 4-bit Shampoo rounds twice, the eigenvectors and then the root made
// from them; root_storage "eigen" applies the root of the rectified eigenvectors without the
// second rounding. Two roundings of comparable size add roughly in quadrature (independent
// errors), so the stored root's NRE should exceed the eigen form's by a clear factor at 4 and
// 3 bits: measured at order 256, 0.0632 -> 0.0874 (two-clusters) and 0.0551 -> 0.0776
// (geometric-1e4) at linear-2 4 bits, 1.36x to 1.41x in every case at 4 and 3 bits (a
// quadrature sum of equal errors would give 1.41x), against <= 1% path variation; bound 1.15x.
TEST_F(QuantErrorTable, TheStoredRootAddsASecondRoundingThatTheEigenFormAvoids) {
  for (const std::string& matrix : kMatrices) {
    for (const std::string& mapping : kMappings) {
      for (const int bits : {4, 3}) {
        const QuantErrorRow& eigen_form = row(matrix, mapping, bits, "eigenvectors", true);
        const QuantErrorRow& stored = row(matrix, mapping, bits, "eigenvectors+root", true);
        EXPECT_GT(stored.nre, 1.15 * eigen_form.nre) << matrix << " " << mapping << " " << bits;
      }
    }
  }
}

TEST_F(QuantErrorTable, MoreBitsGiveSmallerErrors) {
  for (const std::string& matrix : kMatrices) {
    for (const std::string& mapping : kMappings) {
      for (const auto& [quantized, rectified] : kMethods) {
        const QuantErrorRow& b8 = row(matrix, mapping, 8, quantized, rectified);
        const QuantErrorRow& b4 = row(matrix, mapping, 4, quantized, rectified);
        const QuantErrorRow& b3 = row(matrix, mapping, 3, quantized, rectified);
        const std::string where = matrix + " " + mapping + " " + quantized + (rectified ? " OR" : "");
        EXPECT_LT(b8.nre, b4.nre) << where;
        EXPECT_LT(b4.nre, b3.nre) << where;
        EXPECT_LT(b8.angle_deg, b4.angle_deg) << where;
        EXPECT_LT(b4.angle_deg, b3.angle_deg) << where;
      }
    }
  }
}

// Li et al. (arXiv 2412.10663): the Cholesky factor keeps the spectrum far better than the
// matrix itself at the same bits (measured at order 256: 4-bit linear-2 NRE 0.21 / 0.16
// against 0.66 / 0.64 for QM = A). Along a chain of EMA updates towards the same matrix the
// rounding compounds; at 8 bits with the dynamic map, where one store's error is systematic,
// error feedback undoes most of it (0.21 -> 0.03 and 0.13 -> 0.02). At 4 bits the static
// chain shows no consistent gain from feedback (docs/quant_error.md); the training-like case,
// fresh gradients every update, is tested in shampoo_variants_test.
// Margins (measured, identical to 4 decimals on AVX-512 and SSE4.2): Cholesky / matrix
// <= 0.39 (bound 0.5), chain / once >= 9.2 (bound 3), chain with feedback / without <= 0.16
// (bound 0.5); each bound is >= 1.3x away from the value, against <= 1% path variation.
TEST_F(QuantErrorTable, CholeskyBeatsTheMatrixAndFeedbackUndoesCompounding) {
  for (const std::string& matrix : kMatrices) {
    for (const std::string& mapping : kMappings) {
      for (const int bits : {8, 4}) {
        const double cholesky = row(matrix, mapping, bits, "cholesky", false).nre;
        EXPECT_LT(cholesky, 0.5 * row(matrix, mapping, bits, "matrix", false).nre) << matrix << " " << mapping << " " << bits;
      }
    }
    const double chain = row(matrix, "dynamic", 8, "cholesky", false, kCholeskyChainUpdates, false).nre;
    const double chain_ef = row(matrix, "dynamic", 8, "cholesky", false, kCholeskyChainUpdates, true).nre;
    const double once = row(matrix, "dynamic", 8, "cholesky", false).nre;
    EXPECT_GT(chain, 3 * once) << matrix;  // the compounding is real
    EXPECT_LT(chain_ef, 0.5 * chain) << matrix;
  }
}

}  // namespace
}  // namespace lowbit::analysis
