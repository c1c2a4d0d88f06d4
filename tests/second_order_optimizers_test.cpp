// Sophia, AdaHessian, M-FAC and NAG-GS against independent fp64 references written in this
// file from the update rules their headers document (never the library's rule functions).
//
// Tolerances. The optimizers run in fp32 (unit roundoff u = 2^-24 ~ 6e-8); the references
// run in fp64 from the same fp32 inputs. Each step of these rules sends a handful (< 8) of
// fp32 roundings into a parameter, and none of the rules amplifies an error: the decays are
// contractions, Sophia's clip is 1-Lipschitz and its ratio is at most 1 where unclipped,
// AdaHessian's step is bounded by lr / bc1 * |m| / (sqrt(v) + eps). Over T steps the error
// is thus below 8 T u relative to the scale of the tensor; kStepTol(T) is that bound.
#include <gtest/gtest.h>

#include <torch/autograd.h>

#include <cmath>
#include <map>
#include <tuple>

#include <lowbit/adahessian.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/quantized_matrix.h>
#include <lowbit/sophia.h>

#include "second_order_reference.h"

namespace lowbit {
namespace {

using testing::f64;
using testing::expect_close;
using testing::kFloatRoundoff;

double kStepTol(int steps) { return 8.0 * steps * kFloatRoundoff; }

at::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

std::vector<at::Tensor> make_params(const std::vector<std::vector<int64_t>>& shapes, uint64_t seed) {
  auto gen = generator(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : shapes) params.push_back(at::randn(s, gen).requires_grad_(true));
  return params;
}

template <typename State>
State& state_of(torch::optim::Optimizer& opt, const at::Tensor& p) {
  return static_cast<State&>(*opt.state().at(p.unsafeGetTensorImpl()));
}

// Runs `loss_of(params)` with create_graph (what Sophia-Hutchinson and AdaHessian need).
torch::optim::Optimizer::LossClosure second_order_closure(std::vector<at::Tensor>& params,
                                                          std::function<at::Tensor()> loss_of) {
  return [&params, loss_of] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor loss = loss_of();
    loss.backward({}, c10::nullopt, /*create_graph=*/true);
    return loss.detach();
  };
}

// The same without create_graph: what a first-order optimizer's closure does.
torch::optim::Optimizer::LossClosure first_order_closure(std::vector<at::Tensor>& params,
                                                         std::function<at::Tensor()> loss_of) {
  return [&params, loss_of] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor loss = loss_of();
    loss.backward();
    return loss.detach();
  };
}

// ---------------------------------------------------------------------------------------
// Sophia:  m = b1 m + (1 - b1) g;  every k steps h = b2 h + (1 - b2) h_hat;
//          p = p - lr wd p;  p = p - lr clip(m / max(rho h, eps), 1)

struct SophiaReference {
  double lr, beta1, beta2, rho, eps, wd;
  at::Tensor p, m, h;
  int64_t clipped = 0, unclipped = 0;  // elements on each side of the clip, over the run

  SophiaReference(const SophiaOptions& o, const at::Tensor& p0)
      : lr(o.lr()), beta1(std::get<0>(o.betas())), beta2(std::get<1>(o.betas())), rho(o.rho()), eps(o.eps()),
        wd(o.weight_decay()), p(f64(p0)), m(at::zeros_like(p)), h(at::zeros_like(p)) {}

  void refresh(const at::Tensor& h_hat) { h = beta2 * h + (1 - beta2) * h_hat; }
  void step(const at::Tensor& g) {
    m = beta1 * m + (1 - beta1) * g;
    p = p - lr * wd * p;
    const at::Tensor ratio = m / at::clamp_min(rho * h, eps);
    const at::Tensor beyond = ratio.abs().gt(1);
    clipped += beyond.sum().item<int64_t>();
    unclipped += beyond.logical_not().sum().item<int64_t>();
    p = p - lr * ratio.clamp(-1, 1);
  }
};

TEST(SophiaReference, GaussNewtonBartlettFollowsTheHeaderRule) {
  const SophiaOptions options = SophiaOptions(0.05).betas({0.9, 0.8}).rho(0.5).eps(1e-12).weight_decay(0.1)
                                    .estimator("gnb").hessian_interval(3);
  const int64_t batch = 4, steps = 10;
  std::vector<at::Tensor> params = make_params({{3, 4}, {5}}, 1);
  std::vector<SophiaReference> ref;
  for (const auto& p : params) ref.emplace_back(options, p);
  Sophia opt(params, options);
  auto gen = generator(2);
  for (int t = 0; t < steps; ++t) {
    const bool due = t % 3 == 0;  // every k steps, starting with the first
    EXPECT_EQ(opt.hessian_due(), due) << "step " << t;
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = at::randn(params[i].sizes(), gen);
      ref[i].step(f64(params[i].grad()));
    }
    opt.step();
    if (due) {
      // The gradient on sampled labels; h_hat = B g_hat^2.
      for (size_t i = 0; i < params.size(); ++i) {
        params[i].mutable_grad() = at::randn(params[i].sizes(), gen);
        ref[i].refresh(batch * f64(params[i].grad()).pow(2));
      }
      opt.update_hessian(batch);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string what = "step " + std::to_string(t) + ", parameter " + std::to_string(i);
      auto& s = state_of<SophiaParamState>(opt, params[i]);
      EXPECT_EQ(s.step(), t + 1);
      expect_close(params[i], ref[i].p, kStepTol(t + 1), what + ": p");
      expect_close(s.exp_avg(), ref[i].m, kStepTol(t + 1), what + ": m");
      expect_close(s.hessian(), ref[i].h, kStepTol(t + 1), what + ": h");
    }
  }
  // Both sides of the clip were exercised, so the comparison checks the ratio, not only signs.
  EXPECT_GT(ref[0].clipped + ref[1].clipped, 10);
  EXPECT_GT(ref[0].unclipped + ref[1].unclipped, 10);
}

