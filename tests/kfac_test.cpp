// lowbit::KFAC and lowbit::AdaBK against dense fp64 references written here, for Linear and
// Conv2d layers with and without bias; the 4-bit factors' error ordering; exact state bytes;
// bit-identical resume; errors that leave everything unchanged.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include <cmath>
#include <cstdio>
#include <sstream>

#include <lowbit/kfac.h>

#include "expect_error.h"

namespace lowbit {
namespace {

constexpr double kUnit = 1.0 / (1 << 24);  // fp32 unit roundoff

// One layer under test: Linear 6 -> 5 on a batch of 16, or Conv2d 3 -> 4 (3x3, stride 2,
// padding 1) on 4 images of 5x5 (3x3 output positions).
struct Case {
  bool conv;
  bool bias;
};

struct Layer {
  Case c;
  KfacLayer layer;
  // Multiplies the loss: scales D and Ds by it and G by its square (A unchanged), so the
  // factors' scales differ and pi-damping's pi is far from 1.
  double loss_scale = 1;
  torch::Tensor weight, bias;
  explicit Layer(Case cs, uint64_t seed) : c(cs) {
    at::manual_seed(seed);
    weight = (c.conv ? at::randn({4, 3, 3, 3}) : at::randn({5, 6})).mul_(0.3).requires_grad_(true);
    if (c.bias) bias = at::randn({c.conv ? 4 : 5}).mul_(0.3).requires_grad_(true);
    layer.weight = weight;
    layer.bias = bias;
    if (c.conv) layer.padding = {1, 1}, layer.stride = {2, 2};
  }
  std::vector<torch::Tensor> params() const {
    return c.bias ? std::vector<torch::Tensor>{weight, bias} : std::vector<torch::Tensor>{weight};
  }
  at::Tensor input(uint64_t seed) const {
    at::manual_seed(seed);
    return c.conv ? at::randn({4, 3, 5, 5}) : at::randn({16, 6});
  }
  at::Tensor target(uint64_t seed) const {
    at::manual_seed(seed + 1000);
    return c.conv ? at::randn({4, 4, 3, 3}) : at::randn({16, 5});
  }
  at::Tensor forward(const at::Tensor& x) const {
    return c.conv ? at::conv2d(x, weight, bias, {2, 2}, {1, 1}) : at::linear(x, weight, bias);
  }
  // Forward (observed), the batch-mean loss 0.5 mean_i ||y_i - t_i||^2, backward.
  void pass(LayerStatistics& stats, uint64_t seed) const {
    for (const auto& p : params()) p.mutable_grad() = at::Tensor();
    const at::Tensor x = input(seed);
    const at::Tensor y = forward(x);
    stats.observe(weight, x, y);
    ((y - target(seed)).pow(2).sum() * (0.5 * loss_scale / x.size(0))).backward();
  }
};

// The reference, in fp64 and independent of the library's capture: the homogeneous inputs
// a_it (patches cut by slicing the padded image, one slice per kernel offset) and the
// per-example loss derivatives Ds_it = y_it - t_it (analytic for this loss).
struct Batch {
  at::Tensor a;   // [B, T, n_A]
  at::Tensor ds;  // [B, T, out]
};

Batch reference_batch(const Layer& l, uint64_t seed, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor x = l.input(seed).to(at::kDouble);
  Batch b;
  if (l.c.conv) {
    const at::Tensor padded = at::constant_pad_nd(x, {1, 1, 1, 1});
    std::vector<at::Tensor> columns;  // (channel, ki, kj) order: weight.view(out, -1)'s
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj)
          columns.push_back(padded.select(1, ch).slice(1, ki, ki + 5, 2).slice(2, kj, kj + 5, 2).reshape({4, 9}));
    b.a = at::stack(columns, 2);  // [B, T, 27]
  } else {
    b.a = x.unsqueeze(1);
  }
  if (l.c.bias) b.a = at::cat({b.a, at::ones({b.a.size(0), b.a.size(1), 1}, b.a.options())}, 2);
  const at::Tensor w = l.c.bias ? at::cat({weight.reshape({weight.size(0), -1}), bias.reshape({-1, 1})}, 1)
                                : weight.reshape({weight.size(0), -1});
  const at::Tensor y = at::matmul(b.a, w.t());  // [B, T, out]
  const at::Tensor t = l.c.conv ? l.target(seed).to(at::kDouble).flatten(2).transpose(1, 2)
                                : l.target(seed).to(at::kDouble).unsqueeze(1);
  b.ds = (y - t) * l.loss_scale;
  return b;
}

// D = (1/B) sum_{i,t} Ds a^T; A = (1/B) sum a a^T; G = (1/(B T)) sum Ds Ds^T (KFC).
at::Tensor gradient(const Batch& b) { return at::einsum("bto,bti->oi", {b.ds, b.a}) / b.a.size(0); }
at::Tensor input_factor(const Batch& b) { return at::einsum("bti,btj->ij", {b.a, b.a}) / b.a.size(0); }
at::Tensor output_factor(const Batch& b) {
  return at::einsum("bto,btp->op", {b.ds, b.ds}) / (b.a.size(0) * b.a.size(1));
}

at::Tensor power(const at::Tensor& f, double exponent, double absolute, double relative) {
  const auto [values, vectors] = at::linalg_eigh(f);
  const at::Tensor v = values.clamp_min(0);
  const at::Tensor d = (v + absolute + relative * v.max()).pow(exponent);
  return at::matmul(vectors * d.unsqueeze(0), vectors.t());
}

double condition(const at::Tensor& f, double absolute, double relative) {
  const at::Tensor v = at::linalg_eigvalsh(f).clamp_min(0);
  const at::Tensor d = v + absolute + relative * v.max();
  return (d.max() / d.min()).item<double>();
}

double relative_error(const at::Tensor& x, const at::Tensor& reference) {
  return ((x.to(at::kDouble) - reference).norm() / reference.norm()).item<double>();
}

const Case kCases[] = {{false, false}, {false, true}, {true, false}, {true, true}};

std::string name(const Case& c) { return std::string(c.conv ? "conv2d" : "linear") + (c.bias ? "+bias" : ""); }

// Runs `steps` optimizer steps (statistics and roots every step) and the fp64 reference side by
// side; returns the largest relative error of a step's parameter change and its bound.
struct Outcome {
  double error = 0, bound = 0;
  double pi = 1;  // the reference's last pi (K-FAC)
};

// K-FAC's damping_mode (`mode`) and the one the reference applies (`reference_mode`) are
// separate so a test can show that the comparison tells them apart.
Outcome compare_with_reference(const Case& c, bool adabk, const std::string& rule, const std::string& mode = "tikhonov",
                               const std::string& reference_mode = "tikhonov", double loss_scale = 1) {
  Layer l(c, 1);
  l.loss_scale = loss_scale;
  auto stats = std::make_shared<LayerStatistics>(std::vector<KfacLayer>{l.layer});
  KfacOptions o(0.1);
  o.rule(rule).stat_interval(1).root_interval(1).damping(0.05).damping_input(1e-2).damping_output(1e-2)
      .weight_decay(0.01).eps(1.0)  // eps 1: step 1's AdamW map g -> g / (|g| + 1) is 1-Lipschitz
      .damping_mode(mode);
  std::unique_ptr<KroneckerLayerOptimizer> opt;
  if (adabk) {
    opt = std::make_unique<AdaBK>(stats, l.params(), o);
  } else {
    opt = std::make_unique<KFAC>(stats, l.params(), o);
  }
  at::Tensor w = l.weight.detach().to(at::kDouble), b = c.bias ? l.bias.detach().to(at::kDouble) : at::Tensor();
  at::Tensor a_stat, g_stat, buf, m, v;
  const double beta = o.stat_decay();
  Outcome out;
  for (int step = 0; step < 2; ++step) {
    const uint64_t seed = 10 + step;
    const Batch batch = reference_batch(l, seed, w, b);
    const at::Tensor d = gradient(batch);
    l.pass(*stats, seed);
    // The capture's convention matches autograd's gradient: D = (1/B) sum Ds a^T.
    // Componentwise, an fp32 sum of k = B T products errs by at most k u sum |Ds| |a| / B
    // (the inputs themselves are exact in both).
    const at::Tensor magnitude = at::einsum("bto,bti->oi", {batch.ds.abs(), batch.a.abs()}) / batch.a.size(0);
    const double k_sum = static_cast<double>(batch.a.size(0) * batch.a.size(1)) + 2;
    // (Only while both runs follow the same algorithm: otherwise their weights part after step 1.)
    if (mode == reference_mode)
      EXPECT_TRUE(((l.layer.gradient_matrix().to(at::kDouble) - d).abs() <= magnitude * (k_sum * kUnit * 2)).all().item<bool>())
          << name(c);
    // Statistics: the first update enters with weight 1, then the EMA with beta.
    a_stat = step == 0 ? input_factor(batch) : beta * a_stat + (1 - beta) * input_factor(batch);
    g_stat = step == 0 ? output_factor(batch) : beta * g_stat + (1 - beta) * output_factor(batch);
    at::Tensor dir;
    double kappa = 0, pi_term = 0;
    if (adabk) {
      const double e = 1e-2;
      dir = at::matmul(at::matmul(power(g_stat, -0.5, 0, e), d), power(a_stat, -0.5, 0, e));
      dir = dir * (d.norm() / (dir.norm() + 1e-12));
      kappa = std::sqrt(condition(g_stat, 0, e)) + std::sqrt(condition(a_stat, 0, e));
    } else {
      // pi-damping (Martens & Grosse 2015, sec. 6.3): pi = sqrt((tr A / dim A) / (tr G / dim G)),
      // A + pi lambda I, G + (lambda / pi) I; Tikhonov is pi = 1.
      const double n_a = static_cast<double>(a_stat.size(0)), n_g = static_cast<double>(g_stat.size(0));
      const double pi = reference_mode == "pi"
                            ? std::sqrt((a_stat.trace().item<double>() / n_a) / (g_stat.trace().item<double>() / n_g))
                            : 1.0;
      out.pi = pi;
      dir = at::matmul(at::matmul(power(g_stat, -1, 0.05 / pi, 0), d), power(a_stat, -1, 0.05 * pi, 0));
      kappa = condition(g_stat, 0.05 / pi, 0) + condition(a_stat, 0.05 * pi, 0);
      // The optimizer's pi comes from fp32 traces of fp32 statistics: each statistic entry is off
      // by <= k u relative (in the term below), a sum of n positive diagonal entries adds <= n u,
      // so the ratio under the root errs by <= (n_A + n_G + 2) u and pi by half that, + 2 u for
      // the root and products. A relative change delta of the damping mu moves each eigenvalue
      // lambda + mu by mu delta <= (lambda + mu) delta: a relative perturbation <= delta of each
      // damped factor, which its inverse amplifies by at most its condition (kappa, as above).
      pi_term = ((n_a + n_g + 2) / 2 + 2) * kUnit * kappa;
    }
    at::Tensor update;  // the parameter change of this step, homogeneous [out, n_A]
    const at::Tensor p = c.bias ? at::cat({w.reshape({w.size(0), -1}), b.reshape({-1, 1})}, 1) : w.reshape({w.size(0), -1});
    if (rule == "sgdm") {
      const at::Tensor g = dir + 0.01 * p;
      buf = step == 0 ? g : 0.9 * buf + g;
      update = -0.1 * buf;
    } else {
      m = step == 0 ? 0.1 * dir : 0.9 * m + 0.1 * dir;
      v = step == 0 ? 0.001 * dir * dir : 0.999 * v + 0.001 * dir * dir;
      const double bc1 = 1 - std::pow(0.9, step + 1), bc2 = 1 - std::pow(0.999, step + 1);
      update = -0.1 * 0.01 * p - 0.1 / bc1 * m / (at::sqrt(v / bc2) + 1.0);
    }
    const at::Tensor before = l.c.bias ? at::cat({l.weight.detach().reshape({w.size(0), -1}), l.bias.detach().reshape({-1, 1})}, 1)
                                       : l.weight.detach().reshape({w.size(0), -1}).clone();
    opt->step();
    const at::Tensor after = l.c.bias ? at::cat({l.weight.detach().reshape({w.size(0), -1}), l.bias.detach().reshape({-1, 1})}, 1)
                                      : l.weight.detach().reshape({w.size(0), -1});
    out.error = std::max(out.error, relative_error(after.to(at::kDouble) - before.to(at::kDouble), update));
    // Bound: fp32 products and sums of k = B T + n_A + n_out terms have relative error <= k u;
    // an inverse (root) of a matrix of condition kappa amplifies a relative perturbation by
    // kappa (kappa^(1/2) for the square root), and two such roots compose; the parameter
    // change is then rounded once more (8 u), and the momentum sums at most two steps (x 2).
    const double k = static_cast<double>(batch.a.size(0) * batch.a.size(1) + batch.a.size(2) + d.size(0));
    out.bound = std::max(out.bound, 2 * (k * kUnit * kappa * 4 + 8 * kUnit + pi_term));
    w = w + update.narrow(1, 0, w.numel() / w.size(0)).reshape(w.sizes());
    if (c.bias) b = b + update.narrow(1, w.numel() / w.size(0), 1).reshape(b.sizes());
  }
  return out;
}

}  // namespace

