// Shampoo against SGD with momentum and AdamW on ill-conditioned least-squares problems:
// steps needed to cut the loss 1000-fold, each optimizer with its best learning rate from
// the same grid, over five problem seeds (same construction, different rotations, data and
// solutions). Claims are about the mean over the seeds of per-seed step ratios.
#include <gtest/gtest.h>

#include <torch/optim.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <lowbit/shampoo.h>

namespace lowbit {
namespace {

struct Problem {
  at::Tensor x, y;
  explicit Problem(uint64_t seed) {
    at::manual_seed(seed);
    // Scales from 1 to 1e-2 along a random rotation: the Hessian X^T X has condition
    // number ~1e4 and is far from diagonal, so per-coordinate scaling (Adam) cannot fix it.
    const at::Tensor rotation = std::get<0>(at::linalg_qr(at::randn({64, 64})));
    x = at::matmul(at::randn({512, 64}) * at::logspace(0, -2, 64).unsqueeze(0), rotation);
    y = at::matmul(x, at::randn({64, 32}));
  }
  at::Tensor loss(const at::Tensor& w) const { return (at::matmul(x, w) - y).pow(2).sum() / (2 * x.size(0)); }
};

using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>, double lr)>;

// Steps until the loss falls below 1e-3 of its start (max_steps + 1 if not within max_steps).
int steps_to_target(const Problem& problem, const Factory& make, double lr, int max_steps) {
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

// Half-decade grid, largest first; every optimizer diverges or slows down at both ends,
// which the test checks (a best learning rate at an edge would make the race unfair).
const std::vector<double> kLearningRates{10.0, 3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3};

struct Best {
  int steps;
  size_t lr_index;
};

// The fewest steps over the grid. A run is cut off once it needs more steps than the best
// so far (it cannot win), which keeps the test fast without changing the minimum.
Best best_over_lrs(const Problem& problem, const Factory& make, int max_steps = 300) {
  Best best{max_steps + 1, kLearningRates.size()};
  for (size_t i = 0; i < kLearningRates.size(); ++i) {
    const int s = steps_to_target(problem, make, kLearningRates[i], std::min(max_steps, best.steps - 1));
    if (s < best.steps) best = {s, i};
  }
  return best;
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / v.size();
}

double median(std::vector<int> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Measured on five seeds (42..46; docs/shampoo.md has the table), MKL AVX-512 / AVX2 /
// SSE4.2 with one thread and AVX-512 with two: medians SGDM 67, AdamW 81, Shampoo-32 56,
// Shampoo-8 56, Shampoo-4 78 / 82 / 81 / 81. SGDM, AdamW and Shampoo-32 give the same steps
// on every path; 8- and 4-bit Shampoo move by a few steps between paths, because a rounding
// difference can flip a quantization code and the run then follows another trajectory --
// like a change of seed. So each bound below sits at least 4 standard errors of the 5-seed
// mean (sigma / sqrt(5), sigma the per-seed standard deviation of that ratio measured over
// all paths) from the worst measured mean: a machine's rounding shifts the mean by about
// one SE, and a 4-SE shift has probability < 1e-4 under a normal approximation.
//  - SGDM / Shampoo-32 >= 1.10: measured mean 1.190 on every path, sigma 0.048 (SE 0.021).
//  - AdamW / Shampoo-32 >= 1.30: measured 1.447, sigma 0.058 (SE 0.026).
//  - SGDM / Shampoo-8 >= 1.10: measured 1.181 to 1.185, sigma <= 0.042 (SE 0.019).
//  - AdamW / Shampoo-8 >= 1.30: measured 1.436 to 1.441, sigma <= 0.043 (SE 0.019).
//  - Shampoo-8 / Shampoo-32 <= 1.05: measured 1.004 to 1.007, sigma <= 0.024 (SE 0.011).
//  - Shampoo-4 / Shampoo-32 <= 1.60: measured 1.407 to 1.446, sigma <= 0.079 (SE 0.035).
//  - AdamW / Shampoo-4 >= 0.90: measured 1.001 to 1.029, sigma <= 0.035 (SE 0.016).
// What does not hold: 4-bit Shampoo does not reliably beat AdamW on this problem (mean
// ratio 1.00 to 1.03, individual seeds on either side). Its 64 x 64 and 32 x 32 roots carry
// ~9% error at 4 bits (eigenvector rounding after Björck ~6.6%, re-quantized root ~6%),
// which costs it ~40% more steps than 32-bit Shampoo here; issue 20 is about that gap.
TEST(ShampooConvergence, FewerStepsThanSgdAndAdamWOnIllConditionedLeastSquaresOverSeeds) {
  auto shampoo = [](int64_t bits, const std::string& root_storage = "quantized") -> Factory {
    return [bits, root_storage](std::vector<at::Tensor> p, double lr) {
      return std::make_unique<Shampoo>(p, ShampooOptions(lr).graft("adamw").bits(bits).stat_interval(1)
                                              .root_interval(5).min_quant_numel(1024).epsilon(1e-6)
                                              .root_storage(root_storage));
    };
  };
  const std::vector<std::pair<std::string, Factory>> optimizers{
      {"SGDM",
       [](std::vector<at::Tensor> p, double lr) {
         return std::make_unique<torch::optim::SGD>(p, torch::optim::SGDOptions(lr).momentum(0.9));
       }},
      {"AdamW",
       [](std::vector<at::Tensor> p, double lr) {
         return std::make_unique<torch::optim::AdamW>(p, torch::optim::AdamWOptions(lr).weight_decay(0));
       }},
      {"Shampoo-32", shampoo(32)},
      {"Shampoo-8", shampoo(8)},
      {"Shampoo-4", shampoo(4)},
      {"Shampoo-4-eigen-form", shampoo(4, "eigen")},
      {"Shampoo-8U-eigen-form", shampoo(8, "eigen")}};
  std::map<std::string, std::vector<int>> steps;
  for (const uint64_t seed : {42, 43, 44, 45, 46}) {
    const Problem problem(seed);
    std::printf("seed %llu, steps to 1e-3 of the initial loss:", static_cast<unsigned long long>(seed));
    for (const auto& [name, make] : optimizers) {
      const Best best = best_over_lrs(problem, make);
      EXPECT_GT(best.lr_index, 0u) << name << " seed " << seed << ": best learning rate at the grid's top";
      EXPECT_LT(best.lr_index + 1, kLearningRates.size()) << name << " seed " << seed << ": best at the grid's bottom";
      std::printf(" %s %d (lr %g)", name.c_str(), best.steps, best.lr_index < kLearningRates.size() ? kLearningRates[best.lr_index] : 0.0);
      steps[name].push_back(best.steps);
    }
    std::printf("\n");
  }
  std::printf("medians:");
  for (const auto& [name, make] : optimizers) std::printf(" %s %.1f", name.c_str(), median(steps[name]));
  std::printf("\n");
  auto mean_ratio = [&](const std::string& num, const std::string& den) {
    std::vector<double> r;
    for (size_t s = 0; s < steps[num].size(); ++s) r.push_back(static_cast<double>(steps[num][s]) / steps[den][s]);
    const double m = mean(r);
    std::printf("mean over seeds of %s / %s steps: %.3f\n", num.c_str(), den.c_str(), m);
    return m;
  };
  EXPECT_GE(mean_ratio("SGDM", "Shampoo-32"), 1.10);
  EXPECT_GE(mean_ratio("AdamW", "Shampoo-32"), 1.30);
  EXPECT_GE(mean_ratio("SGDM", "Shampoo-8"), 1.10);
  EXPECT_GE(mean_ratio("AdamW", "Shampoo-8"), 1.30);
  EXPECT_LE(mean_ratio("Shampoo-8", "Shampoo-32"), 1.05);
  EXPECT_LE(mean_ratio("Shampoo-4", "Shampoo-32"), 1.60);
  EXPECT_GE(mean_ratio("AdamW", "Shampoo-4"), 0.90);
  // Issue 20 (docs/shampoo.md, "Fidelity"). root_storage "eigen" serves U diag(lambda^-1/4) U^T
  // from the stored eigenvectors instead of a second, quantized root. Measured on seeds 42..46
  // (Intel AVX-512, 1 and 2 threads): 8-bit U in eigen form (the bytes of the paper's 4-bit U
  // plus 4-bit root) took 56 steps on every seed, mean ratio to Shampoo-32 1.000, per-seed
  // sigma 0.023 (SE 0.010): the bound 1.10 (issue 20's goal) is 10 SE away. 4-bit U in eigen
  // form took 65-69 steps against the stored root's 72-79, every seed better: mean ratios
  // 1.201-1.208 against 1.318-1.329; the per-seed difference of the ratios has mean 0.11-0.13
  // and sigma 0.033 (SE 0.015), so "eigen form needs fewer steps" holds by more than 7 SE.
  EXPECT_LE(mean_ratio("Shampoo-8U-eigen-form", "Shampoo-32"), 1.10);
  EXPECT_LT(mean_ratio("Shampoo-4-eigen-form", "Shampoo-32"), mean_ratio("Shampoo-4", "Shampoo-32"));
}

}  // namespace
}  // namespace lowbit