// f = sum(0.5 a p^2 + b p): a diagonal Hessian diag(a), on which Hutchinson's u * (H u) = a
// exactly for every probe, so the reference needs no random numbers.
struct DiagonalQuadratic {
  std::vector<at::Tensor> a, b;
  DiagonalQuadratic(const std::vector<at::Tensor>& params, uint64_t seed) {
    auto gen = generator(seed);
    for (const auto& p : params) {
      a.push_back(at::rand(p.sizes(), gen) * 2 + 0.5);
      b.push_back(at::randn(p.sizes(), gen) * 0.3);
    }
  }
  at::Tensor loss(const std::vector<at::Tensor>& params) const {
    at::Tensor l = at::zeros({});
    for (size_t i = 0; i < params.size(); ++i) l = l + (0.5 * a[i] * params[i].pow(2) + b[i] * params[i]).sum();
    return l;
  }
  at::Tensor gradient(size_t i, const at::Tensor& p64) const { return f64(a[i]) * p64 + f64(b[i]); }
};

// The fp64 Sophia-Hutchinson trajectory on a DiagonalQuadratic with refresh interval k.
std::vector<SophiaReference> sophia_hutchinson_reference(const SophiaOptions& o, const std::vector<at::Tensor>& p0,
                                                         const DiagonalQuadratic& f, int64_t k, int steps) {
  std::vector<SophiaReference> ref;
  for (const auto& p : p0) ref.emplace_back(o, p);
  for (int t = 0; t < steps; ++t)
    for (size_t i = 0; i < ref.size(); ++i) {
      const at::Tensor g = f.gradient(i, ref[i].p);
      if (t % k == 0) ref[i].refresh(f64(f.a[i]));
      ref[i].step(g);
    }
  return ref;
}

TEST(SophiaReference, HutchinsonWithAClosureFollowsTheHeaderRuleAndItsInterval) {
  const int64_t k = 2;
  const int steps = 7;
  const SophiaOptions options = SophiaOptions(0.05).betas({0.9, 0.7}).rho(0.3).weight_decay(0.05)
                                    .estimator("hutchinson").hessian_interval(k).seed(3);
  std::vector<at::Tensor> params = make_params({{3, 4}, {5}}, 4);
  const std::vector<at::Tensor> initial = testing::clones(params);
  const DiagonalQuadratic f(params, 5);
  Sophia opt(params, options);
  for (int t = 0; t < steps; ++t) {
    EXPECT_EQ(opt.hessian_due(), t % k == 0) << "step " << t;
    const at::Tensor loss = opt.step(second_order_closure(params, [&] { return f.loss(params); }));
    EXPECT_TRUE(loss.defined());
  }
  const auto ref = sophia_hutchinson_reference(options, initial, f, k, steps);
  const auto every_step = sophia_hutchinson_reference(options, initial, f, 1, steps);
  for (size_t i = 0; i < params.size(); ++i) {
    auto& s = state_of<SophiaParamState>(opt, params[i]);
    expect_close(params[i], ref[i].p, kStepTol(steps), "p " + std::to_string(i));
    expect_close(s.exp_avg(), ref[i].m, kStepTol(steps), "m " + std::to_string(i));
    // 4 refreshes (steps 0, 2, 4, 6): h = (1 - b2^4) a.
    expect_close(s.hessian(), ref[i].h, kStepTol(steps), "h " + std::to_string(i));
    // Refreshing every step instead would be visible: the test sees the interval.
    EXPECT_GT(testing::max_abs_diff(s.hessian(), every_step[i].h), 100 * kStepTol(steps));
    EXPECT_GT(testing::max_abs_diff(params[i], every_step[i].p), 100 * kStepTol(steps));
    // Step() released the double-backward graph it was handed.
    EXPECT_FALSE(params[i].grad().requires_grad());
  }
  EXPECT_GT(ref[0].unclipped + ref[1].unclipped, 10);
  EXPECT_GT(ref[0].clipped + ref[1].clipped, 0);
}

