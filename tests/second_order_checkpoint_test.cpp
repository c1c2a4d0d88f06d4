// Sophia (both estimators), AdaHessian, M-FAC (fp32, 8- and 4-bit windows) and NAG-GS:
// checkpoints resume bit-identically, mismatched checkpoints and bad gradients are errors
// that change nothing, and invalid options are named at construction.
#include <gtest/gtest.h>

#include <torch/serialize.h>

#include <functional>
#include <limits>
#include <memory>
#include <sstream>

#include <lowbit/adahessian.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/sophia.h>

#include "second_order_reference.h"
#include "archive_bytes.h"

namespace lowbit {
namespace {

using testing::load_from_string;
using testing::save_to_string;

using testing::any_differs;
using testing::clones;
using testing::expect_bit_identical;
using testing::expect_error_with;
using Optimizer = torch::optim::Optimizer;

enum class Fault { None, NaN, Sparse };

const std::vector<std::vector<int64_t>> kShapes = {{4, 6}, {5}};

std::vector<at::Tensor> make_params(const std::vector<std::vector<int64_t>>& shapes, uint64_t seed = 1) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : shapes) params.push_back(at::randn(s, gen).requires_grad_(true));
  return params;
}

// f(theta) = 0.5 theta^T A theta + 0.05 sum(theta^4) + w . theta over all parameters
// flattened: a Hessian with off-diagonal terms, so Hutchinson's estimate depends on the probes.
at::Tensor objective(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> flat;
  for (const auto& p : params) flat.push_back(p.reshape(-1));
  const at::Tensor theta = at::cat(flat);
  const int64_t n = theta.numel();
  const at::Tensor A = testing::random_symmetric(n, 2.0, 0.3, 100 + n).to(at::kFloat);
  const at::Tensor w = at::linspace(-1, 1, n);
  return 0.5 * theta.dot(A.mv(theta)) + 0.05 * theta.pow(4).sum() + w.dot(theta);
}

void inject(std::vector<at::Tensor>& params, Fault fault) {
  torch::NoGradGuard no_grad;
  if (fault == Fault::NaN) {
    at::Tensor g = params[0].grad().detach().clone();
    g.view(-1)[3] = std::numeric_limits<float>::quiet_NaN();
    params[0].mutable_grad() = g;
  } else if (fault == Fault::Sparse) {
    params[1].mutable_grad() = params[1].grad().detach().to_sparse();
  }
}

Optimizer::LossClosure closure(std::vector<at::Tensor>& params, bool create_graph, Fault fault) {
  return [&params, create_graph, fault] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor loss = objective(params);
    loss.backward({}, c10::nullopt, create_graph);
    inject(params, fault);
    return loss.detach();
  };
}

// One optimizer under test: how to build it (`alternate`: other hyper-parameters, for the
// checkpoint whose options must not leak), how to take training step t, its state bytes.
struct Driver {
  std::string name;
  std::function<std::unique_ptr<Optimizer>(const std::vector<at::Tensor>&, bool alternate)> make;
  std::function<void(Optimizer&, std::vector<at::Tensor>&, int64_t t, Fault)> step;
  std::function<StateBytes(const Optimizer&)> bytes;
};

template <typename Opt, typename Options>
Driver closure_driver(std::string name, Options options, bool create_graph) {
  Driver d;
  d.name = std::move(name);
  d.make = [options](const std::vector<at::Tensor>& params, bool alternate) {
    Options o = options;
    if (alternate) o.lr(o.lr() * 0.5);
    return std::make_unique<Opt>(params, o);
  };
  d.step = [create_graph](Optimizer& opt, std::vector<at::Tensor>& params, int64_t, Fault fault) {
    opt.step(closure(params, create_graph, fault));
  };
  d.bytes = [](const Optimizer& opt) { return dynamic_cast<const Opt&>(opt).state_bytes(); };
  return d;
}

