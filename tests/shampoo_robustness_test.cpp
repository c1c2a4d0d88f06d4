// Failure paths of the Shampoo optimizer: bad gradients, failing decompositions, bad
// options and mismatched checkpoints. Each leaves parameters and state as they were.
#include <gtest/gtest.h>

#include "expect_error.h"

#include <torch/serialize.h>

#include <functional>
#include <limits>
#include <sstream>

#include <lowbit/shampoo.h>
#include "archive_bytes.h"
#include "optimizer_fixtures.h"

namespace lowbit {
namespace {

using testing::set_grads;

using testing::load_from_string;
using testing::save_to_string;

using testing::expect_error;

ShampooOptions quick(int64_t bits, const char* quantize = "eigenvectors") {
  // Small min_quant_numel so that these small test matrices are really quantized.
  return ShampooOptions(0.01).bits(bits).quantize(quantize).stat_interval(2).root_interval(4)
      .min_quant_numel(256).epsilon(1e-4);
}

std::vector<at::Tensor> model(uint64_t seed, std::vector<std::vector<int64_t>> shapes = {{64, 40}, {40}, {16, 4, 3, 3}}) {
  at::manual_seed(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : shapes) params.push_back(at::randn(s).requires_grad_(true));
  return params;
}

std::vector<at::Tensor> snapshot(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone());
  return out;
}

void expect_unchanged(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& before) {
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i], before[i])) << "parameter " << i;
}

TEST(ShampooRobustness, NonFiniteGradientRaisesAndChangesNothing) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto params = model(1);
    Shampoo opt(params, quick(4));
    for (int s = 0; s < 5; ++s) {
      set_grads(params, s);
      opt.step();
    }
    const auto before = snapshot(params);
    const StateBytes bytes = opt.state_bytes();
    set_grads(params, 10);
    params[2].mutable_grad()[1][2][0][0] = bad;
    expect_error([&] { opt.step(); }, "parameter 2 of group 0 has a NaN or Inf gradient");
    expect_unchanged(params, before);
    EXPECT_EQ(opt.state_bytes().total(), bytes.total());
    // The step counter did not move: the next good step behaves as step 6.
    for (const auto& p : params)
      EXPECT_EQ(static_cast<ShampooParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).step(), 5);
  }
}

TEST(ShampooRobustness, HugeFiniteGradientsAreNotMistakenForInf) {
  // The check computes each gradient's squared norm in fp64: finite fp32 values near FLT_MAX
  // give a finite norm (12 * (3e38)^2 = 1.08e78), refused by the overflow rule with that
  // number (tests/overflow_test.cpp has the rule itself), not reported as Inf. Inf and -Inf
  // together are still caught as non-finite.
  auto params = model(5, {{4, 3}});
  Shampoo opt(params, ShampooOptions(1e-40).graft("sgdm").momentum(0));
  params[0].mutable_grad() = at::full({4, 3}, 3e38);
  expect_error([&] { opt.step(); }, "parameter 0 of group 0: its gradient's squared norm 1.08e+78 exceeds 2^104");
  params[0].mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
  params[0].mutable_grad()[0][1] = -std::numeric_limits<float>::infinity();
  expect_error([&] { opt.step(); }, "parameter 0 of group 0 has a NaN or Inf gradient");
  EXPECT_TRUE(opt.state().empty());
}

TEST(ShampooRobustness, SkipNonFiniteSkipsTheWholeStep) {
  auto params = model(2);
  Shampoo opt(params, quick(4).skip_nonfinite(true));
  set_grads(params, 0);
  opt.step();
  const auto before = snapshot(params);
  set_grads(params, 1);
  params[0].mutable_grad()[3][3] = std::numeric_limits<float>::quiet_NaN();
  opt.step();
  expect_unchanged(params, before);
  EXPECT_EQ(opt.skipped_steps(), 1);
}

TEST(ShampooRobustness, SparseOrMisshapenGradientsAreRejected) {
  auto params = model(3);
  Shampoo opt(params, quick(4));
  set_grads(params, 0);
  params[1].mutable_grad() = params[1].grad().to_sparse();
  const auto before = snapshot(params);
  expect_error([&] { opt.step(); }, "parameter 1 of group 0 has a sparse gradient");
  params[1].mutable_grad() = at::ones({41});
  expect_error([&] { opt.step(); }, "has shape [40] but its gradient has shape [41]");
  expect_unchanged(params, before);
  EXPECT_TRUE(opt.state().empty());
}

