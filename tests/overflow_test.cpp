// Issue 17: a step whose gradients (or Hessian estimates, or the values it would store) would
// overflow is refused with an error naming the parameter and what would overflow, or skipped
// with skip_nonfinite, and in both cases leaves parameters and state bit-identical; the
// optimizer then steps on exactly as a twin that never saw the bad steps. Every optimizer
// and Shampoo variant, gradient scales 1e20 .. 1e38 (finite fp32) in fp32 and bf16, and fp16
// parameters near their largest value.
//
// Why every scale is refused: a bad gradient is s * c with c = clamp(N(0, 1), -1, 1) over the
// 96 x 80 matrix, so its squared norm is s^2 * sum c^2 >= s^2 * max c^2; with 7680 draws the
// largest |c| is 1 (the clamp) with certainty for practical purposes, so the squared norm is at
// least 1e40 > 2^104 ~ 2.03e31 at s = 1e20, and every entry (<= s <= 1e38) is finite in fp32
// and bf16 (largest finite values 3.40e38 and 3.39e38).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <lowbit/adahessian.h>
#include <lowbit/adamw.h>
#include <lowbit/distributed.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/shampoo.h>
#include <lowbit/sophia.h>

#include "archive_bytes.h"
#include "expect_error.h"
#include "optim/gradient_health.h"