TEST(SophiaErrors, HutchinsonNeedsAClosureAndHasNoUpdateHessian) {
  std::vector<at::Tensor> params = make_params({{3}}, 6);
  Sophia opt(params, SophiaOptions().estimator("hutchinson"));
  params[0].mutable_grad() = at::ones({3});
  testing::expect_error_with([&] { opt.step(); }, {"lowbit::Sophia", "hutchinson", "needs a closure"});
  testing::expect_error_with([&] { opt.update_hessian(8); },
                             {"update_hessian", "estimator is \"hutchinson\""});
  EXPECT_TRUE(opt.state().empty());  // neither call created state

  // A closure whose backward has no create_graph: the Hessian product says what is missing.
  const DiagonalQuadratic f(params, 7);
  const at::Tensor before = params[0].detach().clone();
  testing::expect_error_with([&] { opt.step(first_order_closure(params, [&] { return f.loss(params); })); },
                             {"no graph", "create_graph"});
  EXPECT_TRUE(at::equal(params[0], before));

  Sophia gnb(params, SophiaOptions().estimator("gnb"));
  testing::expect_error_with([&] { gnb.update_hessian(0); }, {"batch_size must be >= 1; got 0"});
}

// ---------------------------------------------------------------------------------------
// AdaHessian:  D = z * (H z)   (4-D: mean |D| over the last two dims), refreshed every k steps
//              m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) D^2
//              p = p - lr (m / bc1 / ((sqrt(v) / sqrt(bc2))^power + eps) + wd p)

struct AdaHessianReference {
  double lr, beta1, beta2, eps, wd, power;
  at::Tensor p, m, v, D;
  AdaHessianReference(const AdaHessianOptions& o, const at::Tensor& p0)
      : lr(o.lr()), beta1(std::get<0>(o.betas())), beta2(std::get<1>(o.betas())), eps(o.eps()),
        wd(o.weight_decay()), power(o.hessian_power()), p(f64(p0)), m(at::zeros_like(p)), v(at::zeros_like(p)) {}
  void step(const at::Tensor& g, int64_t t /* 1-based */) {
    m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * D * D;
    const double bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
    const at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).pow(power) + eps;
    p = p - lr * (m / bc1 / denom + wd * p);
  }
};

// f = sum(0.5 a p^2 + c p^4 / 12 + b p): g = a p + c p^3 / 3 + b and H = diag(a + c p^2), a
// diagonal Hessian (so z * (H z) = z^2 (a + c p^2) = a + c p^2 for any signs z, up to the
// fp32 rounding of autograd's product) that changes as p moves, which makes the refresh
// interval observable.
struct DiagonalQuartic {
  std::vector<at::Tensor> a, b, c;
  DiagonalQuartic(const std::vector<at::Tensor>& params, uint64_t seed) {
    auto gen = generator(seed);
    for (const auto& p : params) {
      a.push_back(at::rand(p.sizes(), gen) + 0.5);
      b.push_back(at::randn(p.sizes(), gen) * 0.3);
      c.push_back(at::rand(p.sizes(), gen) * 2);
    }
  }
  at::Tensor loss(const std::vector<at::Tensor>& params) const {
    at::Tensor l = at::zeros({});
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& p = params[i];
      l = l + (0.5 * a[i] * p.pow(2) + c[i] * p.pow(4) / 12 + b[i] * p).sum();
    }
    return l;
  }
  at::Tensor gradient(size_t i, const at::Tensor& p) const { return f64(a[i]) * p + f64(c[i]) * p.pow(3) / 3 + f64(b[i]); }
  at::Tensor hessian_diagonal(size_t i, const at::Tensor& p) const { return f64(a[i]) + f64(c[i]) * p.pow(2); }
};

std::vector<AdaHessianReference> adahessian_reference(const AdaHessianOptions& o, const std::vector<at::Tensor>& p0,
                                                      const DiagonalQuartic& f, int64_t k, int steps) {
  std::vector<AdaHessianReference> ref;
  for (const auto& p : p0) ref.emplace_back(o, p);
  for (int t = 0; t < steps; ++t)
    for (size_t i = 0; i < ref.size(); ++i) {
      if (t % k == 0) ref[i].D = f.hessian_diagonal(i, ref[i].p);
      ref[i].step(f.gradient(i, ref[i].p), t + 1);
    }
  return ref;
}

