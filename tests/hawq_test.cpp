// lowbit::hawq: the trace estimator against an analytic Hessian, the allocation against brute
// force, the byte accounting against the codec's stored bytes, and the errors a user meets.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <random>

#include <lowbit/hawq.h>
#include <lowbit/quantized_matrix.h>

#include "expect_error.h"

namespace lowbit::hawq {
namespace {

using testing::expect_error;

const at::TensorOptions kF64 = at::TensorOptions().dtype(at::kDouble);
at::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Batch b's loss in two "layers" x (5) and y (2x3):
//   f_b = 0.5 x^T A x + sum(sin x) + x^T B_b vec(y) + c_b sum(y^3) / 6
// with the Hessian [[A - diag(sin x), B_b], [B_b^T, c_b diag(vec y)]], written out below.
struct TwoLayerFunction {
  at::Tensor A, x, y;
  std::vector<at::Tensor> B;
  std::vector<double> c{1.0, 3.0};
  TwoLayerFunction() {
    const at::Tensor r = at::randn({5, 5}, generator(1), kF64);
    A = r + r.t();
    B = {at::randn({5, 6}, generator(2), kF64), at::randn({5, 6}, generator(3), kF64)};
    x = at::randn({5}, generator(4), kF64).requires_grad_(true);
    y = at::randn({2, 3}, generator(5), kF64).requires_grad_(true);
  }
  at::Tensor loss(int64_t b) const {
    return 0.5 * x.dot(A.mv(x)) + x.sin().sum() + x.dot(B[b].mv(y.reshape(-1))) + c[b] * y.pow(3).sum() / 6;
  }
  at::Tensor hessian(int64_t b) const {
    at::Tensor h = at::zeros({11, 11}, kF64);
    h.slice(0, 0, 5).slice(1, 0, 5).copy_(A - at::diag(x.detach().sin()));
    h.slice(0, 0, 5).slice(1, 5, 11).copy_(B[b]);
    h.slice(0, 5, 11).slice(1, 0, 5).copy_(B[b].t());
    h.slice(0, 5, 11).slice(1, 5, 11).copy_(c[b] * at::diag(y.detach().reshape(-1)));
    return h;
  }
};

// Variance of one sample z_i^T (H z)_i = z^T M z (M: H's rows of layer i, zero elsewhere) for
// Rademacher z: with S = (M + M^T) / 2, Var = 2 sum_{a != b} S_ab^2 (z_a^2 = 1 fixes the
// diagonal's part; the pairs z_a z_b are uncorrelated with variance 1, each counted twice).
double sample_variance(const at::Tensor& h, int64_t begin, int64_t end) {
  at::Tensor m = at::zeros_like(h);
  m.slice(0, begin, end).copy_(h.slice(0, begin, end));
  const at::Tensor s = (m + m.t()) / 2;
  return 2 * (s.pow(2).sum() - s.diagonal().pow(2).sum()).item<double>();
}

TEST(HawqTrace, MatchesTheAnalyticTraceWithinItsConfidence) {
  TwoLayerFunction f;
  TraceOptions o;
  o.rel_tol = 1e-12;  // never met: exactly max_probes samples
  o.min_probes = o.max_probes = 400;
  o.confidence = 0.9999;
  o.seed = 7;
  const auto traces = layer_traces({f.x, f.y}, {"x", "y"}, 2, [&](int64_t b) { return f.loss(b); }, o);
  const int64_t ranges[2][2] = {{0, 5}, {5, 11}};
  for (int i = 0; i < 2; ++i) {
    double exact = 0, variance = 0;
    for (int64_t b = 0; b < 2; ++b) {
      const at::Tensor h = f.hessian(b);
      exact += h.diagonal().slice(0, ranges[i][0], ranges[i][1]).sum().item<double>() / 2;
      // Probe k uses batch k mod 2: 200 samples of each, mean (m_0 + m_1) / 2, variance
      // (Var_0 + Var_1) / (4 * 200).
      variance += sample_variance(h, ranges[i][0], ranges[i][1]) / (4 * 200);
    }
    // The mean of 400 samples is close to normal (CLT); beyond 4.5 standard deviations has
    // probability 7e-6. The seed is fixed and the bound is not fitted.
    EXPECT_LE(std::abs(traces[i].trace - exact), 4.5 * std::sqrt(variance)) << traces[i].name;
    EXPECT_LE(traces[i].low, exact) << traces[i].name;  // inside its own 99.99% interval
    EXPECT_GE(traces[i].high, exact) << traces[i].name;
    EXPECT_EQ(traces[i].probes, 400);
    EXPECT_FALSE(traces[i].converged);
  }
}

TEST(HawqTrace, StopsAfterWholeRoundsOnceEveryLayerIsTight) {
  TwoLayerFunction f;
  auto loss = [&](int64_t b) { return f.loss(b % 2); };
  TraceOptions o;
  o.min_probes = 4;
  o.rel_tol = 1e9;  // any spread passes: the first whole round (of 3 batches) from 4 probes on
  for (const LayerTrace& t : layer_traces({f.x, f.y}, {"x", "y"}, 3, loss, o)) {
    EXPECT_EQ(t.probes, 6);
    EXPECT_TRUE(t.converged);
  }
  o.rel_tol = 0.1;
  o.max_probes = 100000;
  for (const LayerTrace& t : layer_traces({f.x, f.y}, {"x", "y"}, 3, loss, o)) {
    EXPECT_TRUE(t.converged);
    EXPECT_EQ(t.probes % 3, 0);
    EXPECT_LE((t.high - t.low) / 2, 0.1 * std::abs(t.trace) * (1 + 1e-12));
  }
}

TEST(HawqEigenvalue, PowerIterationFindsTheLargestMagnitudeEigenvalueOfEachBlock) {
  TwoLayerFunction f;
  const auto eig = top_eigenvalues({f.x, f.y}, {"x", "y"}, 2, [&](int64_t b) { return f.loss(b); }, 1e-8, 10000, 3);
  const at::Tensor h = (f.hessian(0) + f.hessian(1)) / 2;
  const int64_t ranges[2][2] = {{0, 5}, {5, 11}};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor values = at::linalg_eigvalsh(h.slice(0, ranges[i][0], ranges[i][1]).slice(1, ranges[i][0], ranges[i][1]));
    const double top = values[values.abs().argmax()].item<double>();
    // Krylov-Weinstein: an eigenvalue lies within the residual of the Rayleigh quotient.
    EXPECT_LE(std::abs(eig[i].value - top), eig[i].residual + 1e-12 * std::abs(top)) << values;
  }
}

double brute_force(const std::vector<std::vector<int64_t>>& costs, const std::vector<std::vector<double>>& omegas,
                   int64_t budget) {
  double best = INFINITY;
  std::vector<size_t> pick(costs.size(), 0);
  while (true) {
    int64_t size = 0;
    double value = 0;
    for (size_t i = 0; i < costs.size(); ++i) {
      size += costs[i][pick[i]];
      value += omegas[i][pick[i]];
    }
    if (size <= budget) best = std::min(best, value);
    size_t i = 0;
    while (i < costs.size() && ++pick[i] == costs[i].size()) pick[i++] = 0;
    if (i == costs.size()) return best;
  }
}

TEST(HawqAllocation, IsOptimalByBruteForce) {
  std::mt19937 rng(0);
  for (int c = 0; c < 40; ++c) {
    const size_t layers = 1 + rng() % 6;
    std::vector<std::vector<int64_t>> costs(layers);
    std::vector<std::vector<double>> omegas(layers);
    int64_t smallest = 0, largest = 0;
    for (size_t i = 0; i < layers; ++i) {
      for (int j = 0; j < 3; ++j) {
        costs[i].push_back(1 + rng() % 200);
        omegas[i].push_back(std::uniform_real_distribution<double>(0, 1)(rng));
      }
      smallest += *std::min_element(costs[i].begin(), costs[i].end());
      largest += *std::max_element(costs[i].begin(), costs[i].end());
    }
    for (int64_t budget : {smallest, smallest + static_cast<int64_t>(rng() % (largest - smallest + 1)), largest}) {
      const Choice best = best_choice(costs, omegas, budget);
      int64_t size = 0;
      for (size_t i = 0; i < layers; ++i) size += costs[i][best.option[i]];
      EXPECT_EQ(size, best.bytes);
      EXPECT_LE(best.bytes, budget);
      EXPECT_NEAR(best.omega, brute_force(costs, omegas, budget), 1e-12);
    }
  }
}

std::shared_ptr<torch::nn::SequentialImpl> small_cnn() {
  torch::manual_seed(0);
  return torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).bias(false)),
                               torch::nn::BatchNorm2d(4), torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3)),
                               torch::nn::Linear(8 * 24, 20), torch::nn::Linear(20, 3)).ptr();
}