namespace lowbit {
namespace {

using Optimizer = torch::optim::Optimizer;
using Params = std::vector<at::Tensor>;
using testing::expect_error;
using testing::save_to_string;

constexpr double kFp16Max = 65504.0;

// ---------------------------------------------------------------- the optimizers under test

// How to build one: the parameter groups, each group's skip_nonfinite, and the lr of group 0
// (0: the variant's own).
using Maker =
    std::function<std::unique_ptr<Optimizer>(const std::vector<Params>&, const std::vector<bool>& skips, double lr0)>;

template <typename Opt, typename Options>
Maker maker(Options o) {
  return [o](const std::vector<Params>& groups, const std::vector<bool>& skips,
             double lr0) -> std::unique_ptr<Optimizer> {
    std::vector<torch::optim::OptimizerParamGroup> pg;
    for (size_t g = 0; g < groups.size(); ++g) {
      Options go = o;
      go.skip_nonfinite(skips.at(g));
      if (g == 0 && lr0 > 0) go.lr(lr0);
      pg.emplace_back(groups[g], std::make_unique<Options>(go));
    }
    return std::make_unique<Opt>(pg, o);
  };
}

template <typename Opt>
int64_t skipped_of(const Optimizer& o) {
  return dynamic_cast<const Opt&>(o).skipped_steps();
}

struct Variant {
  std::string name;
  Maker make;
  std::function<int64_t(const Optimizer&)> skipped;
  std::string consequence;   // what the gradient rule's message says would overflow (the matrix)
  bool hutchinson = false;   // step() needs a closure with a double-backward graph
  double fp16_lr = 0;        // group 0's lr in the fp16 test (a step of about 5000 from a bad gradient)
  double fp16_bad = -1;      // the bad fp16 gradient's value
};

// Small eps where the rule divides by it: an fp16 eps below 6e-8 rounds to 0 (and 0 / 0 is
// NaN, which the trial of fp16 steps would rightly refuse). No weight decay: the fp16 test
// holds a parameter at 65000, which a decay with lr 5000 would blow up by itself.
ShampooOptions shampoo(int64_t bits) {
  return ShampooOptions(1e-3).bits(bits).eps(1e-3).stat_interval(1).root_interval(1).min_quant_numel(256);
}

std::vector<Variant> variants() {
  const std::string statistics = "the G G^T statistics would overflow fp32";
  std::vector<Variant> v = {
      {"shampoo-32", maker<Shampoo>(shampoo(32)), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-4", maker<Shampoo>(shampoo(4)), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-4-matrix", maker<Shampoo>(shampoo(4).quantize("matrix")), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-8-eigen-form", maker<Shampoo>(shampoo(8).root_storage("eigen")), skipped_of<Shampoo>, statistics, false,
       5000},
      {"shampoo-4-cholesky", maker<Shampoo>(shampoo(4).quantize("cholesky")), skipped_of<Shampoo>, statistics, false,
       5000},
      {"caspr-4", maker<Shampoo>(shampoo(4).preconditioner("caspr")), skipped_of<Shampoo>, statistics, false, 5000},
      {"soap-4", maker<Shampoo>(shampoo(4).preconditioner("soap")), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-32-sgdm", maker<Shampoo>(shampoo(32).graft("sgdm")), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-4-graft8", maker<Shampoo>(shampoo(4).graft_bits(8)), skipped_of<Shampoo>, statistics, false, 5000},
      {"shampoo-4-graft4", maker<Shampoo>(shampoo(4).graft_bits(4)), skipped_of<Shampoo>, statistics, false, 5000},
  };
  const std::string moment = "the second moment v (an EMA of g*g) would overflow fp32";
  for (int64_t bits : {32, 8, 4})
    v.push_back({"adamw-" + std::to_string(bits),
                 maker<AdamW>(AdamWOptions(1e-3).bits(bits).eps(1e-3).weight_decay(0).min_quant_numel(256)),
                 skipped_of<AdamW>, moment, false, 5000});
  const std::string momentum = "the momentum m is no longer guaranteed finite";
  v.push_back({"sophia-gnb", maker<Sophia>(SophiaOptions(1e-3).eps(1e-3).weight_decay(0)), skipped_of<Sophia>,
               momentum, false, 5000});
  v.push_back({"sophia-hutchinson",
               maker<Sophia>(SophiaOptions(1e-3).eps(1e-3).weight_decay(0).estimator("hutchinson").hessian_interval(1)),
               skipped_of<Sophia>, momentum, true, 5000});
  v.push_back({"adahessian", maker<AdaHessian>(AdaHessianOptions(1e-3).eps(1e-3)), skipped_of<AdaHessian>,
               "the update m / (sqrt(v) + eps) is no longer guaranteed finite", true, 5000});
  const std::string direction = "the inverse-Fisher direction F^-1 g is no longer guaranteed finite";
  // The fp16 test's group 0 had only zero gradients: its window holds 3 zero rows and the bad
  // g (n = 4), so F^-1 g = g / (damping + |g|^2 / n) = -1 / (1e-3 + 17 / 4) = -0.235: lr 25000
  // makes that a step of 5880.
  v.push_back({"mfac-32", maker<MFAC>(MFACOptions(1e-3).window(4)), skipped_of<MFAC>, direction, false, 25000});
  v.push_back({"mfac-4", maker<MFAC>(MFACOptions(1e-3).window(4).bits(4)), skipped_of<MFAC>, direction, false,
               25000});
  // NAG-GS with alpha 5000 (mu 1, gamma 1): b, a ~ 1 and c ~ 1, so x' ~ x - g: a gradient of
  // -5000 moves x by +5000.
  v.push_back({"nag-gs", maker<NagGS>(NagGSOptions(0.1)), skipped_of<NagGS>,
               "the velocity v is no longer guaranteed finite", false, 5000, -5000});
  return v;
}

// ---------------------------------------------------------------- stepping

// Drives an optimizer: gradients are set directly, or, for Hutchinson optimizers, made by a
// closure whose loss sum(G * p) + curvature / 2 * |p - p.detach()|^2 has gradient exactly G
// and Hessian curvature * I (so estimates u * (H u) = curvature, as u = +-1).
struct Stepper {
  Params params;
  bool hutchinson = false;
  std::vector<at::Tensor> grads;   // per parameter
  std::vector<double> curvature;   // per parameter

  at::Tensor step(Optimizer& opt) {
    if (!hutchinson) {
      for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i].clone();
      return opt.step();
    }
    return opt.step([this] {
      for (auto& p : params) p.mutable_grad() = at::Tensor();
      at::Tensor loss = at::zeros({}, at::kFloat);
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor d = params[i] - params[i].detach();
        loss = loss + (grads[i] * params[i]).sum().to(at::kFloat) +
               (d * d).sum().to(at::kFloat) * (curvature[i] / 2);
      }
      loss.backward({}, c10::nullopt, /*create_graph=*/true);
      return loss.detach();
    });
  }
};

Params make_params(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Params out;
  for (const auto& s : shapes) out.push_back(at::randn(s, gen).to(dtype).requires_grad_(true));
  return out;
}