TEST(AdaHessianReference, FollowsTheHeaderRuleWithPowerDecayAndInterval) {
  struct Case {
    double power, wd;
    int64_t k;
  };
  for (const Case c : {Case{1.0, 0.0, 1}, Case{0.5, 0.02, 2}, Case{0.7, 0.1, 3}}) {
    SCOPED_TRACE("hessian_power " + std::to_string(c.power) + ", weight_decay " + std::to_string(c.wd) +
                 ", hessian_interval " + std::to_string(c.k));
    const int steps = 7;
    const AdaHessianOptions options = AdaHessianOptions(0.05).betas({0.9, 0.99}).eps(1e-4).weight_decay(c.wd)
                                          .hessian_power(c.power).hessian_interval(c.k).seed(1);
    std::vector<at::Tensor> params = make_params({{3, 4}, {5}}, 7);
    const std::vector<at::Tensor> initial = testing::clones(params);
    const DiagonalQuartic f(params, 8);
    AdaHessian opt(params, options);
    for (int t = 0; t < steps; ++t) opt.step(second_order_closure(params, [&] { return f.loss(params); }));
    const auto ref = adahessian_reference(options, initial, f, c.k, steps);
    const auto every_step = adahessian_reference(options, initial, f, 1, steps);
    for (size_t i = 0; i < params.size(); ++i) {
      auto& s = state_of<AdaHessianParamState>(opt, params[i]);
      EXPECT_EQ(s.step(), steps);
      expect_close(params[i], ref[i].p, kStepTol(steps), "p " + std::to_string(i));
      expect_close(s.exp_avg(), ref[i].m, kStepTol(steps), "m " + std::to_string(i));
      expect_close(s.exp_hessian_diag_sq(), ref[i].v, kStepTol(steps), "v " + std::to_string(i));
      expect_close(s.hessian_diag(), ref[i].D, kStepTol(steps), "D " + std::to_string(i));
      if (c.k > 1) EXPECT_GT(testing::max_abs_diff(s.hessian_diag(), every_step[i].D), 100 * kStepTol(steps));
    }
  }
}

TEST(AdaHessianReference, ConvolutionKernelsAverageAbsDOverTheirSpatialDims) {
  // loss = sum(c4 * w^2) + sum(c3 * u^2) + sum(b * w): H = diag(2 c4, 2 c3). c4 varies over
  // the kernel's positions and changes sign inside a (out, in) slice, so mean |2 c4| over
  // (h, w) differs from both 2 c4 and the mean of the signed values. The 3-D tensor keeps
  // its signed, unaveraged D.
  std::vector<at::Tensor> params = make_params({{2, 3, 2, 2}, {2, 2, 3}}, 9);
  auto gen = generator(10);
  const at::Tensor c4 = at::randn({2, 3, 2, 2}, gen), c3 = at::randn({2, 2, 3}, gen), b = at::randn({2, 3, 2, 2}, gen);
  c4[0][0].copy_(at::tensor({-1.0f, 0.5f, 2.0f, -0.25f}).view({2, 2}));
  const at::Tensor D4 = (2 * f64(c4)).abs().mean({2, 3}, /*keepdim=*/true).expand({2, 3, 2, 2});
  const at::Tensor D3 = 2 * f64(c3);
  ASSERT_GT(testing::max_abs_diff(D4, 2 * f64(c4)), 1.0);
  ASSERT_GT(testing::max_abs_diff(D4, (2 * f64(c4)).mean({2, 3}, true).expand({2, 3, 2, 2})), 1.0);

  const AdaHessianOptions options = AdaHessianOptions(0.05).betas({0.9, 0.99}).seed(2);
  std::vector<AdaHessianReference> ref;
  for (const auto& p : params) ref.emplace_back(options, p);
  ref[0].D = D4;
  ref[1].D = D3;
  AdaHessian opt(params, options);
  const int steps = 3;
  for (int t = 0; t < steps; ++t) {
    opt.step(second_order_closure(params, [&] {
      return (c4 * params[0].pow(2)).sum() + (c3 * params[1].pow(2)).sum() + (b * params[0]).sum();
    }));
    ref[0].step(2 * f64(c4) * ref[0].p + f64(b), t + 1);
    ref[1].step(2 * f64(c3) * ref[1].p, t + 1);
  }
  expect_close(state_of<AdaHessianParamState>(opt, params[0]).hessian_diag(), D4, 4 * kFloatRoundoff, "4-D D");
  expect_close(state_of<AdaHessianParamState>(opt, params[1]).hessian_diag(), D3, 4 * kFloatRoundoff, "3-D D");
  for (size_t i = 0; i < params.size(); ++i) expect_close(params[i], ref[i].p, kStepTol(steps), "p " + std::to_string(i));
}

TEST(AdaHessianErrors, StepNeedsAClosure) {
  std::vector<at::Tensor> params = make_params({{3}}, 11);
  AdaHessian opt(params);
  params[0].mutable_grad() = at::ones({3});
  const at::Tensor before = params[0].detach().clone();
  testing::expect_error_with([&] { opt.step(); }, {"lowbit::AdaHessian", "needs a closure", "create_graph"});
  EXPECT_TRUE(at::equal(params[0], before));
  const DiagonalQuadratic f(params, 12);
  testing::expect_error_with([&] { opt.step(first_order_closure(params, [&] { return f.loss(params); })); },
                             {"no graph", "create_graph"});
  EXPECT_TRUE(at::equal(params[0], before));
}

// ---------------------------------------------------------------------------------------
// M-FAC: F = lambda I + (1/n) G^T G over the last n = min(count, m) gradients (the current
// one included); d = F^-1 g + wd p;  buf = momentum buf + d;  p -= lr buf. A quantized
// window's G holds the dequantized gradients, and g is the new gradient as stored.

