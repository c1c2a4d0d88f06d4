// Preconditioner pieces: the block partition, factor kinds and memory, and how close the
// quantized preconditioners stay to fp32 Shampoo on a stream of gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "precond/factor_refresh.h"
#include "precond/parameter_preconditioner.h"

namespace lowbit::precond {
namespace {

std::vector<int64_t> block_dims(const Partition& p) {
  std::vector<int64_t> out;
  for (const BlockSlice& b : p.blocks) {
    out.push_back(b.rows);
    out.push_back(b.cols);
  }
  return out;
}

TEST(Partition, DropsUnitDimensionsFlattensAndSplits) {
  EXPECT_FALSE(partition_shape({}, 1200).preconditioned());        // scalar
  EXPECT_FALSE(partition_shape({7}, 1200).preconditioned());       // vector
  EXPECT_FALSE(partition_shape({1, 7, 1}, 1200).preconditioned()); // a vector in disguise
  EXPECT_FALSE(partition_shape({0, 5}, 1200).preconditioned());    // empty
  const Partition a = partition_shape({1, 64, 1, 3}, 1200);
  EXPECT_EQ(a.rows, 64);
  EXPECT_EQ(a.cols, 3);
  EXPECT_EQ(block_dims(a), (std::vector<int64_t>{64, 3}));
  const Partition conv = partition_shape({8, 3, 3, 3}, 1200);
  EXPECT_EQ(block_dims(conv), (std::vector<int64_t>{8, 27}));
  const Partition big = partition_shape({2500, 10}, 1200);
  EXPECT_EQ(block_dims(big), (std::vector<int64_t>{1200, 10, 1200, 10, 100, 10}));
  EXPECT_EQ(big.blocks[2].row0, 2400);
  const Partition both = partition_shape({5, 7}, 4);
  EXPECT_EQ(block_dims(both), (std::vector<int64_t>{4, 4, 4, 3, 1, 4, 1, 3}));
}

PreconditionerConfig config(FactorKind kind, int bits = 4) {
  PreconditionerConfig c;
  c.kind = kind;
  c.factor.quant.bits = bits;
  c.factor.epsilon = 1e-6;
  c.min_quant_numel = 4096;
  return c;
}

TEST(ParameterPreconditioner, SmallFactorsStayFp32AndStateBytesFollowTheLayout) {
  // 200 x 40: the 200-factor is quantized, the 40-factor (1600 < 4096 elements) stays fp32.
  const ParameterPreconditioner p({200, 40}, at::TensorOptions(), config(FactorKind::EigenQuantized));
  const auto factors = p.factors();
  ASSERT_EQ(factors.size(), 2u);
  EXPECT_EQ(factors[0]->kind(), FactorKind::EigenQuantized);
  EXPECT_EQ(factors[1]->kind(), FactorKind::Dense);
  const int64_t n = 200, blocks = (n + 63) / 64;
  const int64_t eigenvectors = n * n / 2 + 4 * n * blocks;
  const int64_t root = n * n / 2 + 4 * n * blocks + 4 * n;  // + fp32 diagonal
  EXPECT_EQ(factors[0]->state_bytes(), eigenvectors + 4 * n + root);
  EXPECT_EQ(factors[1]->state_bytes(), 2 * 40 * 40 * 4);

  const ParameterPreconditioner naive({200, 40}, at::TensorOptions(), config(FactorKind::NaiveQuantized));
  EXPECT_EQ(naive.factors()[0]->state_bytes(), 2 * root);
  const ParameterPreconditioner dense({200, 40}, at::TensorOptions(), config(FactorKind::Dense));
  EXPECT_EQ(dense.state_bytes(), 2 * (n * n + 40 * 40) * 4);
  // 4-bit state against fp32 for this 200-factor, from the byte counts pinned above:
  // (2 (n^2 / 2 + 4 n blocks) + 4 n + 4 n) / (2 n^2 4) = 48000 / 320000, exactly 0.15 (the
  // paper's 4.5 / 32 = 0.14 plus the fp32 eigenvalues and root diagonal).
  EXPECT_DOUBLE_EQ(static_cast<double>(factors[0]->state_bytes()) / (2 * n * n * 4), 0.15);
}

// Runs fp32 and quantized preconditioners side by side on one gradient stream and
// returns the mean relative error of the preconditioned gradient over the last steps.
double relative_error_vs_fp32(const PreconditionerConfig& quantized, int steps, uint64_t seed) {
  const std::vector<int64_t> shape{128, 96};
  ParameterPreconditioner reference(shape, at::TensorOptions(), config(FactorKind::Dense));
  ParameterPreconditioner tested(shape, at::TensorOptions(), quantized);
  at::manual_seed(seed);
  // Gradients with a decaying spectrum on both sides, like real layers.
  const at::Tensor left = at::matmul(std::get<0>(at::linalg_qr(at::randn({128, 128}))), at::diag(at::logspace(0, -3, 128)));
  const at::Tensor right = at::matmul(at::diag(at::logspace(0, -1, 96)), std::get<0>(at::linalg_qr(at::randn({96, 96}))));
  double sum = 0;
  int counted = 0;
  for (int k = 1; k <= steps; ++k) {
    const at::Tensor g = at::matmul(at::matmul(left, at::randn({128, 96})), right);
    reference.update_statistics(g);
    tested.update_statistics(g);
    reference.update_inverse_roots();
    tested.update_inverse_roots();
    if (k > steps / 2) {
      const at::Tensor want = reference.precondition(g), got = tested.precondition(g);
      sum += ((got - want).norm() / want.norm()).item<double>();
      ++counted;
    }
  }
  return sum / counted;
}

// On this stationary stream with statistics and roots refreshed every step (T1 = T2 = 1):
// 4-bit 0.38 (no Björck 0.48, full eigh 0.36), 8-bit 0.13 (full eigh 0.07), naive 4-bit
// 0.27. Re-quantizing the eigenvectors at every update lets their rounding accumulate; the
// paper's ordering on A^(-1/4) itself (eigenvectors + Björck < eigenvectors < matrix) is
// checked in quant_error_test. These means are deterministic (fixed seed, nearest
// rounding) but for fp32 rounding that can flip a 4-bit code; measured over MKL AVX-512,
// AVX2, SSE4.2 and 2 threads, each value moves by <= 1% (e.g. full-eigh 4-bit / QR-step
// 4-bit 0.949 to 0.958). Margins of the bounds below, as measured ratio value / bound:
// e4 / 0.45 <= 0.86, e8 / (0.5 e4) <= 0.67, e4 / e4_raw <= 0.80, f4 / e4 <= 0.96 (the
// thinnest: 4x the path spread), f8 / e8 <= 0.59, naive / 0.45 = 0.59. The absolute 0.45
// is a stated bound on the 4-bit stream error (the paper gives none for this setting), ~18%
// above the measured 0.38, so a 20% regression fails.
TEST(QuantizedPreconditioners, StayCloseToFp32AndImproveWithBitsBjorckAndEigh) {
  PreconditionerConfig eigen4 = config(FactorKind::EigenQuantized);
  PreconditionerConfig unrectified = eigen4;
  unrectified.factor.bjorck_stat_steps = unrectified.factor.bjorck_root_steps = 0;
  PreconditionerConfig eigen8 = config(FactorKind::EigenQuantized, 8);
  PreconditionerConfig full4 = eigen4, full8 = eigen8;
  full4.factor.eigen_update = full8.factor.eigen_update = EigenUpdate::Eigh;
  const double e4 = relative_error_vs_fp32(eigen4, 40, 1);
  const double e4_raw = relative_error_vs_fp32(unrectified, 40, 1);
  const double e8 = relative_error_vs_fp32(eigen8, 40, 1);
  const double f4 = relative_error_vs_fp32(full4, 40, 1);
  const double f8 = relative_error_vs_fp32(full8, 40, 1);
  EXPECT_LT(e4, 0.45);
  EXPECT_LT(e8, 0.5 * e4);
  EXPECT_LT(e4, e4_raw);  // Björck rectification helps
  EXPECT_LT(f4, e4);      // a full eigendecomposition tracks the basis better than one QR step
  EXPECT_LT(f8, e8);
}

TEST(QuantizedPreconditioners, NaiveQuantizedStaysFiniteAndBounded) {
  const double n4 = relative_error_vs_fp32(config(FactorKind::NaiveQuantized), 40, 1);
  EXPECT_TRUE(std::isfinite(n4));
  EXPECT_LT(n4, 0.45);
}

// The eigen-form root (root_storage "eigen") against an fp64 reference built in the test from
// the factor's saved state: the eigenvectors it stores (dequantized by the codec, which its
// own tests check), t1 Björck steps and (lambda + eps lambda_max)^(-1/4), all in fp64.
// The factor computes the same in fp32: t1 = 1 Björck step (two products) and one
// recomposition, each an inner product of length n with entries of V bounded by ~1 (its
// columns have unit norm) and of D by max D, so each entry carries at most ~n u relative
// error per product (the classical gamma_n bound, u = 2^-24), and Björck's error reaches the
// root through both copies of V: 2 * 2 n u + n u = 5 n u, times max D; fp32 pow of the
// spectrum adds 1 ulp (u max D). Bound: 8 n u max D. (inverse_root() is a batch of one of
// the step's batched path: one stacked dequantization, Björck and recomposition per order.)
// The step must apply those roots: the preconditioned gradient L^(-1/4) G R^(-1/4), rescaled
// to the gradient's norm, within 8 n u relative error (the two products and the norm add
// ~2 n u, within the margin the bound leaves over the sum of the worst cases).
TEST(QuantizedPreconditioners, EigenFormRootIsTheStoredEigenvectorsRecomposedAndStoresNoRoot) {
  PreconditionerConfig c = config(FactorKind::EigenQuantized);
  c.factor.eigen_form_root = true;
  ParameterPreconditioner p({128, 96}, at::TensorOptions(), c);
  at::manual_seed(3);
  const at::Tensor left = at::diag(at::logspace(0, -2, 128));
  for (int k = 0; k < 4; ++k) {
    p.update_statistics(at::matmul(left, at::randn({128, 96})));
    p.update_inverse_roots();
  }
  TensorMap saved;
  p.save(saved);
  for (const auto& [key, value] : saved) EXPECT_EQ(key.find("root"), std::string::npos) << key;
  const double u = std::ldexp(1.0, -24);
  std::vector<at::Tensor> roots;
  for (const KroneckerFactor* f : p.factors()) {
    ASSERT_EQ(f->kind(), FactorKind::EigenQuantized);
    const int64_t n = f->order();
    // State: 4-bit U^T (n^2 / 2 bytes of codes, an fp32 scale per 64-block) and fp32 lambda.
    EXPECT_EQ(f->state_bytes(), n * n / 2 + 4 * n * ((n + 63) / 64) + 4 * n);
    EXPECT_EQ(f->quantized_root(), nullptr);
    TensorMap mine;
    f->save(mine, "");
    const QuantizedMatrix stored = load_quantized(mine, "eigenvectors_t.", {n, n}, c.factor.quant);
    at::Tensor v = stored.dequantize().t().to(at::kDouble);
    for (int i = 0; i < c.factor.bjorck_stat_steps; ++i) v = 1.5 * v - 0.5 * v.mm(v.t().mm(v));
    const at::Tensor lambda = mine.at("eigenvalues").to(at::kDouble).clamp_min(0);
    const at::Tensor d = (lambda + c.factor.epsilon * lambda.max()).pow(-0.25);
    const at::Tensor want = (v * d.unsqueeze(0)).mm(v.t());
    const at::Tensor got = f->inverse_root();
    roots.push_back(got);
    const double bound = 8 * n * u * d.max().item<double>();
    EXPECT_LE((got.to(at::kDouble) - want).abs().max().item<double>(), bound) << "order " << n;
  }
  const at::Tensor g = at::randn({128, 96});
  const at::Tensor raw = roots[0].mm(g).mm(roots[1]);
  const at::Tensor want = raw * (g.norm() / raw.norm());
  const at::Tensor got = p.precondition(g);
  EXPECT_LE(((got - want).norm() / want.norm()).item<double>(), 8 * 128 * u);
}

// keep_mask decides which candidates a refresh stores: exactly those without NaN or an
// infinity, whatever their layout (the QR step's bases are column-major views) and however
// large their finite values (FLT_MAX itself is kept).
TEST(FactorRefresh, KeepMaskRejectsExactlyTheCandidatesWithANonFiniteValue) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const at::Tensor candidates = at::randn({6, 5, 5}).mT();  // column-major, as the QR step writes
  candidates[1][4][0] = nan;
  candidates[2][0][3] = inf;
  candidates[3][2][2] = -inf;
  candidates[4][1][1] = inf;  // both infinities in one candidate
  candidates[4][3][0] = -inf;
  candidates[5].fill_(std::numeric_limits<float>::max());
  candidates[5][0][0] = -std::numeric_limits<float>::max();
  const at::Tensor keep = keep_mask(candidates);
  ASSERT_EQ(keep.sizes(), at::IntArrayRef({6}));
  ASSERT_EQ(keep.scalar_type(), at::kBool);
  const std::vector<bool> want = {true, false, false, false, false, true};
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(keep[i].item<bool>(), want[static_cast<size_t>(i)]) << "candidate " << i;
}

// The statistics' outer products on a CPU (one product per side, transposed sides read as they
// are) against fp64: each entry is an inner product of length k, so its error is at most
// k u sum_j |a_ij b_jl| (the classical gamma_k bound, u = 2^-24), checked per entry.
TEST(FactorRefresh, OuterProductsOfMixedWidthsAndLayoutsMatchFp64) {
  const at::Tensor g = at::randn({7, 12});
  const std::vector<at::Tensor> sides = {g, at::randn({12, 7}).t(), at::randn({7, 3}), g.mul(3)};
  const at::Tensor out = at::full({4, 7, 7}, 99.0f);  // beta 0: whatever out held is ignored
  outer_products(sides, out, /*gram=*/false);
  const double u = std::ldexp(1.0, -24);
  for (size_t i = 0; i < sides.size(); ++i) {
    const at::Tensor s = sides[i].to(at::kDouble);
    const at::Tensor want = s.mm(s.t()), scale = s.abs().mm(s.abs().t());
    const at::Tensor error = (out[static_cast<int64_t>(i)].to(at::kDouble) - want).abs();
    EXPECT_TRUE(error.le(s.size(1) * u * scale).all().item<bool>()) << "side " << i;
  }
}

}  // namespace
}  // namespace lowbit::precond