// Sophia-GNB: a first-order step, then (every k steps) update_hessian with the gradient on
// "sampled labels", here a fixed function of the step.
Driver sophia_gnb_driver() {
  Driver d = closure_driver<Sophia>(
      "Sophia-gnb", SophiaOptions(0.05).betas({0.9, 0.8}).rho(0.5).weight_decay(0.1).hessian_interval(2), false);
  d.step = [](Optimizer& base, std::vector<at::Tensor>& params, int64_t t, Fault fault) {
    auto& opt = dynamic_cast<Sophia&>(base);
    const bool due = opt.hessian_due();
    opt.step(closure(params, false, fault));
    if (!due) return;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + t);
    for (auto& p : params) p.mutable_grad() = at::randn(p.sizes(), gen);
    opt.update_hessian(8);
  };
  return d;
}

std::vector<Driver> drivers() {
  return {
      sophia_gnb_driver(),
      closure_driver<Sophia>("Sophia-hutchinson",
                             SophiaOptions(0.05).betas({0.9, 0.8}).rho(0.5).weight_decay(0.1).estimator("hutchinson")
                                 .hessian_interval(2).seed(7),
                             true),
      closure_driver<AdaHessian>(
          "AdaHessian", AdaHessianOptions(0.05).hessian_power(0.8).weight_decay(0.01).hessian_interval(2).seed(3), true),
      closure_driver<MFAC>("M-FAC fp32", MFACOptions(0.05).window(3).momentum(0.9).weight_decay(0.01).damping(0.1), false),
      closure_driver<MFAC>("M-FAC 8-bit",
                           MFACOptions(0.05).window(3).momentum(0.9).damping(0.1).bits(8).quant_block_size(16), false),
      // No momentum: the window alone (no buffer shaped like the parameter) must catch a
      // checkpoint of a transposed parameter.
      closure_driver<MFAC>("M-FAC 4-bit",
                           MFACOptions(0.05).window(3).momentum(0).damping(0.1).bits(4).quant_block_size(16), false),
      // Kashin rows: the checkpoint must carry each row's fitted centroids.
      closure_driver<MFAC>("M-FAC 4-bit kashin", MFACOptions(0.05).window(3).momentum(0.9).damping(0.1).bits(4)
                                                     .mapping("kashin").quant_block_size(16),
                           false),
      closure_driver<NagGS>("NAG-GS", NagGSOptions(0.2).mu(0.5).gamma(1.5), false),
  };
}

TEST(SecondOrderCheckpoint, ResumedRunIsBitIdenticalToTheUninterruptedOne) {
  // 5 steps, then 4: the M-FAC windows (m = 3) have wrapped on both sides of the cut, and the
  // Hessian refreshes (every 2 steps) fall on both sides too.
  const int first = 5, second = 4;
  for (const Driver& d : drivers()) {
    SCOPED_TRACE(d.name);
    std::vector<at::Tensor> uninterrupted = make_params(kShapes);
    auto opt = d.make(uninterrupted, false);
    for (int t = 0; t < first; ++t) d.step(*opt, uninterrupted, t, Fault::None);
    const std::string checkpoint = save_to_string(*opt);

    std::vector<at::Tensor> resumed = clones(uninterrupted), fresh = clones(uninterrupted);
    auto resumed_opt = d.make(resumed, false);
    load_from_string(*resumed_opt, checkpoint);
    EXPECT_EQ(d.bytes(*resumed_opt).total(), d.bytes(*opt).total());
    auto fresh_opt = d.make(fresh, false);  // same parameters, no checkpoint
    for (int t = first; t < first + second; ++t) {
      d.step(*opt, uninterrupted, t, Fault::None);
      d.step(*resumed_opt, resumed, t, Fault::None);
      d.step(*fresh_opt, fresh, t, Fault::None);
      expect_bit_identical(resumed, uninterrupted, "step " + std::to_string(t));
    }
    EXPECT_EQ(d.bytes(*resumed_opt).total(), d.bytes(*opt).total());
    // The checkpoint carried what the continuation needs: without it the run differs.
    EXPECT_TRUE(any_differs(fresh, uninterrupted));
  }
}