// F^-1 g by a dense fp64 d x d solve (no Woodbury): rows are the stored gradients, and the
// Fisher's 1/n divides by `divisor` (default: the number of rows).
at::Tensor dense_inverse_fisher(const std::vector<at::Tensor>& rows, const at::Tensor& g, double damping,
                                double divisor = 0) {
  const at::Tensor G = at::stack(rows).to(at::kDouble);  // n x d
  const int64_t d = G.size(1);
  const double n = divisor > 0 ? divisor : static_cast<double>(G.size(0));
  const at::Tensor F = at::eye(d, G.options()) * damping + G.t().mm(G) / n;
  return at::linalg_solve(F, g.reshape({d, 1}).to(at::kDouble)).reshape(g.sizes());
}

// The last min(count, m) entries of `history`.
std::vector<at::Tensor> window_of(const std::vector<at::Tensor>& history, int64_t m) {
  const size_t n = std::min<size_t>(history.size(), static_cast<size_t>(m));
  return std::vector<at::Tensor>(history.end() - n, history.end());
}

// The fp64 solve behind both windows is well conditioned here (cond(F) <= 1 + |G|^2 / (n
// lambda) <= ~1e5, so ~1e-11 relative), and the direction leaves the library as fp32
// (2^-24 relative per element, measured 0.5 to 0.75 of that): the fp64 part can still be
// amplified by the cancellation in (g - G^T c) / lambda, at most by the same cond(F), to
// ~1e-11 * 1e5 = 1e-6; 1e-5 is 10x that and far below the change from a wrong window (other
// rows, or 1/m in place of 1/n: O(1), checked below against 100x this tolerance).
constexpr double kDirectionTol = 1e-5;

// With lr = 1, momentum = wd = 0 and p = 0 before each step, the step leaves p = -d exactly
// (the window never reads p). One step over all parameters, whose gradients are `grads`.
std::vector<at::Tensor> directions_of_step(MFAC& opt, std::vector<at::Tensor>& params,
                                           const std::vector<at::Tensor>& grads) {
  for (size_t i = 0; i < params.size(); ++i) {
    {
      torch::NoGradGuard no_grad;
      params[i].zero_();
    }
    params[i].mutable_grad() = grads[i];
  }
  opt.step();
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(-p.detach().clone());
  return out;
}

at::Tensor direction_of_step(MFAC& opt, at::Tensor& p, const at::Tensor& grad) {
  std::vector<at::Tensor> params = {p};
  return directions_of_step(opt, params, {grad})[0];
}

TEST(MfacReference, InverseFisherProductIsTheDenseSolveOverTheLastMGradients) {
  const int64_t m = 4;
  const double damping = 0.01;
  std::vector<at::Tensor> params = make_params({{6, 7}, {5}}, 12);
  MFAC opt(params, MFACOptions(1.0).window(m).damping(damping));
  std::vector<std::vector<at::Tensor>> history(params.size());
  auto gen = generator(13);
  for (int t = 0; t < 10; ++t) {  // n < m for t < 3, n = m at t = 3, then the ring wraps twice
    std::vector<at::Tensor> grads;
    for (const auto& p : params) grads.push_back(at::randn(p.sizes(), gen));
    const std::vector<at::Tensor> directions = directions_of_step(opt, params, grads);
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& g = grads[i];
      const at::Tensor& d = directions[i];
      history[i].push_back(g.reshape(-1));
      const at::Tensor expected = dense_inverse_fisher(window_of(history[i], m), g, damping);
      EXPECT_LE(testing::relative_distance(d, expected), kDirectionTol) << "step " << t << ", parameter " << i;
      auto& s = state_of<MFACParamState>(opt, params[i]);
      EXPECT_EQ(s.count(), t + 1);
      EXPECT_FALSE(s.momentum_buffer().defined());
      if (t == 2) {
        // The test has teeth: 1/m in place of 1/n (n = 3 < m here) moves d far beyond the tolerance.
        EXPECT_GT(testing::relative_distance(dense_inverse_fisher(window_of(history[i], m), g, damping, m), expected),
                  100 * kDirectionTol);
      }
      if (t == 9) {
        // ... and so does a window that forgets nothing.
        EXPECT_GT(testing::relative_distance(dense_inverse_fisher(history[i], g, damping), expected),
                  100 * kDirectionTol);
      }
    }
  }
}

// The window's quantization of one gradient, through the public codec: one row of d
// elements, block-wise scales, nearest rounding (what the window documents), and its
// dequantized values. Kashin fits the row's own centroids.
QuantizedMatrix quantize_row(const at::Tensor& g, int bits, int64_t block_size, Mapping mapping) {
  QuantOptions q;
  q.bits = bits;
  q.mapping = mapping;
  q.block_size = block_size;
  return QuantizedMatrix::quantize(g.reshape({1, -1}), q);
}

// Push-through: F^-1 G^T = G^T (lambda I + G G^T / n)^-1, and the newest gradient is the
// last row of G, so d = F^-1 g = G^T c with c = (lambda I + K / n)^-1 e_last, K = G G^T.
// Returns c (n elements) for the rows G (n x d, fp64).
at::Tensor window_coefficients(const at::Tensor& G, double damping) {
  const int64_t n = G.size(0);
  const at::Tensor M = at::eye(n, G.options()) * damping + G.mm(G.t()) / static_cast<double>(n);
  at::Tensor e_last = at::zeros({n, 1}, G.options());
  e_last[n - 1] = 1;
  return at::linalg_solve(M, e_last).reshape(-1);
}