Params copies(const Params& params) {
  Params out;
  for (const auto& p : params) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

// The normal gradient of step k: clamp(N(0, 1), -1, 1), in the parameter's dtype.
at::Tensor normal_grad(const at::Tensor& p, uint64_t k) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + k);
  return at::randn(p.sizes(), gen).clamp_(-1, 1).to(p.scalar_type());
}

void expect_same(const Params& a, const Params& b, const std::string& what) {
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << what << ", parameter " << i;
}

// An optimizer's checkpoint as (path, value) entries: the bytes of two archives of equal
// states differ (serialization ids, record order), their entries do not. A copy: later
// steps do not change it.
using Checkpoint = std::map<std::string, c10::IValue>;

void flatten(torch::serialize::InputArchive& archive, const std::string& prefix, Checkpoint& out) {
  for (const std::string& key : archive.keys()) {
    torch::serialize::InputArchive sub;
    c10::IValue value;
    if (archive.try_read(key, sub)) {
      flatten(sub, prefix + key + "/", out);
    } else if (archive.try_read(key, value)) {
      out[prefix + key] = value;
    }
  }
}

// LibTorch keys a parameter's state by its TensorImpl address: replaced by its place
// ("group.index") so that the checkpoints of two optimizers over different tensors compare.
Checkpoint checkpoint(const Optimizer& optimizer) {
  torch::serialize::InputArchive archive;
  std::istringstream in(save_to_string(optimizer));
  archive.load_from(in);
  Checkpoint raw;
  flatten(archive, "", raw);
  std::map<std::string, std::string> place;  // address -> "group.index"
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g)
    for (size_t i = 0; i < optimizer.param_groups()[g].params().size(); ++i)
      place[std::to_string(reinterpret_cast<intptr_t>(optimizer.param_groups()[g].params()[i].unsafeGetTensorImpl()))] =
          std::to_string(g) + "." + std::to_string(i);
  Checkpoint out;
  for (const auto& [key, value] : raw) {
    std::string renamed, segment;
    std::istringstream parts(key);
    while (std::getline(parts, segment, '/')) {
      const auto found = place.find(segment);
      renamed += (renamed.empty() ? "" : "/") + (found == place.end() ? segment : found->second);
    }
    const auto as_place = value.isInt()      ? place.find(std::to_string(value.toInt()))
                          : value.isString() ? place.find(value.toStringRef())
                                             : place.end();
    out[renamed] = as_place == place.end() ? value : c10::IValue(as_place->second);
  }
  EXPECT_EQ(out.size(), raw.size());
  return out;
}

// Entries, their kinds, and values: tensors bit for bit (dtype, shape, every element).
void expect_same(const Checkpoint& a, const Checkpoint& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [key, value] : a) {
    const auto found = b.find(key);
    ASSERT_NE(found, b.end()) << what << ": " << key;
    const c10::IValue& other = found->second;
    if (value.isTensor() && other.isTensor()) {
      const at::Tensor &x = value.toTensor(), &y = other.toTensor();
      EXPECT_TRUE(x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() && at::equal(x, y))
          << what << ": state entry " << key;
    } else {
      EXPECT_TRUE(value == other) << what << ": state entry " << key << " is " << value << ", not " << other;
    }
  }
}

// ---------------------------------------------------------------- the rule's unit

TEST(GradientHealth, SquaredNormsAreFp64ForEveryDtype) {
  // 21 x^2 for x up to 1e38: far beyond fp32, finite in fp64; EXPECT_DOUBLE_EQ allows 4 ulps,
  // more than the roundings of the fp64 sum, the square root and the square.
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const double x = dtype == at::kHalf ? 60000.0 : 1e38;
    const at::Tensor t = at::full({7, 3}, x, at::TensorOptions().dtype(dtype));
    const double stored = t[0][0].item<double>();  // x as the dtype holds it
    const at::Tensor norms = health::squared_norms({t, at::zeros({2}, dtype)});
    ASSERT_EQ(norms.scalar_type(), at::kDouble);
    ASSERT_EQ(norms.numel(), 2);
    EXPECT_DOUBLE_EQ(norms[0].item<double>(), 21 * stored * stored) << dtype;
    EXPECT_EQ(norms[1].item<double>(), 0.0) << dtype;
  }
  at::Tensor nan = at::ones({4});
  nan[2] = std::numeric_limits<float>::quiet_NaN();
  at::Tensor inf = at::ones({4});
  inf[0] = -std::numeric_limits<float>::infinity();
  const at::Tensor norms = health::squared_norms({nan, inf});
  EXPECT_TRUE(std::isnan(norms[0].item<double>()));
  EXPECT_TRUE(std::isinf(norms[1].item<double>()));
  EXPECT_EQ(health::squared_norms({}).numel(), 0);
}