TEST(ShampooRobustness, FailingEigendecompositionKeepsTheLastRootAndCounts) {
  auto params = model(4, {{32, 24}});
  Shampoo opt(params, ShampooOptions(0.01).bits(32).stat_interval(1).root_interval(1));
  int calls = 0;
  opt.set_eigh_solver([&](const torch::Tensor& a) -> std::tuple<torch::Tensor, torch::Tensor> {
    ++calls;
    TORCH_CHECK(false, "injected eigh failure");
  });
  for (int s = 0; s < 3; ++s) {
    set_grads(params, s);
    opt.step();
  }
  EXPECT_EQ(calls, 3 * 2 * 2);              // 3 steps x 2 factors x (fp32 try + fp64 retry)
  EXPECT_EQ(opt.root_failures(), 3 * 2);    // every refresh failed and was counted
  EXPECT_TRUE(params[0].isfinite().all().item<bool>());
  // Roots stayed the identity, so the step was the grafted gradient itself: plain AdamW.
  auto reference = model(4, {{32, 24}});
  torch::optim::AdamW adamw(reference, torch::optim::AdamWOptions(0.01).weight_decay(0));
  for (int s = 0; s < 3; ++s) {
    set_grads(reference, s);
    adamw.step();
  }
  // I G I is G exactly; grafting scales it by ||G|| / (||G|| + 1e-12), i.e. by 1 or 1 - u
  // (u = 2^-24), to which AdamW's m / sqrt(v) is blind up to eps / sqrt(v); what is left is
  // the two implementations' own fp32 rounding, <= 2u |p| + 8u |step| a step with
  // |step| <= 7.3 lr for betas (0.9, 0.999): over 3 steps.
  EXPECT_TRUE(at::allclose(params[0], reference[0], 3 * 2 * 0x1p-24, 3 * 8 * 0x1p-24 * 7.3 * 0.01));
}

TEST(ShampooRobustness, InvalidOptionsNameTheOption) {
  auto params = model(5);
  expect_error([&] { Shampoo(params, ShampooOptions(-1)); }, "ShampooOptions.lr must be >= 0; got -1");
  expect_error([&] { Shampoo(params, ShampooOptions().graft("sgd")); },
               "ShampooOptions.graft must be one of \"sgdm\", \"adamw\"; got \"sgd\"");
  expect_error([&] { Shampoo(params, ShampooOptions().bits(16)); }, "ShampooOptions.bits must be 32, 8, 4 or 3; got 16");
  expect_error([&] { Shampoo(params, ShampooOptions().quantize("both")); }, "ShampooOptions.quantize must be one of");
  expect_error([&] { Shampoo(params, ShampooOptions().mapping("log")); }, "ShampooOptions.mapping must be one of");
  expect_error([&] { Shampoo(params, ShampooOptions().quant_block_size(48)); },
               "ShampooOptions.quant_block_size must be a power of two");
  expect_error([&] { Shampoo(params, ShampooOptions().stat_decay(1.0)); }, "ShampooOptions.stat_decay must be in [0, 1)");
  expect_error([&] { Shampoo(params, ShampooOptions().epsilon(0)); }, "ShampooOptions.epsilon must be > 0");
  expect_error([&] { Shampoo(params, ShampooOptions().stat_interval(0)); }, "ShampooOptions.stat_interval must be >= 1");
  expect_error([&] { Shampoo(params, ShampooOptions().root_interval(-3)); }, "ShampooOptions.root_interval must be >= 1");
  expect_error([&] { Shampoo(params, ShampooOptions().rectify_steps({-1, 4})); }, "ShampooOptions.rectify_steps");
  expect_error([&] { Shampoo(params, ShampooOptions().root_method("svd")); }, "ShampooOptions.root_method");
  expect_error([&] { Shampoo(params, ShampooOptions().eigen_update("power")); },
               "ShampooOptions.eigen_update must be one of \"qr\", \"cholesky_qr\", \"eigh\"; got \"power\"");
  expect_error([&] { Shampoo(params, ShampooOptions().betas({0.9, 1.0})); }, "ShampooOptions.betas[1]");
  expect_error([&] { Shampoo(params, ShampooOptions().max_preconditioner_dim(0)); },
               "ShampooOptions.max_preconditioner_dim must be >= 1");
  // A group added later is validated when it is added, and keeps its own options.
  Shampoo opt(params, ShampooOptions());
  auto extra = model(6, {{3, 3}});
  expect_error([&] {
    opt.add_param_group(torch::optim::OptimizerParamGroup(extra, std::make_unique<ShampooOptions>(ShampooOptions().momentum(2))));
  }, "ShampooOptions.momentum must be in [0, 1); got 2");
  EXPECT_EQ(opt.param_groups().size(), 1u);
  opt.add_param_group(torch::optim::OptimizerParamGroup(extra, std::make_unique<ShampooOptions>(ShampooOptions(0.5).bits(32))));
  EXPECT_EQ(static_cast<const ShampooOptions&>(opt.param_groups().back().options()).lr(), 0.5);
  EXPECT_EQ(static_cast<const ShampooOptions&>(opt.param_groups().back().options()).bits(), 32);
  // Groups given to the constructor keep their options too.
  auto a = model(7, {{4, 4}}), b = model(8, {{5, 5}});
  Shampoo grouped({torch::optim::OptimizerParamGroup(a, std::make_unique<ShampooOptions>(ShampooOptions(0.2).graft("sgdm"))),
                   torch::optim::OptimizerParamGroup(b)},
                  ShampooOptions(0.01));
  EXPECT_EQ(static_cast<const ShampooOptions&>(grouped.param_groups()[0].options()).lr(), 0.2);
  EXPECT_EQ(static_cast<const ShampooOptions&>(grouped.param_groups()[0].options()).graft(), "sgdm");
  EXPECT_EQ(static_cast<const ShampooOptions&>(grouped.param_groups()[1].options()).lr(), 0.01);
}