TEST(SecondOrderCheckpoint, HutchinsonProbesMatterSoTheResumeTestSeesThem) {
  // Another probe seed changes the trajectory on this loss (its Hessian is not diagonal),
  // so the bit-identical resume above really checked that the probes are those of (seed, step).
  for (bool sophia : {true, false}) {
    std::vector<at::Tensor> a = make_params(kShapes), b = clones(a);
    std::unique_ptr<Optimizer> oa, ob;
    if (sophia) {
      const auto o = SophiaOptions(0.05).betas({0.9, 0.8}).rho(0.5).estimator("hutchinson").hessian_interval(1);
      oa = std::make_unique<Sophia>(a, SophiaOptions(o).seed(7));
      ob = std::make_unique<Sophia>(b, SophiaOptions(o).seed(8));
    } else {
      oa = std::make_unique<AdaHessian>(a, AdaHessianOptions(0.05).seed(3));
      ob = std::make_unique<AdaHessian>(b, AdaHessianOptions(0.05).seed(4));
    }
    for (int t = 0; t < 3; ++t) {
      oa->step(closure(a, true, Fault::None));
      ob->step(closure(b, true, Fault::None));
    }
    EXPECT_TRUE(any_differs(a, b)) << (sophia ? "Sophia" : "AdaHessian");
  }
}

TEST(SecondOrderCheckpoint, MismatchedShapesAreAnErrorThatChangesNothing) {
  // [4, 7]: another element count; [6, 4]: the same count transposed, which M-FAC's
  // flattened window alone would not notice.
  const std::vector<std::vector<std::vector<int64_t>>> targets = {{{4, 7}, {5}}, {{6, 4}, {5}}};
  for (const auto& target_shapes : targets)
  for (const Driver& d : drivers()) {
    SCOPED_TRACE(d.name + " into [" + std::to_string(target_shapes[0][0]) + ", " + std::to_string(target_shapes[0][1]) + "]");
    // The checkpoint: other shapes ([4, 6] where the target has another) and other options.
    std::vector<at::Tensor> source = make_params(kShapes);
    auto source_opt = d.make(source, true);
    for (int t = 0; t < 3; ++t) d.step(*source_opt, source, t, Fault::None);
    const std::string checkpoint = save_to_string(*source_opt);

    // The target and a control twin that never sees the checkpoint.
    std::vector<at::Tensor> target = make_params(target_shapes, 2), control = clones(target);
    auto target_opt = d.make(target, false), control_opt = d.make(control, false);
    for (int t = 0; t < 2; ++t) {
      d.step(*target_opt, target, t, Fault::None);
      d.step(*control_opt, control, t, Fault::None);
    }
    const StateBytes before = d.bytes(*target_opt);
    expect_error_with([&] { load_from_string(*target_opt, checkpoint); },
                      {"cannot load the checkpoint", "parameter 0 of group 0", "shape", "nothing was loaded"});
    EXPECT_EQ(d.bytes(*target_opt).preconditioner, before.preconditioner);
    EXPECT_EQ(d.bytes(*target_opt).first_order, before.first_order);
    // State, step counters and options are those of before: the next steps equal the control's.
    for (int t = 2; t < 5; ++t) {
      d.step(*target_opt, target, t, Fault::None);
      d.step(*control_opt, control, t, Fault::None);
      expect_bit_identical(target, control, "step " + std::to_string(t));
    }
  }
}

TEST(SecondOrderRobustness, BadGradientsThrowAndChangeNothing) {
  for (const Driver& d : drivers()) {
    SCOPED_TRACE(d.name);
    std::vector<at::Tensor> params = make_params(kShapes), control = clones(params);
    auto opt = d.make(params, false), control_opt = d.make(control, false);
    for (int t = 0; t < 3; ++t) {
      d.step(*opt, params, t, Fault::None);
      d.step(*control_opt, control, t, Fault::None);
    }
    const StateBytes before = d.bytes(*opt);
    expect_error_with([&] { d.step(*opt, params, 3, Fault::NaN); },
                      {"parameter 0 of group 0 has a NaN or Inf gradient"});
    expect_bit_identical(params, control, "after the NaN gradient");
    expect_error_with([&] { d.step(*opt, params, 3, Fault::Sparse); },
                      {"parameter 1 of group 0 has a sparse gradient"});
    expect_bit_identical(params, control, "after the sparse gradient");
    EXPECT_EQ(d.bytes(*opt).total(), before.total());
    // Neither failed step touched the state (moments, windows, step counters): the next
    // good steps equal those of the control, which never saw a bad gradient.
    for (int t = 3; t < 6; ++t) {
      d.step(*opt, params, t, Fault::None);
      d.step(*control_opt, control, t, Fault::None);
      expect_bit_identical(params, control, "step " + std::to_string(t));
    }
  }
}