TEST(GradientHealth, TheBoundIsTwoToThe104AndNonFiniteAlwaysOffends) {
  const double bound = health::kMaxGradientSquaredNorm;
  EXPECT_EQ(bound, std::ldexp(1.0, 104));
  const double above = std::nextafter(bound, INFINITY);
  const at::Tensor norms = at::tensor({1.0, bound, above, 0.0}, at::kDouble);
  const health::Offence o = health::first_offence(norms);
  EXPECT_EQ(o.index, 2);  // exactly 2^104 passes, the next double does not
  EXPECT_EQ(o.squared_norm, above);
  EXPECT_FALSE(o.nonfinite());
  EXPECT_FALSE(health::first_offence(at::tensor({1.0, bound}, at::kDouble)).found());
  // With an infinite limit (trials) only NaN and Inf offend.
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(health::first_offence(at::tensor({1e300, inf}, at::kDouble), inf).index, 1);
  EXPECT_EQ(health::first_offence(at::tensor({1e300, NAN}, at::kDouble), inf).index, 1);
  EXPECT_TRUE(health::first_offence(at::tensor({NAN}, at::kDouble)).nonfinite());
}

TEST(GradientHealth, MessagesNameTheParameterTheNumberAndTheConsequence) {
  const auto& c = health::consequence("shampoo");
  EXPECT_EQ(health::offence_message("parameter 2 of group 0", c, 1.2e50),
            "parameter 2 of group 0: its gradient's squared norm 1.2e+50 exceeds 2^104 (2.03e+31): the G G^T "
            "statistics would overflow fp32");
  EXPECT_EQ(health::offence_message("parameter 2 of group 0", c, NAN), "parameter 2 of group 0 has a NaN or Inf gradient");
  EXPECT_EQ(health::overflow_problem("exp_avg_sq", at::kHalf),
            "this step would make its exp_avg_sq non-finite (Half, largest finite value 65504)");
  expect_error([] { health::consequence("lion"); }, "unknown key \"lion\"");
}

TEST(GradientHealth, TrialsWriteNothingAndReportTheFirstNonFiniteCopy) {
  const at::Tensor a = at::full({3}, 60000.0, at::kHalf), b = at::ones({2});
  const at::Tensor a0 = a.clone(), b0 = b.clone();
  const health::Trial t = health::trial_update({a, at::Tensor(), b}, [](std::vector<at::Tensor>& c) {
    c[0].mul_(2);  // 120000: beyond fp16
    c[1] = at::ones({1});
    c[2].mul_(2);
  });
  EXPECT_EQ(t.index, 0);
  EXPECT_EQ(t.dtype, at::kHalf);
  EXPECT_TRUE(at::equal(a, a0));
  EXPECT_TRUE(at::equal(b, b0));
  EXPECT_FALSE(health::trial_update({b}, [](std::vector<at::Tensor>& c) { c[0].mul_(2); }).failed());
}

// ---------------------------------------------------------------- the gradient rule