TEST(HawqPlan, BudgetAccountingIsTheCodecsStoredBytes) {
  for (const std::string scaling : {"block", "channel"}) {
    auto model = small_cnn();
    PlanOptions o;
    o.scaling = scaling;
    o.block_size = 16;
    Plan plan = make_plan(*model, o);
    plan.traces = {1.0, 2.0, 0.5, 3.0};
    const auto layers = quantizable_layers(*model);
    ASSERT_EQ(layers.size(), 4u);
    for (size_t i = 0; i < layers.size(); ++i)
      for (size_t j = 0; j < plan.widths.size(); ++j) {
        QuantOptions q;
        q.bits = static_cast<int>(plan.widths[j]);
        q.block_size = block_for(layers[i].weight, scaling, 16);
        q.mapping = Mapping::Linear;
        EXPECT_EQ(plan.bytes[i][j], QuantizedMatrix::quantize(layers[i].weight.detach().reshape({layers[i].weight.size(0), -1}), q).nbytes());
      }
    // Unquantized: BatchNorm's weight and bias (4 + 4), the biases of conv 2 and the linears (8 + 20 + 3).
    EXPECT_EQ(plan.fixed_bytes, 4 * (8 + 8 + 20 + 3));
    for (int64_t extra : {0, 300, 1000000})
      for (const std::string& method : allocation_methods()) {
        const Allocation a = plan.allocate(plan.minimum_bytes() + extra, method);
        int64_t stored = plan.fixed_bytes;
        for (size_t i = 0; i < layers.size(); ++i) {
          const int j = static_cast<int>(std::find(plan.widths.begin(), plan.widths.end(), a.layers[i].bits) - plan.widths.begin());
          stored += plan.bytes[i][j];
        }
        EXPECT_EQ(a.total_bytes(), stored);
        EXPECT_LE(a.total_bytes(), plan.minimum_bytes() + extra);
        EXPECT_EQ(a.layers.front().bits, 8);  // pinned edges
        EXPECT_EQ(a.layers.back().bits, 8);
      }
    const Allocation a = plan.allocate(plan.minimum_bytes() + 300, "hawq");
    std::vector<at::Tensor> expected;
    for (size_t i = 0; i < layers.size(); ++i)
      expected.push_back(quantized_weight(layers[i].weight, a.layers[i].bits, block_for(layers[i].weight, scaling, 16),
                                          Mapping::Linear));
    apply(*model, a, o);
    for (size_t i = 0; i < layers.size(); ++i) EXPECT_TRUE(at::equal(layers[i].weight.detach(), expected[i]));
  }
}

