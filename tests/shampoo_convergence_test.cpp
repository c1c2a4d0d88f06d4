// Shampoo against SGD with momentum and AdamW on an ill-conditioned least-squares problem:
// steps needed to cut the loss 1000-fold, each optimizer with its best learning rate
// from the same grid, everything seeded.
#include <gtest/gtest.h>

#include <torch/optim.h>

#include <functional>
#include <memory>

#include <lowbit/shampoo.h>

namespace lowbit {
namespace {

struct Problem {
  at::Tensor x, y;
  Problem() {
    at::manual_seed(42);
    // Scales from 1 to 1e-2 along a random rotation: the Hessian X^T X has condition
    // number ~1e4 and is far from diagonal, so per-coordinate scaling (Adam) cannot fix it.
    const at::Tensor rotation = std::get<0>(at::linalg_qr(at::randn({64, 64})));
    x = at::matmul(at::randn({512, 64}) * at::logspace(0, -2, 64).unsqueeze(0), rotation);
    y = at::matmul(x, at::randn({64, 32}));
  }
  at::Tensor loss(const at::Tensor& w) const { return (at::matmul(x, w) - y).pow(2).sum() / (2 * x.size(0)); }
};

using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>, double lr)>;

// Steps until the loss falls below 1e-3 of its start (max_steps + 1 if never).
int steps_to_target(const Problem& problem, const Factory& make, double lr, int max_steps = 300) {
  at::Tensor w = at::zeros({64, 32}).requires_grad_(true);
  auto opt = make({w}, lr);
  const double target = 1e-3 * problem.loss(w).item<double>();
  for (int step = 1; step <= max_steps; ++step) {
    opt->zero_grad();
    const at::Tensor loss = problem.loss(w);
    loss.backward();
    opt->step();
    const double now = problem.loss(w).item<double>();
    if (!std::isfinite(now)) return max_steps + 1;
    if (now <= target) return step;
  }
  return max_steps + 1;
}

int best_over_lrs(const Problem& problem, const Factory& make, std::vector<double> lrs) {
  int best = 1 << 30;
  for (double lr : lrs) best = std::min(best, steps_to_target(problem, make, lr));
  return best;
}

TEST(ShampooConvergence, NeedsFewerStepsThanSgdAndAdamWOnIllConditionedLeastSquares) {
  const Problem problem;
  const std::vector<double> lrs{1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0};
  const int sgd = best_over_lrs(problem, [](std::vector<at::Tensor> p, double lr) {
    return std::make_unique<torch::optim::SGD>(p, torch::optim::SGDOptions(lr).momentum(0.9));
  }, lrs);
  const int adamw = best_over_lrs(problem, [](std::vector<at::Tensor> p, double lr) {
    return std::make_unique<torch::optim::AdamW>(p, torch::optim::AdamWOptions(lr).weight_decay(0));
  }, lrs);
  auto shampoo = [](int64_t bits) -> Factory {
    return [bits](std::vector<at::Tensor> p, double lr) {
      return std::make_unique<Shampoo>(p, ShampooOptions(lr).graft("adamw").bits(bits).stat_interval(1)
                                              .root_interval(5).min_quant_numel(1024).epsilon(1e-6));
    };
  };
  const int shampoo32 = best_over_lrs(problem, shampoo(32), lrs);
  const int shampoo8 = best_over_lrs(problem, shampoo(8), lrs);
  const int shampoo4 = best_over_lrs(problem, shampoo(4), lrs);
  // Measured 2026-11-22: SGDM 71, AdamW 82, Shampoo-32 56, Shampoo-8 57, Shampoo-4 76.
  // At 4 bits the 64 x 64 and 32 x 32 factors carry ~9% error in their inverse roots
  // (eigenvector rounding after Björck ~6.6%, re-quantized root ~6%), which costs steps
  // here: 4-bit Shampoo beats AdamW but not SGDM on this problem.
  std::printf("steps to 1e-3 of the initial loss: SGDM %d, AdamW %d, Shampoo-32 %d, Shampoo-8 %d, Shampoo-4 %d\n",
              sgd, adamw, shampoo32, shampoo8, shampoo4);
  EXPECT_LT(shampoo32, sgd);
  EXPECT_LT(shampoo32, adamw);
  EXPECT_LT(shampoo8, sgd);
  EXPECT_LT(shampoo8, adamw);
  EXPECT_LT(shampoo4, adamw);
}

}  // namespace
}  // namespace lowbit