// 3 normal steps, the bad ones, 3 normal steps, against a twin that takes only the normal
// steps. `bad(stepper)` makes the bad step's gradients / curvature.
void run_against_twin(const Variant& v, at::ScalarType dtype, bool skip, int bad_steps,
                      const std::function<void(Stepper&)>& bad, const std::vector<std::string>& fragments,
                      const std::vector<std::vector<int64_t>>& shapes = {{17}, {96, 80}}) {
  const std::string what = v.name + " " + c10::toString(dtype) + (skip ? " skip" : "");
  Stepper main{make_params(shapes, dtype, 7), v.hutchinson}, twin{copies(main.params), v.hutchinson};
  auto opt = v.make({main.params}, {skip}, 0);
  auto other = v.make({twin.params}, {skip}, 0);
  const auto normal = [&](Stepper& s, Optimizer& o, uint64_t k) {
    s.grads.clear();
    s.curvature.assign(s.params.size(), 1.0);
    for (const auto& p : s.params) s.grads.push_back(normal_grad(p, k));
    s.step(o);
  };
  for (uint64_t k = 0; k < 3; ++k) {
    normal(main, *opt, k);
    normal(twin, *other, k);
  }
  const Params before = copies(main.params);
  const Checkpoint state = checkpoint(*opt);
  for (int b = 0; b < bad_steps; ++b) {
    main.curvature.assign(main.params.size(), 1.0);
    for (size_t i = 0; i < main.params.size(); ++i) main.grads[i] = normal_grad(main.params[i], 50 + b);
    bad(main);
    if (skip) {
      main.step(*opt);
    } else {
      for (const std::string& f : fragments) expect_error([&] { main.step(*opt); }, f);
    }
    expect_same(main.params, before, what + " after bad step " + std::to_string(b));
    expect_same(checkpoint(*opt), state, what + " after bad step " + std::to_string(b));
  }
  EXPECT_EQ(v.skipped(*opt), skip ? bad_steps : 0) << what;
  for (uint64_t k = 3; k < 6; ++k) {
    normal(main, *opt, k);
    normal(twin, *other, k);
  }
  expect_same(main.params, twin.params, what + " against the twin");
  for (const auto& p : main.params) EXPECT_TRUE(p.isfinite().all().item<bool>()) << what;
  expect_same(checkpoint(*opt), checkpoint(*other), what + " against the twin");
}

TEST(Overflow, HugeGradientsAreRefusedNamingTheParameterAndChangeNothing) {
  // 18 variants x 4 scales x {fp32, bf16}: 144 runs.
  for (const Variant& v : variants())
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16})
      for (double scale : {1e20, 1e25, 1e30, 1e38})
        run_against_twin(v, dtype, false, 1, [&](Stepper& s) { s.grads[1] = s.grads[1] * scale; },
                         {"parameter 1 of group 0: its gradient's squared norm", "exceeds 2^104 (2.03e+31): " +
                          v.consequence + "; nothing was updated (set skip_nonfinite to skip such steps)"});
}

TEST(Overflow, SkipNonfiniteSkipsAndCountsEveryBadStep) {
  // 3 bad steps at 1e25 (the issue's scale), then at 1e38: 18 variants x 2 scales x 2 dtypes.
  for (const Variant& v : variants())
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16})
      for (double scale : {1e25, 1e38})
        run_against_twin(v, dtype, true, 3, [&](Stepper& s) { s.grads[1] = s.grads[1] * scale; }, {});
}

TEST(Overflow, NanAndInfGradientsKeepTheirMessage) {
  for (const Variant& v : variants())
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
      run_against_twin(v, at::kFloat, false, 1, [&](Stepper& s) { s.grads[0][3] = bad; },
                       {"parameter 0 of group 0 has a NaN or Inf gradient; nothing was updated"});
}

TEST(Overflow, TheIssueScenarioRaisesAndTheShampooRunRecovers) {
  // The tracker's report: a 96 x 80 parameter, T1 = T2 = 1, 3 steps, then 3 steps at 1e25,
  // then 3 normal steps. Each bad step raises; the parameter stays finite and equals the
  // twin's.
  for (int64_t bits : {32, 4}) {
    const Variant v{"issue-17-" + std::to_string(bits),
                    maker<Shampoo>(ShampooOptions(1e-3).bits(bits).stat_interval(1).root_interval(1)),
                    skipped_of<Shampoo>, "the G G^T statistics would overflow fp32"};
    run_against_twin(v, at::kFloat, false, 3, [](Stepper& s) { s.grads[0] = s.grads[0] * 1e25; },
                     {"parameter 0 of group 0: its gradient's squared norm"}, {{96, 80}});
  }
}