double spectral_norm(const at::Tensor& m) { return at::linalg_svdvals(m).max().item<double>(); }

TEST(MfacReference, QuantizedWindowsPreconditionTheStoredGradients) {
  // d = 42 with block 16: two full blocks and a partial one; 4-bit rows pack to 21 bytes.
  const int64_t m = 3, block = 16, d = 42;
  const double damping = 0.5;
  std::vector<at::Tensor> p32 = make_params({{6, 7}}, 14), p8 = testing::clones(p32), p4 = testing::clones(p32);
  MFAC fp32(p32, MFACOptions(1.0).window(m).damping(damping));
  MFAC q8(p8, MFACOptions(1.0).window(m).damping(damping).bits(8).quant_block_size(block));
  MFAC q4(p4, MFACOptions(1.0).window(m).damping(damping).bits(4).quant_block_size(block));
  std::vector<at::Tensor> pk = testing::clones(p32);
  MFAC kashin(pk, MFACOptions(1.0).window(m).damping(damping).bits(4).mapping("kashin").quant_block_size(block));
  struct Window {
    std::string name;
    int bits;
    Mapping mapping;
    MFAC* opt;
    at::Tensor* p;
    double bound_share;  // the largest bound accepted, as a share of |d| (measured below)
  };
  const std::vector<Window> windows = {{"8-bit", 8, Mapping::DynamicTree, &q8, &p8[0], 0.03},
                                       {"4-bit", 4, Mapping::DynamicTree, &q4, &p4[0], 0.5},
                                       {"4-bit kashin", 4, Mapping::Kashin, &kashin, &pk[0], 0.6}};
  std::vector<at::Tensor> raw;
  std::map<std::string, std::vector<at::Tensor>> dequantized;
  auto gen = generator(15);
  for (int t = 0; t < 5; ++t) {  // n = 1, 2, 3, then the ring wraps
    const at::Tensor g = at::randn({6, 7}, gen);
    raw.push_back(g.reshape(-1));
    const at::Tensor d32 = direction_of_step(fp32, p32[0], g);
    const at::Tensor expected32 = dense_inverse_fisher(window_of(raw, m), g, damping);
    EXPECT_LE(testing::relative_distance(d32, expected32), kDirectionTol) << "fp32, step " << t;
    for (const Window& window : windows) {
      const int bits = window.bits;
      const std::string what = window.name + ", step " + std::to_string(t);
      const QuantizedMatrix q = quantize_row(g, bits, block, window.mapping);
      dequantized[window.name].push_back(q.dequantize().reshape(-1));
      const at::Tensor direction = direction_of_step(*window.opt, *window.p, g);
      // The window stored exactly the codec's codes and scales of g (and its centroids,
      // Kashin), in ring slot t % m.
      auto& s = state_of<MFACParamState>(*window.opt, *window.p);
      EXPECT_TRUE(at::equal(s.codes()[t % m], q.codes()[0])) << what;
      EXPECT_TRUE(at::equal(s.scales()[t % m], q.scales()[0])) << what;
      EXPECT_EQ(s.centroids().defined(), window.mapping == Mapping::Kashin) << what;
      if (window.mapping == Mapping::Kashin) EXPECT_TRUE(at::equal(s.centroids()[t % m], q.centroids())) << what;
      EXPECT_EQ(s.codes().size(1), packed_row_bytes(d, bits));
      EXPECT_FALSE(s.rows().defined());
      // F over the dequantized rows, applied to the new gradient as stored (its dequantized
      // row): the header's rule for a quantized window.
      const std::vector<at::Tensor> rows = window_of(dequantized[window.name], m);
      const at::Tensor g_stored = dequantized[window.name].back().view({6, 7});
      const at::Tensor expected = dense_inverse_fisher(rows, g_stored, damping);
      EXPECT_LE(testing::relative_distance(direction, expected), kDirectionTol) << what;
      // Applying F_q^-1 to the unquantized g instead would send g's rounding residual, which
      // lies outside the window's span, through 1 / damping: a different direction.
      EXPECT_GT(testing::relative_distance(direction, dense_inverse_fisher(rows, g, damping)), 100 * kDirectionTol)
          << what;

      // Against the fp32 window. With d = G^T c and d_q = G_q^T c_q (see window_coefficients),
      //   d_q - d = E^T c_q + G^T (c_q - c),   E = G_q - G,
      //   c_q - c = M_q^-1 ((K - K_q) / n) c,  M_q = lambda I + K_q / n,
      // so |d_q - d| <= |E| |c_q| + |G| |K - K_q| / n / lambda_min(M_q) |c| (spectral norms),
      // a bound computed here from the stored rows, plus the fp32 rounding of both directions.
      const at::Tensor G = at::stack(window_of(raw, m)).to(at::kDouble), Gq = at::stack(rows).to(at::kDouble);
      const double n = static_cast<double>(G.size(0));
      const at::Tensor c = window_coefficients(G, damping), cq = window_coefficients(Gq, damping);
      testing::expect_close(G.t().mv(c), f64(expected32).reshape(-1), 1e-12, what + ": push-through identity");
      const at::Tensor K = G.mm(G.t()), Kq = Gq.mm(Gq.t());
      const double lambda_min_Mq = damping + at::linalg_eigvalsh(Kq).min().item<double>() / n;
      const double bound = spectral_norm(Gq - G) * cq.norm().item<double>() +
                           spectral_norm(G) * spectral_norm(K - Kq) / n / lambda_min_Mq * c.norm().item<double>();
      const double norm32 = expected32.norm().item<double>();
      const double distance = (f64(direction) - f64(d32)).norm().item<double>();
      EXPECT_LE(distance, bound + 2 * kDirectionTol * norm32) << what;
      // ... and the bound says something: the quantized direction is close to the fp32 one
      // (measured here: the bound is 1-3x the distance, 0.7-2% of |d| at 8 bits, 16-35% at 4,
      // 24-42% with Kashin's 4 bits, whose frame halves the bits per coordinate).
      EXPECT_LT(bound, window.bound_share * norm32) << what;
      EXPECT_GT(distance, 0) << what;  // it really is a different (quantized) Fisher
    }
  }
}