TEST(HawqPlan, AllocationsAreOptimalByBruteForceWithPins) {
  auto model = small_cnn();
  PlanOptions o;
  o.block_size = 16;
  Plan plan = make_plan(*model, o);
  plan.traces = {1.0, 2.0, 0.5, 3.0};
  for (const std::string method : {"hawq", "size", "weight-error"})
    for (int64_t extra : {0, 150, 600, 5000}) {
      const Allocation a = plan.allocate(plan.minimum_bytes() + extra, method);
      std::vector<std::vector<int64_t>> costs;
      std::vector<std::vector<double>> omegas;
      double chosen = 0;
      for (size_t i = 0; i < plan.names.size(); ++i) {
        costs.emplace_back();
        omegas.emplace_back();
        for (int j : plan.options_of(i)) {
          costs.back().push_back(plan.bytes[i][j]);
          const double n = static_cast<double>(plan.numel[i]), b = static_cast<double>(plan.widths[j]);
          omegas.back().push_back(method == "hawq"   ? plan.traces[i] / n * plan.squared_error[i][j]
                                  : method == "size" ? std::pow(4.0, -b)
                                                     : plan.squared_error[i][j]);
        }
        chosen += a.layers[i].omega;
      }
      EXPECT_NEAR(chosen, brute_force(costs, omegas, plan.minimum_bytes() + extra - plan.fixed_bytes),
                  1e-12 * std::max(1.0, chosen)) << method << " +" << extra;
    }
}

TEST(HawqErrors, BadInputIsNamed) {
  auto model = small_cnn();
  PlanOptions o;
  Plan plan = make_plan(*model, o);
  expect_error([&] { plan.allocate(plan.minimum_bytes() - 1, "size"); }, "is below the smallest model this plan can make");
  expect_error([&] { plan.allocate(plan.minimum_bytes(), "hawq"); }, "method \"hawq\" needs the layer traces");
  expect_error([&] { plan.allocate(plan.minimum_bytes(), "greedy"); }, "method must be one of");
  o.widths = {2, 4, 8};
  expect_error([&] { make_plan(*model, o); }, "widths: 2 is not a width of lowbit's codec");
  o.widths = {3, 4};
  expect_error([&] { make_plan(*model, o); }, "needs 8 among the widths");
  torch::nn::Sequential no_layers(torch::nn::BatchNorm2d(3));
  expect_error([&] { quantizable_layers(*no_layers); }, "has no quantizable layer");
  expect_error([&] { best_choice({{5, 6}}, {{1.0, 0.5}}, 4); }, "budget 4 bytes is below the smallest possible size, 5 bytes");
}

}  // namespace
}  // namespace lowbit::hawq