TEST(Overflow, TheGraftOfAnUnpreconditionedParameterIsNamed) {
  const Variant adamw{"shampoo-vector", maker<Shampoo>(shampoo(4)), skipped_of<Shampoo>, ""};
  run_against_twin(adamw, at::kFloat, false, 1, [](Stepper& s) { s.grads[0] = s.grads[0] * 1e30; },
                   {"parameter 0 of group 0", "the grafted AdamW second moment g*g would overflow fp32"});
  const Variant sgdm{"shampoo-vector-sgdm", maker<Shampoo>(shampoo(4).graft("sgdm")), skipped_of<Shampoo>, ""};
  run_against_twin(sgdm, at::kFloat, false, 1, [](Stepper& s) { s.grads[0] = s.grads[0] * 1e30; },
                   {"parameter 0 of group 0", "the grafted SGD momentum is no longer guaranteed finite"});
}

TEST(Overflow, SkipNonfiniteIsTheOffendingParametersGroupsOption) {
  // Two groups, skip_nonfinite only in group 1, and a lr of group 0's own (LibTorch gives the
  // groups of optimizer types it does not know the defaults; lowbit puts theirs back). A bad
  // gradient in group 0 raises; in group 1 the step is skipped.
  for (const Variant& v : variants()) {
    Stepper s{{make_params({{17}}, at::kFloat, 5)[0], make_params({{96, 80}}, at::kFloat, 6)[0]}, v.hutchinson};
    auto opt = v.make({{s.params[0]}, {s.params[1]}}, {false, true}, 0.125);
    EXPECT_EQ(opt->param_groups()[0].options().get_lr(), 0.125) << v.name;
    EXPECT_NE(opt->param_groups()[1].options().get_lr(), 0.125) << v.name;
    s.curvature.assign(2, 1.0);
    s.grads = {normal_grad(s.params[0], 0), normal_grad(s.params[1], 0)};
    s.step(*opt);
    s.grads = {normal_grad(s.params[0], 1) * 1e25, normal_grad(s.params[1], 1)};
    expect_error([&] { s.step(*opt); }, "parameter 0 of group 0: its gradient's squared norm");
    EXPECT_EQ(v.skipped(*opt), 0) << v.name;
    s.grads = {normal_grad(s.params[0], 1), normal_grad(s.params[1], 1) * 1e25};
    s.step(*opt);
    EXPECT_EQ(v.skipped(*opt), 1) << v.name;
  }
}

// ---------------------------------------------------------------- Hessian estimates

TEST(Overflow, HutchinsonEstimatesBeyondTheRuleAreRefused) {
  // Curvature c on the matrix: every estimate u * (c u) = c, squared norm 7680 c^2, beyond
  // 2^104 for c = 1e30 (7.68e63) while the gradients are the normal ones.
  for (const Variant& v : variants()) {
    if (!v.hutchinson) continue;
    const std::string noun = v.name == "adahessian" ? "Hutchinson Hessian estimate D's squared norm 7.68e+63"
                                                    : "Hutchinson Hessian estimate u*(Hu)'s squared norm 7.68e+63";
    const std::string tail = v.name == "adahessian" ? "v, the EMA of D*D, would overflow fp32"
                                                    : "the Hessian EMA h is no longer guaranteed finite";
    for (bool skip : {false, true})
      run_against_twin(v, at::kFloat, skip, 2, [](Stepper& s) { s.curvature[1] = 1e30; },
                       {"parameter 1 of group 0: its " + noun + " exceeds 2^104 (2.03e+31): " + tail});
  }
}

