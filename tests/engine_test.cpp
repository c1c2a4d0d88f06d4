// The structure that decides Shampoo's speed on a GPU, tested on the CPU through the
// operators a step calls (RecordFunction, as torch.profiler sees them):
//   - factorizations (QR, eigh, Cholesky) per update step follow the number of distinct
//     factor orders, not the number of factors: factors of one order are refreshed as one
//     batch;
//   - host synchronisations per update step do not grow with the number of factors, and a
//     plain step (no refresh) checked immediately makes exactly one: the overflow rule's
//     read of every gradient's squared norm, computed as one batch (optim/gradient_health.h;
//     deferred_check_test.cpp: none with gradient_check = "deferred");
//   - batching changes no result: refreshing every factor alone gives the same parameters.
#include <gtest/gtest.h>

#include <lowbit/shampoo.h>

#include <string>
#include <vector>

#include "op_counter.h"

namespace lowbit {
namespace {

using Shapes = std::vector<std::vector<int64_t>>;

std::vector<at::Tensor> make_params(const Shapes& shapes, uint64_t seed) {
  at::manual_seed(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : shapes) params.push_back(at::randn(s).requires_grad_(true));
  return params;
}

void set_grads(std::vector<at::Tensor>& params, uint64_t seed) {
  at::manual_seed(seed);
  for (auto& p : params) p.mutable_grad() = at::randn(p.sizes());
}

// Every step refreshes statistics and roots; every factor of these shapes is quantized at 4
// bits (min_quant_numel 256 < 40 * 40).
ShampooOptions refreshing(int64_t bits) {
  return ShampooOptions(0.01).bits(bits).stat_interval(1).root_interval(1).min_quant_numel(256).epsilon(1e-4);
}

// The counts of the `step`-th step (earlier steps run uncounted).
struct StepCounts {
  int64_t factorizations, synchronisations;
};
StepCounts count_step(const Shapes& shapes, const ShampooOptions& options, int step) {
  std::vector<at::Tensor> params = make_params(shapes, 1);
  Shampoo opt(params, options);
  for (int k = 1; k < step; ++k) {
    set_grads(params, 100 + k);
    opt.step();
  }
  set_grads(params, 100 + step);
  testing::OpCounter counter;
  opt.step();
  return {counter.factorizations(), counter.synchronisations()};
}

// 64 x 40 blocks: factors of orders 64 and 40. One parameter has 2 factors, six have 12.
const Shapes kOne{{64, 40}};
const Shapes kSix{{64, 40}, {64, 40}, {64, 40}, {64, 40}, {64, 40}, {64, 40}};
constexpr int64_t kDistinctOrders = 2;

TEST(Engine, FourBitStatisticsUpdateMakesOneQrPerOrder) {
  // 4-bit: the statistics update is one QR subspace step per order (the paper's); the root
  // update needs no factorization. (Step 2: the first refresh already ran.)
  for (const Shapes* shapes : {&kOne, &kSix}) {
    const StepCounts c = count_step(*shapes, refreshing(4), 2);
    EXPECT_EQ(c.factorizations, kDistinctOrders) << shapes->size() << " parameters";
  }
}

// eigen_update "cholesky_qr": once the statistics are well conditioned (step 6: five updates
// of rank 40 or 64 each on factors of orders 64 and 40, so kappa(A V D) is far below the 5e7
// where CholeskyQR2 hands a factor to the Householder QR), the update makes no Householder
// QR, two Choleskys per factor, and its host reads (one per batch, to find the factors
// CholeskyQR2 could not take) do not grow with the factors.
TEST(Engine, CholeskyQrStatisticsUpdateMakesNoHouseholderQrAndConstantReads) {
  const ShampooOptions options = refreshing(4).eigen_update("cholesky_qr");
  std::vector<int64_t> reads;
  for (const Shapes* shapes : {&kOne, &kSix}) {
    std::vector<at::Tensor> params = make_params(*shapes, 1);
    Shampoo opt(params, options);
    for (int k = 1; k < 6; ++k) {
      set_grads(params, 100 + k);
      opt.step();
    }
    set_grads(params, 106);
    testing::OpCounter counter;
    opt.step();
    const int64_t factors = 2 * static_cast<int64_t>(shapes->size());
    EXPECT_EQ(counter.count("aten::linalg_householder_product"), 0) << shapes->size() << " parameters";
    EXPECT_EQ(counter.count("aten::linalg_cholesky_ex"), 2 * factors) << shapes->size() << " parameters";
    reads.push_back(counter.synchronisations());
  }
  EXPECT_EQ(reads[0], reads[1]);
}

TEST(Engine, Fp32RootUpdateMakesOneEighPerOrder) {
  for (const Shapes* shapes : {&kOne, &kSix}) {
    const StepCounts c = count_step(*shapes, refreshing(32), 2);
    EXPECT_EQ(c.factorizations, kDistinctOrders) << shapes->size() << " parameters";
  }
}

TEST(Engine, SynchronisationsOfAnUpdateStepDoNotGrowWithTheFactors) {
  for (int64_t bits : {32, 4}) {
    const StepCounts one = count_step(kOne, refreshing(bits), 2), six = count_step(kSix, refreshing(bits), 2);
    EXPECT_EQ(six.synchronisations, one.synchronisations) << bits << "-bit";
  }
}

TEST(Engine, APlainStepReadsTheDeviceOnceWhateverTheParameters) {
  // Statistics every 100 steps, roots every 100: step 2 refreshes nothing.
  for (int64_t bits : {32, 4}) {
    const ShampooOptions plain = refreshing(bits).stat_interval(100).root_interval(100);
    const StepCounts one = count_step(kOne, plain, 2), six = count_step(kSix, plain, 2);
    EXPECT_EQ(one.synchronisations, 1) << bits << "-bit";
    EXPECT_EQ(six.synchronisations, 1) << bits << "-bit";
    EXPECT_EQ(six.factorizations, 0) << bits << "-bit";
  }
}

// Batched and one-factor-at-a-time runs compute the same formulas; they differ only in how
// BLAS and LAPACK round (a batched call can split work over threads differently, so even a
// factor's position in the batch changes the last bits). The bound is what two valid fp32
// evaluations can differ by, in a well-conditioned setting (epsilon 0.1: the ridge keeps
// every statistic's condition number kappa <= 1 + 1/0.1 = 11):
//   - each statistic carries a relative backward error of at most
//       k rank u (its products G G^T, k <= 64 terms, |G|^2_F <= rank |G|^2_2 with rank <= 40)
//     + 10 n u (the symmetric eigendecomposition's backward error, n <= 64)
//     ~ (64 * 40 + 640) 2^-24 = 1.9e-4;
//   - A -> A^(-1/4) has relative condition number kappa / 4 <= 2.75 (its divided differences
//     are at most |f'(lambda_min)|), so each root is off by <= 5.3e-4, two runs by twice that;
//   - the direction L^(-1/4) G R^(-1/4) adds both roots' errors and two products (2 * 64 u),
//     and grafting (a ratio of norms) at most doubles it: delta <= 2 (4 * 5.3e-4 + 8e-6) = 4.3e-3.
// With the SGD graft at momentum 0 each step moves a parameter by exactly lr d, |d|_F =
// |G|_F, so after T steps the parameters differ by at most T lr delta max |G|_F. A factor
// mixed up with another one's changes d by O(|G|_F) at every step: ~1 / delta = 230 times the bound.
// (fp32 only: at low bits a rounding difference can move a value across a code threshold and
// change a stored code by a whole step, which no rounding bound covers.)
TEST(Engine, RefreshingEveryFactorAloneAgreesWithTheBatch) {
  constexpr int kSteps = 4;
  constexpr double kLr = 0.01, kDelta = 4.3e-3;
  ShampooOptions options = refreshing(32).graft("sgdm").momentum(0).lr(kLr).epsilon(0.1);
  std::vector<at::Tensor> batched = make_params(kSix, 3), alone = make_params(kSix, 3);
  Shampoo a(batched, options), b(alone, ShampooOptions(options).workspace_mb(1e-6));  // ~1 byte: one factor a batch
  double largest_grad = 0;
  for (int k = 0; k < kSteps; ++k) {
    set_grads(batched, 200 + k);
    set_grads(alone, 200 + k);
    for (const auto& p : batched) largest_grad = std::max(largest_grad, p.grad().norm().item<double>());
    a.step();
    b.step();
  }
  const double bound = kSteps * kLr * kDelta * largest_grad;
  for (size_t i = 0; i < batched.size(); ++i)
    EXPECT_LE((batched[i] - alone[i]).abs().max().item<double>(), bound) << "parameter " << i;
}

}  // namespace
}  // namespace lowbit