TEST(MfacReference, StateBytesFollowTheWindowLayout) {
  // One parameter of d = 2560 elements, window m = 8, block 64. The window holds
  //   fp32:  rows m d 4 bytes                                  + Gram m^2 8 bytes
  //   b bits: codes m ceil(d b / 8) + scales m ceil(d / 64) 4  + Gram m^2 8 bytes
  const int64_t m = 8, d = 2560, block = 64;
  auto expected = [&](int64_t bits) {
    const int64_t gram = m * m * 8;
    if (bits == 32) return m * d * 4 + gram;
    return m * ((d * bits + 7) / 8) + m * ((d + block - 1) / block) * 4 + gram;
  };
  std::map<int64_t, int64_t> bytes;
  for (int64_t bits : {32, 8, 4}) {
    std::vector<at::Tensor> params = make_params({{64, 40}}, 16);
    MFAC opt(params, MFACOptions(0.1).window(m).bits(bits).quant_block_size(block));
    EXPECT_EQ(opt.state_bytes().total(), 0);
    params[0].mutable_grad() = at::randn({64, 40});
    opt.step();
    EXPECT_EQ(opt.state_bytes().preconditioner, expected(bits)) << bits << " bits";
    EXPECT_EQ(opt.state_bytes().first_order, 0) << bits << " bits (no momentum buffer)";
    bytes[bits] = opt.state_bytes().preconditioner;
  }
  // 82432 / 12032: the 4-bit window is 6.85x smaller than the fp32 one (22272 for 8 bits).
  EXPECT_EQ(bytes[32] * expected(4), bytes[4] * expected(32));
  EXPECT_GT(bytes[32], 6 * bytes[4]);
  EXPECT_GT(bytes[32], 3 * bytes[8]);
}

TEST(MfacReference, MomentumAndWeightDecayFollowTheHeaderRule) {
  const int64_t m = 3;
  const double lr = 0.1, momentum = 0.9, wd = 0.05, damping = 0.1;
  std::vector<at::Tensor> params = make_params({{4, 5}, {6}}, 17);
  MFAC opt(params, MFACOptions(lr).window(m).damping(damping).momentum(momentum).weight_decay(wd));
  std::vector<at::Tensor> p_ref, buf_ref;
  std::vector<std::vector<at::Tensor>> history(params.size());
  for (const auto& p : params) {
    p_ref.push_back(f64(p));
    buf_ref.push_back(at::zeros_like(p_ref.back()));
  }
  auto gen = generator(18);
  const int steps = 6;
  for (int t = 0; t < steps; ++t) {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor g = at::randn(params[i].sizes(), gen);
      params[i].mutable_grad() = g;
      history[i].push_back(g.reshape(-1));
      const at::Tensor d = dense_inverse_fisher(window_of(history[i], m), g, damping) + wd * p_ref[i];
      buf_ref[i] = momentum * buf_ref[i] + d;
      p_ref[i] = p_ref[i] - lr * buf_ref[i];
    }
    opt.step();
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string what = "step " + std::to_string(t) + ", parameter " + std::to_string(i);
      // The direction carries kDirectionTol; the momentum sum (<= 1 / (1 - momentum) = 10
      // directions, each scaled by lr) and the fp32 parameter add kStepTol.
      expect_close(params[i], p_ref[i], kDirectionTol + kStepTol(t + 1), what + ": p");
      expect_close(state_of<MFACParamState>(opt, params[i]).momentum_buffer(), buf_ref[i],
                   kDirectionTol + kStepTol(t + 1), what + ": momentum buffer");
    }
  }
}