class Checkpoint : public ::testing::TestWithParam<std::tuple<int64_t, const char*, const char*>> {};

TEST_P(Checkpoint, ResumedRunIsBitIdenticalToAnUninterruptedOne) {
  const auto [bits, quantize, graft] = GetParam();
  const ShampooOptions options = quick(bits, quantize).graft(graft);
  auto params = model(7);
  Shampoo opt(params, options);
  for (int s = 0; s < 6; ++s) {
    set_grads(params, s);
    opt.step();
  }
  const std::string checkpoint = save_to_string(opt);
  const auto at_checkpoint = snapshot(params);
  for (int s = 6; s < 14; ++s) {
    set_grads(params, s);
    opt.step();
  }

  std::vector<at::Tensor> resumed;
  for (const auto& p : at_checkpoint) resumed.push_back(p.clone().requires_grad_(true));
  Shampoo fresh(resumed, options);
  load_from_string(fresh, checkpoint);
  for (int s = 6; s < 14; ++s) {
    set_grads(resumed, s);
    fresh.step();
  }
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i], resumed[i])) << "parameter " << i;
  EXPECT_EQ(fresh.state_bytes().total(), opt.state_bytes().total());
}

INSTANTIATE_TEST_SUITE_P(EveryKind, Checkpoint,
                         ::testing::Values(std::make_tuple(int64_t{32}, "eigenvectors", "adamw"),
                                           std::make_tuple(int64_t{4}, "eigenvectors", "sgdm"),
                                           std::make_tuple(int64_t{4}, "matrix", "adamw"),
                                           std::make_tuple(int64_t{3}, "eigenvectors", "adamw")));

TEST(ShampooCheckpoint, MismatchedShapesOrOptionsFailAndLeaveTheOptimizerUnchanged) {
  auto params = model(8);
  Shampoo source(params, quick(4));
  for (int s = 0; s < 5; ++s) {
    set_grads(params, s);
    source.step();
  }
  const std::string checkpoint = save_to_string(source);

  auto check_rejected = [&](std::vector<at::Tensor> target, const ShampooOptions& options, const std::string& fragment) {
    Shampoo opt(target, options);
    set_grads(target, 99);
    opt.step();  // some state of its own, which must survive the failed load
    const auto before = snapshot(target);
    const int64_t bytes = opt.state_bytes().total();
    expect_error([&] { load_from_string(opt, checkpoint); }, fragment);
    EXPECT_EQ(opt.state_bytes().total(), bytes);
    expect_unchanged(target, before);
    for (const auto& p : target)
      EXPECT_EQ(static_cast<ShampooParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).step(), 1);
  };
  check_rejected(model(9, {{64, 48}, {40}, {16, 4, 3, 3}}), quick(4), "shape [64, 48]");
  check_rejected(model(9, {{64, 40}, {41}, {16, 4, 3, 3}}), quick(4), "has shape [40] but the parameter has shape [41]");
  check_rejected(model(9), quick(32), "saved with different bits");
  check_rejected(model(9), quick(4).mapping("dynamic"), "saved with different mapping");
  check_rejected(model(9), quick(4, "matrix"), "saved with different quantize");
  check_rejected(model(9, {{64, 40}, {40}}), quick(4), "different size");
}

}  // namespace
}  // namespace lowbit