TEST(Overflow, SophiaGaussNewtonBartlettEstimatesBeyondTheRuleAreRefused) {
  // update_hessian(B) folds B g g into h. g = 4e15 in one entry passes the gradient rule
  // (1.6e31 <= 2^104) but B g g = 1.6e33 at B = 100 has squared norm 2.56e66.
  for (bool skip : {false, true}) {
    Params params = make_params({{17}, {96, 80}}, at::kFloat, 3), twin = copies(params);
    const auto o = SophiaOptions(1e-3).weight_decay(0).skip_nonfinite(skip);
    Sophia opt(params, o), other(twin, o);
    const auto hessian = [](Sophia& s, Params& ps, uint64_t k, double big) {
      for (auto& p : ps) p.mutable_grad() = normal_grad(p, k);
      if (big != 0) ps[1].mutable_grad()[5][7] = big;
      s.update_hessian(100);
    };
    hessian(opt, params, 0, 0);
    hessian(other, twin, 0, 0);
    const Checkpoint state = checkpoint(opt);
    if (skip) {
      hessian(opt, params, 1, 4e15);
      EXPECT_EQ(opt.skipped_steps(), 1);
    } else {
      expect_error([&] { hessian(opt, params, 1, 4e15); },
                   "parameter 1 of group 0: its Gauss-Newton-Bartlett estimate B*g*g's squared norm 2.56e+66 exceeds "
                   "2^104 (2.03e+31): the Hessian EMA h is no longer guaranteed finite");
      // The gradient itself beyond the rule: named as update_hessian's gradient.
      expect_error([&] { hessian(opt, params, 1, 1e20); },
                   "its gradient's squared norm 1e+40 exceeds 2^104 (2.03e+31): the Gauss-Newton-Bartlett estimate "
                   "B*g*g would overflow fp32");
    }
    expect_same(checkpoint(opt), state, "Sophia GNB");
    hessian(opt, params, 2, 0);
    hessian(other, twin, 2, 0);
    expect_same(checkpoint(opt), checkpoint(other), "Sophia GNB against the twin");
  }
}

// ---------------------------------------------------------------- state the gradient does not bound

TEST(Overflow, NagGsVelocityBeyondItsBoundIsTriedAndRefused) {
  // mu = 0 and gamma = 1e-30: the gradient's weight alpha / (alpha mu + gamma) is 1e29, so a
  // gradient of 1e10 (squared norm 7.68e23 for the matrix: within the rule) would put
  // 1e39 into the velocity, beyond fp32. Normal gradients (<= 1) give at most 1e29.
  const Variant v{"nag-gs-mu0", maker<NagGS>(NagGSOptions(0.1).mu(0).gamma(1e-30)), skipped_of<NagGS>, ""};
  for (bool skip : {false, true})
    run_against_twin(v, at::kFloat, skip, 2, [](Stepper& s) { s.grads[1] = s.grads[1] * 1e10; },
                     {"parameter 1 of group 0: this step would make its values non-finite (Float, largest finite value "
                      "3.40282e+38)"});
}

TEST(Overflow, ShampooWithOptionsThatBoundNothingTriesTheStepFirst) {
  // SGD without momentum at lr 1e36 bounds nothing (shampoo_update_bounded): every step is
  // tried first. A normal step moves entries by lr |d|, |d| at most ||G||_F ~ 68 and about
  // 0.8 on average (grafting keeps ||d||_F = ||G||_F ~ sqrt(7680 * 0.6)): finite over six
  // steps. A gradient 1000 times larger (squared norm ~ 5e9, within the rule) moves every entry
  // with |d| > 0.34 by more than 3.4e38: values beyond fp32.
  const Variant v{"shampoo-sgdm-lr1e36", maker<Shampoo>(shampoo(32).graft("sgdm").momentum(0).lr(1e36)),
                  skipped_of<Shampoo>, ""};
  for (bool skip : {false, true})
    run_against_twin(v, at::kFloat, skip, 1, [](Stepper& s) { s.grads[1] = s.grads[1] * 1000; },
                     {"parameter 1 of group 0: this step would make its values non-finite (Float"});
}

// ---------------------------------------------------------------- fp16 parameters