TEST(Kfac, MatchesFp64ReferenceOnLinearAndConv2dWithAndWithoutBias) {
  for (const Case& c : kCases) {
    const Outcome o = compare_with_reference(c, false, "sgdm");
    EXPECT_LT(o.error, o.bound) << name(c);
  }
}

TEST(AdaBK, SgdmBkAndAdamwBkMatchFp64Reference) {
  for (const Case& c : kCases)
    for (const char* rule : {"sgdm", "adamw"}) {
      const Outcome o = compare_with_reference(c, true, rule);
      EXPECT_LT(o.error, o.bound) << name(c) << " " << rule;
    }
}

TEST(Kfac, PiDampingMatchesFp64ReferenceOnLinearAndConv2dWithAndWithoutBias) {
  for (const Case& c : kCases) {
    // Loss x 10: G x 100, so pi ~ 0.1 and the factors' dampings differ 100-fold.
    const Outcome o = compare_with_reference(c, false, "sgdm", "pi", "pi", 10.0);
    EXPECT_LT(o.error, o.bound) << name(c);
    EXPECT_TRUE(o.pi < 0.5 || o.pi > 2) << name(c) << ": pi = " << o.pi << " does not test the split";
    std::printf("%s: pi %.4f, error %.3g (bound %.3g)\n", name(c).c_str(), o.pi, o.error, o.bound);
    // The comparison tells the modes apart: Tikhonov damping misses the pi reference by far.
    const Outcome tikhonov = compare_with_reference(c, false, "sgdm", "tikhonov", "pi", 10.0);
    EXPECT_GT(tikhonov.error, 10 * tikhonov.bound) << name(c);
  }
}

TEST(Kfac, DampingModeIsValidated) {
  Layer l({false, true}, 1);
  auto stats = std::make_shared<LayerStatistics>(std::vector<KfacLayer>{l.layer});
  testing::expect_error([&] { KFAC(stats, l.params(), KfacOptions().damping_mode("factored")); }, "damping_mode");
  // AdaBK's dampening is relative to the largest eigenvalue: pi's split of an absolute lambda has no meaning there.
  testing::expect_error([&] { AdaBK(stats, l.params(), KfacOptions().damping_mode("pi")); }, "damping_mode");
}

}  // namespace lowbit