TEST(SecondOrderRobustness, SophiaUpdateHessianRejectsANaNGradientAndKeepsH) {
  std::vector<at::Tensor> params = make_params(kShapes);
  Sophia opt(params, SophiaOptions(0.05).hessian_interval(1));
  for (auto& p : params) p.mutable_grad() = at::ones(p.sizes());
  opt.step();
  opt.update_hessian(4);
  std::vector<at::Tensor> h;
  for (const auto& p : params)
    h.push_back(static_cast<SophiaParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).hessian().clone());
  EXPECT_GT(testing::max_abs(h[0]), 0);
  params[1].mutable_grad()[2] = std::numeric_limits<float>::infinity();
  expect_error_with([&] { opt.update_hessian(4); }, {"lowbit::Sophia", "parameter 1 of group 0 has a NaN or Inf"});
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_TRUE(at::equal(static_cast<SophiaParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl())).hessian(),
                          h[i]));
}

TEST(SecondOrderOptions, InvalidOptionsAreNamedAtConstruction) {
  const std::vector<at::Tensor> params = make_params(kShapes);
  struct Case {
    std::function<void()> construct;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[&] { Sophia(params, SophiaOptions().estimator("foo")); },
       "SophiaOptions.estimator must be one of \"gnb\", \"hutchinson\"; got \"foo\""},
      {[&] { Sophia(params, SophiaOptions().hessian_interval(0)); }, "SophiaOptions.hessian_interval must be >= 1; got 0"},
      {[&] { Sophia(params, SophiaOptions().betas({1.0, 0.99})); }, "SophiaOptions.betas[0] must be in [0, 1); got 1"},
      {[&] { Sophia(params, SophiaOptions().rho(0)); }, "SophiaOptions.rho must be > 0; got 0"},
      {[&] { AdaHessian(params, AdaHessianOptions().hessian_power(1.5)); },
       "AdaHessianOptions.hessian_power must be in (0, 1]; got 1.5"},
      {[&] { AdaHessian(params, AdaHessianOptions().hessian_interval(0)); },
       "AdaHessianOptions.hessian_interval must be >= 1; got 0"},
      {[&] { MFAC(params, MFACOptions().bits(5)); }, "MFACOptions.bits must be 32, 8 or 4; got 5"},
      {[&] { MFAC(params, MFACOptions().window(0)); }, "MFACOptions.window must be >= 1; got 0"},
      {[&] { MFAC(params, MFACOptions().damping(0)); }, "MFACOptions.damping must be > 0; got 0"},
      {[&] { MFAC(params, MFACOptions().mapping("cubic")); }, "MFACOptions.mapping must be one of"},
      {[&] { MFAC(params, MFACOptions().bits(4).quant_block_size(10)); }, "MFACOptions.quant_block_size"},
      {[&] { MFAC(params, MFACOptions().bits(8).mapping("kashin")); },
       "MFACOptions.bits must be 3 or 4 with mapping \"kashin\"; got 8"},
      {[&] { MFAC(params, MFACOptions().mapping("kashin")); },
       "MFACOptions.bits must be 3 or 4 with mapping \"kashin\"; got 32"},
      {[&] { NagGS(params, NagGSOptions().gamma(0)); }, "NagGSOptions.gamma must be > 0; got 0"},
      {[&] { NagGS(params, NagGSOptions().mu(-1)); }, "NagGSOptions.mu must be >= 0; got -1"},
      {[&] { NagGS(params, NagGSOptions(0)); }, "NagGSOptions.lr (alpha) must be > 0; got 0"},
  };
  for (const Case& c : cases) expect_error_with(c.construct, {c.message});
}

}  // namespace
}  // namespace lowbit