TEST(Overflow, Fp16StepsThatWouldOverflowAreRefused) {
  // Group 0 holds an fp16 vector at 65000 (largest finite fp16: 65504; values from 65520 on
  // round to Inf) with zero gradients, so normal steps leave it where it is (zero moments,
  // zero momentum, an all-zero M-FAC window, v = x for NAG-GS). The bad step gives it a
  // negative gradient (-1; NAG-GS -5000) that moves it up by about 5000 (fp16_lr; see
  // variants()), past 65520. Group 1 is an fp16 matrix with normal gradients and lr.
  for (const Variant& v : variants())
    for (bool skip : {false, true}) {
      const std::string what = v.name + (skip ? " skip" : "");
      Params high = {at::full({17}, 65000.0, at::kHalf).requires_grad_(true)};
      Params matrix = make_params({{96, 80}}, at::kHalf, 9);
      Stepper main{{high[0], matrix[0]}, v.hutchinson};
      Stepper twin{copies(main.params), v.hutchinson};
      auto opt = v.make({{main.params[0]}, {main.params[1]}}, {skip, skip}, v.fp16_lr);
      auto other = v.make({{twin.params[0]}, {twin.params[1]}}, {skip, skip}, v.fp16_lr);
      const auto normal = [&](Stepper& s, Optimizer& o, uint64_t k) {
        s.curvature.assign(2, 1.0);
        s.grads = {at::zeros({17}, at::kHalf), normal_grad(s.params[1], k)};
        s.step(o);
      };
      for (uint64_t k = 0; k < 3; ++k) {
        normal(main, *opt, k);
        normal(twin, *other, k);
      }
      const Params before = copies(main.params);
      const Checkpoint state = checkpoint(*opt);
      main.grads[0] = at::full({17}, v.fp16_bad, at::kHalf);
      if (skip) {
        main.step(*opt);
        EXPECT_EQ(v.skipped(*opt), 1) << what;
      } else {
        expect_error([&] { main.step(*opt); },
                     "parameter 0 of group 0: this step would make its values non-finite (Half, largest finite value "
                     "65504); nothing was updated");
      }
      expect_same(main.params, before, what);
      expect_same(checkpoint(*opt), state, what);
      for (uint64_t k = 3; k < 6; ++k) {
        normal(main, *opt, k);
        normal(twin, *other, k);
      }
      expect_same(main.params, twin.params, what + " against the twin");
      expect_same(checkpoint(*opt), checkpoint(*other), what + " against the twin");
      EXPECT_LE(main.params[0].abs().max().item<double>(), kFp16Max) << what;
    }
}

TEST(Overflow, Fp16MomentsThatWouldOverflowAreRefused) {
  // An fp16 parameter keeps fp32-layout moments in its own dtype: v = (1 - b2) g^2 = 1e-3 *
  // 60000^2 = 3.6e6 > 65504 for a gradient of 60000 (itself finite in fp16 and within the
  // rule: 17 * 3.6e9 = 6.1e10). Normal gradients leave v <= 1e-3.
  for (int64_t bits : {32, 8, 4}) {
    const Variant v{"adamw-fp16-" + std::to_string(bits),
                    maker<AdamW>(AdamWOptions(1e-3).bits(bits).eps(1e-3).weight_decay(0).min_quant_numel(256)),
                    skipped_of<AdamW>, ""};
    run_against_twin(v, at::kHalf, false, 1, [](Stepper& s) { s.grads[0].fill_(60000); },
                     {"parameter 0 of group 0: this step would make its exp_avg_sq non-finite (Half, largest finite "
                      "value 65504)"});
  }
  const Variant graft{"shampoo-graft-fp16", maker<Shampoo>(shampoo(4)), skipped_of<Shampoo>, ""};
  run_against_twin(graft, at::kHalf, true, 2, [](Stepper& s) { s.grads[0].fill_(60000); }, {});
}

// ---------------------------------------------------------------- distributed Shampoo

TEST(Overflow, DistributedShampooAppliesTheSameRule) {
  const auto options = shampoo(4);
  Params a = make_params({{17}, {96, 80}}, at::kFloat, 11), b = copies(a);
  Shampoo plain(a, options), distributed(b, options);
  distributed.distribute(make_gloo_process_group("127.0.0.1", 40000 + (getpid() % 20000), 0, 1,
                                                 std::chrono::seconds(30)));
  const auto step = [](Shampoo& o, Params& ps, uint64_t k, double scale) {
    for (auto& p : ps) p.mutable_grad() = normal_grad(p, k);
    ps[1].mutable_grad().mul_(scale);
    o.step();
  };
  for (uint64_t k = 0; k < 2; ++k) {
    step(plain, a, k, 1);
    step(distributed, b, k, 1);
  }
  const Params before = copies(b);
  const Checkpoint state = checkpoint(distributed);
  expect_error([&] { step(distributed, b, 9, 1e25); },
               "parameter 1 of group 0: its gradient's squared norm");
  expect_same(b, before, "distributed");
  expect_same(checkpoint(distributed), state, "distributed");
  step(plain, a, 2, 1);
  step(distributed, b, 2, 1);
  expect_same(a, b, "distributed against plain");
}

}  // namespace
}  // namespace lowbit
