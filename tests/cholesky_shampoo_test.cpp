// Cholesky-quantized Shampoo (quantize = "cholesky"): the packed storage against the codec
// used directly, positive definiteness under many updates, error feedback against none
// (both against an fp64 reference statistic), and the optimizer's checkpoints.
#include <gtest/gtest.h>

#include <lowbit/codebook.h>
#include <lowbit/shampoo.h>

#include <cmath>
#include <iostream>

#include "archive_bytes.h"
#include "expect_error.h"
#include "optimizer_fixtures.h"
#include "precond/factor_kinds.h"

namespace lowbit {
namespace {

using precond::QuantizedCholesky;

QuantOptions four_bit() {
  QuantOptions q;
  q.bits = 4;
  q.mapping = Mapping::Linear2;
  q.block_size = 64;
  return q;
}

// A lower triangular matrix with a positive diagonal (fp64).
at::Tensor random_factor(int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  return at::tril(at::randn({n, n}, at::kDouble), -1) + at::diag(at::rand({n}, at::kDouble) + 0.5);
}

// Largest rounding error of a table normalized to [-1, 1]: half its widest gap.
double half_widest_gap(const at::Tensor& table) {
  const at::Tensor sorted = std::get<0>(table.to(at::kDouble).sort());
  return (sorted.slice(0, 1) - sorted.slice(0, 0, -1)).max().item<double>() / 2;
}

TEST(CholeskyStorage, PackingRoundTripsTheStrictlyLowerTriangle) {
  const at::Tensor c = random_factor(9, 1);
  const at::Tensor packed = precond::pack_strict_lower(c);
  ASSERT_EQ(packed.sizes(), at::IntArrayRef({1, 36}));
  EXPECT_EQ(packed[0][0].item<double>(), c[1][0].item<double>());  // row by row (a copy: exact)
  EXPECT_EQ(packed[0][2].item<double>(), c[2][1].item<double>());
  EXPECT_TRUE(at::equal(precond::unpack_lower(packed, c.diagonal()), c));
}

TEST(CholeskyStorage, KeepsTheDiagonalExactAndBoundsTheTriangleError) {
  const at::Tensor c = random_factor(80, 2);
  const QuantizedCholesky q = precond::store_cholesky(c, four_bit(), false, 0.0, nullptr);
  EXPECT_FALSE(q.error_feedback());
  const at::Tensor back = precond::reconstruct_factor(q).to(at::kDouble);
  EXPECT_TRUE(at::equal(back.triu(1), at::zeros_like(back)));  // still lower triangular
  EXPECT_TRUE(at::allclose(back.diagonal(), c.diagonal().to(at::kFloat).to(at::kDouble), 0, 0));
  // Each packed block of 64 shares its absmax: an element is off by at most that times the
  // table's half gap, plus fp32 rounding: the fp64 factor cast to fp32 (u |x| <= u absmax)
  // and the dequantized code * scale (u absmax), u = 2^-24; the absmax of the fp32 values is
  // within u of the fp64 one (u gap absmax more): absmax (gap (1 + u) + 2u) < absmax (gap + 3u).
  const at::Tensor truth = precond::pack_strict_lower(c).reshape({-1});
  const at::Tensor got = precond::pack_strict_lower(back).reshape({-1});
  const double gap = half_widest_gap(codebook(Mapping::Linear2, 4));
  for (int64_t start = 0; start < truth.numel(); start += 64) {
    const int64_t len = std::min<int64_t>(64, truth.numel() - start);
    const double absmax = truth.narrow(0, start, len).abs().max().item<double>();
    const double worst = (truth.narrow(0, start, len) - got.narrow(0, start, len)).abs().max().item<double>();
    ASSERT_LE(worst, absmax * (gap + 3 * 0x1p-24)) << "block at " << start;
  }
  // Bytes: fp32 diagonal + one packed 4-bit row (codes and fp32 scales).
  const int64_t packed = 80 * 79 / 2;
  EXPECT_EQ(q.nbytes(), 80 * 4 + (packed * 4 + 7) / 8 + 4 * ((packed + 63) / 64));
}

TEST(CholeskyStorage, ErrorFeedbackStoresTheFactorPlusTheCarriedError) {
  const QuantOptions options = four_bit();
  const at::Tensor c1 = random_factor(40, 3), c2 = random_factor(40, 4);
  const QuantizedCholesky first = precond::store_cholesky(c1, options, true, 0.0, nullptr);
  ASSERT_TRUE(first.error_feedback());
  // b_e = 0: E_1 = C_1 - D(Q(C_1)) (itself stored at 4 bits).
  const at::Tensor target1 = precond::pack_strict_lower(c1).to(at::kFloat);
  const at::Tensor residual1 = target1 - first.lower.dequantize();
  const at::Tensor e1 = first.error.dequantize();
  // E_1 is the residual stored at 4 bits: within the half gap of its block's absmax (bounded
  // here by the whole residual's absmax), plus u for each of the stored code * scale, the
  // residual formed in another order (target - D(Q(C_1)) in fp32) and the scale's absmax.
  const double half_gap = half_widest_gap(codebook(Mapping::Linear2, 4));
  EXPECT_LE((e1 - residual1).abs().max().item<double>(), residual1.abs().max().item<double>() * (half_gap + 3 * 0x1p-24));
  // The next store quantizes C_2 + E_1, exactly as the codec does on its own.
  const QuantizedCholesky second = precond::store_cholesky(c2, options, true, 0.0, &first);
  QuantOptions row = options;
  const at::Tensor expected =
      QuantizedMatrix::quantize(precond::pack_strict_lower(c2).to(at::kFloat) + e1, row).dequantize();
  EXPECT_TRUE(at::equal(second.lower.dequantize(), expected));
  // With b_e = 0.5 the error state is half the old one plus half the new residual.
  const QuantizedCholesky decayed = precond::store_cholesky(c2, options, true, 0.5, &first);
  const at::Tensor target2 = precond::pack_strict_lower(c2).to(at::kFloat) + e1;
  const at::Tensor residual2 = target2 - decayed.lower.dequantize();
  const at::Tensor want = e1 * 0.5 + residual2 * 0.5;
  // The stored error is want at 4 bits: half gap times its absmax, plus fp32 rounding of the
  // two halves and their sum done in another order (u of each part and of the sum), and of
  // code * scale and the absmax (2u of want).
  const double parts = 0.5 * (e1.abs().max().item<double>() + residual2.abs().max().item<double>());
  EXPECT_LE((decayed.error.dequantize() - want).abs().max().item<double>(),
            want.abs().max().item<double>() * (half_gap + 3 * 0x1p-24) + 2 * 0x1p-24 * parts);
}

precond::FactorConfig cholesky_config(bool error_feedback) {
  precond::FactorConfig config;
  config.quant = four_bit();
  config.error_feedback = error_feedback;
  return config;
}

// Gradients with a decaying spectrum (so the statistic is ill-conditioned) and rank far
// below the order: the hard case for positive definiteness.
at::Tensor correlated_gradient(const at::Tensor& mixing, int64_t columns, at::Generator& gen) {
  return at::matmul(mixing, at::randn({mixing.size(1), columns}, gen, at::kDouble));
}

at::Tensor mixing_matrix(int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({n, n}, gen, at::kDouble) * at::logspace(0, -2, n, 10.0, at::kDouble).unsqueeze(0);
}

TEST(CholeskyFactor, StaysPositiveDefiniteUnderRepeatedLowRankUpdates) {
  const int64_t n = 64;
  for (const bool ef : {false, true}) {
    auto factor = precond::make_factor(precond::FactorKind::CholeskyQuantized, n, at::TensorOptions(),
                                       cholesky_config(ef));
    const at::Tensor mixing = mixing_matrix(n, 5);
    at::Generator gen = at::detail::createCPUGenerator(6);
    for (int k = 1; k <= 300; ++k) {
      const at::Tensor g = correlated_gradient(mixing, 2, gen);  // rank 2 per update
      factor->update_statistic(g.to(at::kFloat));
      if (k % 25 != 0) continue;
      const at::Tensor s = factor->statistic().to(at::kDouble);
      const double min_eig = at::linalg_eigvalsh(s).min().item<double>();
      ASSERT_GT(min_eig, 0) << "EF " << ef << " update " << k;
      factor->update_inverse_root();
      ASSERT_EQ(factor->failures(), 0) << "EF " << ef << " update " << k;
      ASSERT_TRUE(factor->inverse_root().isfinite().all().item<bool>());
    }
    EXPECT_EQ(factor->failures(), 0) << "EF " << ef;
    // The diagonal of the stored factor is what makes C~ C~^T definite: all positive.
    const auto& stored = static_cast<const precond::CholeskyQuantizedFactor&>(*factor).stored_factor();
    EXPECT_TRUE(stored.diagonal.gt(0).all().item<bool>());
  }
}

// Mean relative error of the stored statistic against the fp64 EMA of the same outer
// products (and the same ridge) over the last 50 of 200 updates.
double accumulated_error(bool error_feedback, int bits, Mapping mapping) {
  const int64_t n = 96;
  precond::FactorConfig config = cholesky_config(error_feedback);
  config.quant.bits = bits;
  config.quant.mapping = mapping;
  auto factor = precond::make_factor(precond::FactorKind::CholeskyQuantized, n, at::TensorOptions(), config);
  const double beta = config.stat_decay;
  at::Tensor reference = config.epsilon * at::eye(n, at::kDouble);
  const at::Tensor mixing = mixing_matrix(n, 7);
  at::Generator gen = at::detail::createCPUGenerator(8);
  double total = 0;
  for (int k = 0; k < 200; ++k) {
    const at::Tensor g = correlated_gradient(mixing, 32, gen);
    const at::Tensor outer = at::matmul(g, g.t());
    const at::Tensor before = factor->statistic().to(at::kDouble);
    factor->update_statistic(g.to(at::kFloat));
    // The factor's ridge: epsilon times the largest diagonal entry of b S~ + (1 - b) G G^T.
    const double delta = config.epsilon * (before * beta + outer.to(at::kFloat).to(at::kDouble) * (1 - beta))
                                              .diagonal().max().item<double>();
    reference = reference * beta + (outer + at::eye(n, at::kDouble) * delta) * (1 - beta);
    if (k >= 150)
      total += ((factor->statistic().to(at::kDouble) - reference).norm() / reference.norm()).item<double>();
  }
  return total / 50;
}

// Without feedback, the rounding of every store enters the next statistic and compounds;
// feeding the residual back makes successive roundings cancel. Measured (n = 96, 200
// updates): 4-bit linear-2 0.312 -> 0.108, 4-bit dynamic 0.330 -> 0.153, 8-bit dynamic 0.046
// -> 0.0083, identical to 6 digits on MKL AVX-512, AVX2, SSE4.2 and with 2 threads (the
// stream is fixed; only fp32 rounding could flip a code). The test asks for a reduction by
// a third at least (measured ratios 0.35, 0.47, 0.18) and bounds the error with feedback
// against the fp64 reference by about twice the measured value (0.2, 0.3, 0.02): stated
// bounds on the method's accumulated error, not derived ones -- with feedback the error is
// a filtered difference of consecutive store residuals, each within the half gap of its
// block, whose sum the EMA does not let us bound tightly a priori.
TEST(CholeskyFactor, ErrorFeedbackReducesTheAccumulatedError) {
  struct Case {
    int bits;
    Mapping mapping;
    double bound;  // relative error of C~ C~^T with feedback
  };
  for (const Case& c : {Case{4, Mapping::Linear2, 0.2}, Case{4, Mapping::DynamicTree, 0.3},
                        Case{8, Mapping::DynamicTree, 0.02}}) {
    const double without = accumulated_error(false, c.bits, c.mapping);
    const double with = accumulated_error(true, c.bits, c.mapping);
    std::cout << "[cholesky EF] " << c.bits << "-bit " << to_string(c.mapping) << ": without " << without
              << ", with " << with << "\n";
    EXPECT_LT(with, without * 2.0 / 3.0) << c.bits << "-bit " << to_string(c.mapping);
    EXPECT_LT(with, c.bound) << c.bits << "-bit " << to_string(c.mapping);
    EXPECT_GT(with, 0);
  }
}

// ---------------------------------------------------------------- through the optimizer

ShampooOptions cholesky_options(bool error_feedback) {
  return ShampooOptions(1e-2).bits(4).quantize("cholesky").error_feedback(error_feedback).min_quant_numel(0)
      .stat_interval(1).root_interval(2);
}

TEST(CholeskyShampoo, StoresLessWithoutErrorFeedbackAndTrains) {
  for (const bool ef : {false, true}) {
    std::vector<at::Tensor> params = testing::make_params(11);
    Shampoo opt(params, cholesky_options(ef));
    for (int step = 0; step < 6; ++step) {
      testing::set_grads(params, 40 + step);
      opt.step();
    }
    EXPECT_EQ(opt.root_failures(), 0);
    for (const auto& p : params) EXPECT_TRUE(p.isfinite().all().item<bool>());
    // Orders 20, 30, 8 and 27: each factor holds its packed triangle (twice with EF).
    int64_t expected = 0;
    for (const int64_t n : {20, 30, 8, 27}) {
      const int64_t packed = n * (n - 1) / 2;
      const int64_t triangle = (packed * 4 + 7) / 8 + 4 * ((packed + 63) / 64);
      const int64_t root = n * ((n * 4 + 7) / 8) + 4 * n * ((n + 63) / 64) + 4 * n;
      expected += 4 * n + triangle * (ef ? 2 : 1) + root;
    }
    EXPECT_EQ(opt.state_bytes().preconditioner, expected) << "EF " << ef;
  }
}

TEST(CholeskyShampoo, CheckpointResumesBitIdenticallyAndRefusesAnotherLayout) {
  std::vector<at::Tensor> params = testing::make_params(12);
  Shampoo opt(params, cholesky_options(true));
  for (int step = 0; step < 5; ++step) {
    testing::set_grads(params, 60 + step);
    opt.step();
  }
  const std::string bytes = testing::save_to_string(opt);
  std::vector<at::Tensor> resumed = testing::clones(params);
  Shampoo other(resumed, cholesky_options(true));
  testing::load_from_string(other, bytes);
  for (int step = 0; step < 4; ++step) {
    testing::set_grads(params, 80 + step);
    for (size_t i = 0; i < params.size(); ++i) resumed[i].mutable_grad() = params[i].grad().clone();
    opt.step();
    other.step();
  }
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i], resumed[i])) << "parameter " << i;

  // The same checkpoint into an optimizer without error feedback: refused, nothing changes.
  std::vector<at::Tensor> fresh = testing::clones(params);
  Shampoo no_ef(fresh, cholesky_options(false));
  testing::expect_error([&] { testing::load_from_string(no_ef, bytes); }, "error_feedback");
  EXPECT_TRUE(no_ef.state().empty());
}

TEST(CholeskyShampoo, RejectsABadErrorFeedbackDecay) {
  std::vector<at::Tensor> params = testing::make_params(13);
  testing::expect_error([&] { Shampoo(params, cholesky_options(true).error_feedback_decay(1.0)); },
                        "error_feedback_decay must be in [0, 1)");
  testing::expect_error([&] { Shampoo(params, ShampooOptions().quantize("cholesky-ef")); }, "quantize must be one of");
}

}  // namespace
}  // namespace lowbit