// ---------------------------------------------------------------------------------------
// NAG-GS:  b = alpha mu / (alpha mu + gamma)
//          v = (1 - b) v + b x - alpha / (alpha mu + gamma) g
//          gamma = (gamma + alpha mu) / (1 + alpha)
//          x = (1 - a) x + a v,  a = alpha / (1 + alpha);   v starts at x

TEST(NagGsReference, FollowsTheHeaderEquationsAndGammaEvolves) {
  for (double mu : {0.5, 0.0}) {
    SCOPED_TRACE("mu " + std::to_string(mu));
    const double alpha = 0.2, gamma0 = 1.5;
    std::vector<at::Tensor> params = make_params({{4, 5}, {3}}, 19);
    NagGS opt(params, NagGSOptions(alpha).mu(mu).gamma(gamma0));
    std::vector<at::Tensor> x, v;
    for (const auto& p : params) {
      x.push_back(f64(p));
      v.push_back(f64(p));
    }
    double gamma = gamma0;
    auto gen = generator(20);
    const int steps = 8;
    for (int t = 0; t < steps; ++t) {
      const double b = alpha * mu / (alpha * mu + gamma), a = alpha / (1 + alpha);
      for (size_t i = 0; i < params.size(); ++i) {
        params[i].mutable_grad() = at::randn(params[i].sizes(), gen);
        v[i] = (1 - b) * v[i] + b * x[i] - alpha / (alpha * mu + gamma) * f64(params[i].grad());
        x[i] = (1 - a) * x[i] + a * v[i];
      }
      gamma = (gamma + alpha * mu) / (1 + alpha);
      opt.step();
      for (size_t i = 0; i < params.size(); ++i) {
        const std::string what = "step " + std::to_string(t) + ", parameter " + std::to_string(i);
        auto& s = state_of<NagGSParamState>(opt, params[i]);
        // gamma is a double on both sides, computed by the same three operations.
        EXPECT_NEAR(s.gamma(), gamma, 1e-14 * gamma) << what;
        EXPECT_EQ(s.step(), t + 1);
        // alpha / gamma grows to ~0.6 when mu = 0; the step stays a convex combination
        // plus a bounded gradient term, so no amplification beyond kStepTol.
        expect_close(params[i], x[i], kStepTol(t + 1), what + ": x");
        expect_close(s.velocity(), v[i], kStepTol(t + 1), what + ": v");
      }
    }
    // gamma evolves: towards mu for mu > 0 ((gamma - mu) shrinks by 1 / (1 + alpha) a step),
    // geometrically to 0 for mu = 0.
    const double final_gamma = state_of<NagGSParamState>(opt, params[0]).gamma();
    // 8 steps of 3 fp64 roundings each on gamma (<= max(gamma0, mu) = 1.5), every one
    // contracted afterwards, plus pow and the closed form's 3 operations: < 32 u * 1.5.
    EXPECT_NEAR(final_gamma, mu + (gamma0 - mu) / std::pow(1 + alpha, steps), 32 * 0x1p-53 * 1.5);
    // (1 + alpha)^-8 = 0.23 for alpha = 0.2: the gap to mu at least halves.
    EXPECT_LT(std::abs(final_gamma - mu), 0.5 * std::abs(gamma0 - mu));
  }
}

TEST(NagGsConvergence, ReducesAStronglyConvexQuadraticByThreeOrders) {
  // f(x) = 0.5 (x - x*)^T A (x - x*), A with eigenvalues 1..10 (mu = 1, L = 10). With
  // alpha = 0.2 the iteration contracts (fp64 simulation: f / f0 ~ 1e-16 after 100 steps).
  const int64_t n = 10;
  auto gen = generator(21);
  const at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({n, n}, gen, at::kDouble)));
  const at::Tensor A = Q.mm(at::diag(at::linspace(1, 10, n, at::kDouble))).mm(Q.t()).to(at::kFloat);
  const at::Tensor target = at::randn({n}, gen);
  std::vector<at::Tensor> params = {at::zeros({n}).requires_grad_(true)};
  auto loss_of = [&] {
    const at::Tensor e = params[0] - target;
    return 0.5 * e.dot(A.mv(e));
  };
  NagGS opt(params, NagGSOptions(0.2).mu(1.0).gamma(1.0));
  const double initial = loss_of().item<double>();
  for (int t = 0; t < 100; ++t)
    opt.step([&] {
      params[0].mutable_grad() = at::Tensor();
      at::Tensor loss = loss_of();
      loss.backward();
      return loss.detach();
    });
  const double final_loss = loss_of().item<double>();
  EXPECT_GT(initial, 1.0);
  // Converging at all on this quadratic (Hessian eigenvalues 1..10, so a linearly convergent
  // method with a rate of 1 - 1/15 per step, gradient descent's 1 - mu/L = 0.9 being faster,
  // gets below 1e-3 in 100 steps: (14/15)^100 = 1e-3); measured ~1e-11. Not a rate claim.
  EXPECT_LT(final_loss, 1e-3 * initial) << "initial " << initial << ", final " << final_loss;
}

}  // namespace
}  // namespace lowbit
