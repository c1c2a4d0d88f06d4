// Low-bit training arithmetic (lowbit/arith.h): LUQ's grid and unbiasedness, the packed
// forward grid, the LUQ-4 and RMM layers' gradients against the fp32 functions, RMM's
// variance against its formula, and the bytes kept for backward against their formulas.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>

#include <lowbit/arith.h>

#include <cmath>
#include <iostream>
#include <limits>

#include "expect_error.h"
#include "models/models.h"

namespace lowbit {
namespace {

at::Generator generator(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

// Values across many magnitudes, some under LUQ's smallest level, signs mixed.
at::Tensor spread_values(int64_t n, uint64_t seed) {
  at::Generator g = generator(seed);
  const at::Tensor magnitude = at::pow(10.0, at::rand({n}, g, at::kDouble) * 5 - 4);  // 1e-4 .. 10
  const at::Tensor sign = at::where(at::rand({n}, g, at::kDouble) < 0.5, -1.0, 1.0);
  return (magnitude * sign).to(at::kFloat);
}

TEST(Luq, ValuesLieOnTheRadixTwoGrid) {
  const at::Tensor x = spread_values(5000, 1);
  const at::Tensor q = arith::luq_quantize(x, 4, generator(2)).to(at::kDouble);
  const double alpha = x.abs().max().item<double>() / 64.0;  // 4 bits: levels alpha 2^0 .. alpha 2^6
  const at::Tensor a = q.abs();
  const at::Tensor exponent = at::log2(a / alpha);
  // alpha = absmax / 64 is exact in float and double, and so are the levels alpha 2^k, so
  // log2(a / alpha) is an integer up to log2's < 1 ulp of a value <= 6: 8 * 2^-52.
  const at::Tensor on_grid = (a == 0) | ((exponent - exponent.round()).abs() < 8 * 0x1p-52 & exponent.round() >= 0 &
                                         exponent.round() <= 6);
  EXPECT_TRUE(on_grid.all().item<bool>());
  EXPECT_TRUE((q * x.to(at::kDouble) >= 0).all().item<bool>());  // signs kept (or zero)
  EXPECT_LE(std::get<0>(at::_unique(a)).numel(), 8);  // zero and 7 levels
}

// E[luq(x)] = x: the mean over N draws of each element is within 5 standard errors of it,
// with the exact per-element variance of a two-point rounding p (1 - p)(hi - lo)^2
// (P(|Z| > 5) = 5.7e-7 per element, 2.3e-4 over the 400). The levels are exact, so an
// element on a level (p = 0) must come back exactly (its standard error is 0; the 1e-12
// only avoids 0 / 0).
TEST(Luq, IsUnbiased) {
  const int draws = 3000;
  const at::Tensor x = spread_values(400, 3).to(at::kDouble);
  at::Generator g = generator(4);
  at::Tensor sum = at::zeros_like(x);
  for (int i = 0; i < draws; ++i) sum += arith::luq_quantize(x.to(at::kFloat), 4, g).to(at::kDouble);
  const at::Tensor mean = sum / draws;
  const double alpha = x.abs().max().item<double>() / 64.0;
  const at::Tensor a = x.abs().to(at::kFloat).to(at::kDouble);
  const at::Tensor lo = at::where(a < alpha, at::zeros_like(a),
                                  alpha * at::pow(2.0, at::floor(at::log2(a.clamp_min(alpha) / alpha))));
  const at::Tensor hi = at::where(a < alpha, at::full_like(a, alpha), (lo * 2).clamp_max(alpha * 64));
  const at::Tensor p = ((a - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1);
  const at::Tensor stderr_ = (p * (1 - p)).sqrt() * (hi - lo) / std::sqrt(static_cast<double>(draws));
  const at::Tensor z = (mean - x.to(at::kFloat).to(at::kDouble)).abs() / (stderr_ + 1e-12);
  std::cout << "[luq] largest |mean - x| in standard errors: " << z.max().item<double>() << "\n";
  EXPECT_LT(z.max().item<double>(), 5.0);
  // A biased rounding (always to the nearest level) would fail: its mean sits off by ~25%
  // of the gap on average.
}

TEST(UniformCodes, PackTwoCodesAByteAndRoundToTheNearestLevel) {
  const at::Tensor signed_values = spread_values(1001, 5);
  const arith::UniformCodes c = arith::uniform_quantize(signed_values);
  EXPECT_EQ(c.packed.numel(), 501);
  EXPECT_EQ(c.bytes(), 501 + 8);
  EXPECT_EQ(c.offset, 7);
  const at::Tensor back = arith::uniform_dequantize(c, signed_values.sizes());
  // Nearest level: half a step, plus fp32 rounding of x / scale and of code * scale, each
  // <= 2^-24 of |x| <= 7.5 scale: scale / 2 (1 + 30 * 2^-24).
  EXPECT_LE((back - signed_values).abs().max().item<double>(), c.scale / 2 * (1 + 30 * 0x1p-24));
  // back = fl(code * scale): back / scale is the integer code within 2^-24 |code| <= 7 * 2^-24.
  const at::Tensor codes = (back / c.scale).round();
  EXPECT_TRUE(((back / c.scale - codes).abs() <= 7 * 0x1p-24).all().item<bool>());
  EXPECT_LE(codes.abs().max().item<double>(), 7);
  // Non-negative tensors (after ReLU) use all 16 levels.
  const arith::UniformCodes u = arith::uniform_quantize(signed_values.abs());
  EXPECT_EQ(u.offset, 0);
  // absmax / 15 in fp32: one rounding.
  EXPECT_NEAR(u.scale, signed_values.abs().max().item<double>() / 15, 0x1p-24 * signed_values.abs().max().item<double>() / 15);
}

// The clipped grid: its squared error is within 2% of the best scale of a fine search (in
// fp64, over the whole tensor) and well under the absmax grid's when an outlier stretches it.
// Stated claims about the clipping rule (deterministic: no MKL path involved): measured
// 1.00002x and 1.0003x the search's best, 0.08x and 0.23x the absmax grid's error.
TEST(UniformCodes, MseClippingIsNearOptimal) {
  at::Generator g = generator(20);
  at::Tensor gaussian = at::randn({20000}, g);
  gaussian[0] = 40;  // one outlier
  for (const at::Tensor& x : {gaussian, at::relu(gaussian)}) {
    const at::Tensor xd = x.to(at::kDouble);
    const bool non_negative = x.min().item<double>() >= 0;
    const double levels = non_negative ? 15 : 7, low = non_negative ? 0 : -7;
    const auto error_at = [&](double scale) {
      return ((xd / scale).round().clamp(low, levels) * scale - xd).pow(2).sum().item<double>();
    };
    double best = std::numeric_limits<double>::infinity();
    for (double r = 0.005; r <= 1.0; r += 0.0025) best = std::min(best, error_at(40 * r / levels));
    const arith::UniformCodes c = arith::uniform_quantize(x, 4, true);
    const double clipped = (arith::uniform_dequantize(c, x.sizes()).to(at::kDouble) - xd).pow(2).sum().item<double>();
    std::cout << "[clip] " << (non_negative ? "relu" : "signed") << ": squared error " << clipped << ", best " << best
              << ", absmax " << error_at(40 / levels) << "\n";
    EXPECT_LE(clipped, 1.02 * best);
    EXPECT_LT(clipped, 0.5 * error_at(40 / levels));
    EXPECT_LT(c.scale, 40 / levels);
  }
}

struct Grads {
  at::Tensor dx, dw, db;
};

// Gradients of sum(y * gy) through f, for x, w, b.
template <typename F>
Grads gradients(F f, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& gy) {
  const at::Tensor xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true),
                   br = b.clone().requires_grad_(true);
  const at::Tensor y = f(xr, wr, br);
  y.backward(gy);
  return {xr.grad(), wr.grad(), br.grad()};
}

at::Tensor quantized(const at::Tensor& t, bool clip = false) {
  return arith::uniform_dequantize(arith::uniform_quantize(t, 4, clip), t.sizes());
}

double relative(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / b.norm()).item<double>();
}

// LUQ-4 linear: the forward is exactly the fp32 linear of the 4-bit x and w; the backward is
// the fp32 backward of that forward with gy replaced by luq(gy), so its mean over draws
// converges to the fp32 gradients (of the quantized forward), and one draw is within LUQ's
// error of them.
TEST(LuqLayers, LinearMatchesTheFp32FunctionOfTheQuantizedForward) {
  at::Generator g = generator(6);
  const at::Tensor x = at::randn({32, 20}, g), w = at::randn({12, 20}, g), b = at::randn({12}, g);
  const at::Tensor gy = at::randn({32, 12}, g);
  arith::ArithOptions luq;
  luq.mode = arith::Mode::Luq4;
  luq.luq_clip = false;  // the absmax grid, written out in UniformCodes' test; the conv test clips
  at::Generator draws = generator(7);
  const auto luq_linear = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    return arith::linear(xi, wi, bi, luq, draws);
  };
  const auto reference = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    // Straight-through: the gradient of the rounding is taken as 1, for x and for w.
    return at::linear(quantized(xi.detach()) + (xi - xi.detach()), quantized(wi.detach()) + (wi - wi.detach()), bi);
  };
  {
    torch::NoGradGuard off;
    EXPECT_TRUE(at::equal(arith::linear(x, w, b, luq, draws), at::linear(quantized(x), quantized(w), b)));
  }
  const Grads exact = gradients(reference, x, w, b, gy);
  Grads sum{at::zeros_like(x), at::zeros_like(w), at::zeros_like(b)};
  const int n = 400;
  double single = 0, sq_dx = 0, sq_dw = 0;
  for (int i = 0; i < n; ++i) {
    const Grads one = gradients(luq_linear, x, w, b, gy);
    if (i == 0) single = relative(one.dw, exact.dw);
    sq_dx += std::pow(relative(one.dx, exact.dx), 2);
    sq_dw += std::pow(relative(one.dw, exact.dw), 2);
    sum.dx += one.dx;
    sum.dw += one.dw;
    EXPECT_TRUE(at::equal(one.db, exact.db));  // the bias gradient is exact: the same sum of gy
  }
  // Unbiased independent draws: E||mean - exact||^2 = E||one - exact||^2 / n, so the mean's
  // relative error is rms(one) / sqrt(n) (measured 0.0139 against 0.278 / 20). Its square
  // sums hundreds of independent element errors (chi-square-like, relative sd ~ sqrt(2 / 240)),
  // so 2x that (4x in the square) is never reached by chance; a bias of ~3% would be.
  const double predicted_dx = std::sqrt(sq_dx / n / n), predicted_dw = std::sqrt(sq_dw / n / n);
  std::cout << "[luq linear] one draw: dW relative error " << single << "; mean of " << n << ": dx "
            << relative(sum.dx / n, exact.dx) << " (predicted " << predicted_dx << "), dW "
            << relative(sum.dw / n, exact.dw) << " (predicted " << predicted_dw << ")\n";
  // LUQ's two-point rounding has sd <= half the gap, i.e. <= 1/2 of the value above alpha
  // (radix 2): one draw of luq(gy) is within 0.5 relative, and dW = luq(gy)^T x no worse.
  EXPECT_LT(single, 0.5);
  EXPECT_LT(relative(sum.dx / n, exact.dx), 2 * predicted_dx);
  EXPECT_LT(relative(sum.dw / n, exact.dw), 2 * predicted_dw);
}

TEST(LuqLayers, Conv2dMatchesTheFp32FunctionOfTheQuantizedForward) {
  at::Generator g = generator(8);
  const at::Tensor x = at::relu(at::randn({4, 3, 9, 9}, g)), w = at::randn({5, 3, 3, 3}, g), b = at::randn({5}, g);
  const at::Tensor gy = at::randn({4, 5, 5, 5}, g);
  arith::ArithOptions luq;
  luq.mode = arith::Mode::Luq4;
  at::Generator draws = generator(9);
  const auto luq_conv = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    return arith::conv2d(xi, wi, bi, {2, 2}, {1, 1}, luq, draws);
  };
  const auto reference = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    return at::conv2d(quantized(xi.detach(), true) + (xi - xi.detach()), quantized(wi.detach(), true) + (wi - wi.detach()),
                      bi, {2, 2}, {1, 1});
  };
  const Grads exact = gradients(reference, x, w, b, gy);
  Grads sum{at::zeros_like(x), at::zeros_like(w), at::zeros_like(b)};
  const int n = 300;
  double sq_dx = 0, sq_dw = 0;
  for (int i = 0; i < n; ++i) {
    const Grads one = gradients(luq_conv, x, w, b, gy);
    sq_dx += std::pow(relative(one.dx, exact.dx), 2);
    sq_dw += std::pow(relative(one.dw, exact.dw), 2);
    sum.dx += one.dx;
    sum.dw += one.dw;
  }
  // As for the linear layer: the mean of n unbiased draws is off by rms(one) / sqrt(n).
  const double predicted_dx = std::sqrt(sq_dx / n / n), predicted_dw = std::sqrt(sq_dw / n / n);
  std::cout << "[luq conv] mean of " << n << ": dx " << relative(sum.dx / n, exact.dx) << " (predicted "
            << predicted_dx << "), dW " << relative(sum.dw / n, exact.dw) << " (predicted " << predicted_dw << ")\n";
  EXPECT_LT(relative(sum.dx / n, exact.dx), 2 * predicted_dx);
  EXPECT_LT(relative(sum.dw / n, exact.dw), 2 * predicted_dw);
}

// RMM: dx is exact; dW = (S^T dY)^T (S^T X) with S_ij ~ N(0, 1/k) is unbiased, and element
// (i, j) has variance ((a.b)^2 + |a|^2 |b|^2) / k with a = dY[:, i], b = X[:, j].
TEST(RmmLayers, WeightGradientIsUnbiasedWithTheSketchVariance) {
  at::Generator g = generator(10);
  const int64_t batch = 64;
  const at::Tensor x = at::randn({batch, 6}, g, at::kFloat), w = at::randn({4, 6}, g), b = at::randn({4}, g);
  const at::Tensor gy = at::randn({batch, 4}, g);
  arith::ArithOptions rmm;
  rmm.mode = arith::Mode::Rmm;
  rmm.rmm_keep = 0.25;  // k = 16
  at::Generator draws = generator(11);
  const auto sketched = [&](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    return arith::linear(xi, wi, bi, rmm, draws);
  };
  const Grads exact = gradients([](const at::Tensor& xi, const at::Tensor& wi, const at::Tensor& bi) {
    return at::linear(xi, wi, bi);
  }, x, w, b, gy);
  const int n = 4000;
  at::Tensor sum = at::zeros({4, 6}, at::kDouble), sum_sq = at::zeros({4, 6}, at::kDouble);
  for (int i = 0; i < n; ++i) {
    const Grads one = gradients(sketched, x, w, b, gy);
    if (i == 0) {  // dx and db are not sketched: the same fp32 products as the plain linear
      EXPECT_TRUE(at::equal(one.dx, exact.dx));
      EXPECT_TRUE(at::equal(one.db, exact.db));
    }
    const at::Tensor dw = one.dw.to(at::kDouble);
    sum += dw;
    sum_sq += dw * dw;
  }
  const at::Tensor mean = sum / n, variance = sum_sq / n - mean * mean;
  const at::Tensor a = gy.to(at::kDouble), xb = x.to(at::kDouble);
  const at::Tensor dots = at::matmul(a.t(), xb);  // a_i . b_j
  const at::Tensor formula = (dots * dots + at::outer(a.pow(2).sum(0), xb.pow(2).sum(0))) / 16.0;
  const at::Tensor z = (mean - dots).abs() / (formula / n).sqrt();
  const double ratio_min = (variance / formula).min().item<double>(), ratio_max = (variance / formula).max().item<double>();
  std::cout << "[rmm] mean within " << z.max().item<double>() << " standard errors; empirical / formula variance in ["
            << ratio_min << ", " << ratio_max << "]\n";
  EXPECT_LT(z.max().item<double>(), 5.0);
  // The variance estimate of n draws has relative standard error ~sqrt(2 / n) = 0.022
  // (Gaussian-like entries; heavier tails here, up to ~2x that), so +-15% is >= 3.3 of those
  // widened standard errors for each of the 24 elements (measured 0.97 to 1.05). The means:
  // 5 standard errors (P = 5.7e-7 each, 1.4e-5 over the 24).
  EXPECT_GT(ratio_min, 0.85);
  EXPECT_LT(ratio_max, 1.15);
}

TEST(ArithLayers, KeptBytesMatchTheFormulas) {
  at::Generator g = generator(12);
  const at::Tensor x = at::randn({64, 301}, g).requires_grad_(true), w = at::randn({10, 301}, g).requires_grad_(true);
  for (const auto& [mode, expected] : {std::pair{arith::Mode::Fp32, int64_t{64 * 301 * 4}},
                                       std::pair{arith::Mode::Luq4, int64_t{(64 * 301 + 1) / 2 + 8}},
                                       std::pair{arith::Mode::Rmm, int64_t{16 * 301 * 4 + 8}}}) {
    arith::ArithOptions o;
    o.mode = mode;
    o.rmm_keep = 0.25;
    arith::reset_saved_bytes();
    const at::Tensor y = arith::linear(x, w, at::Tensor(), o, g);
    EXPECT_EQ(arith::saved_bytes().kept, expected) << arith::to_string(mode);
    EXPECT_EQ(arith::saved_bytes().fp32, 64 * 301 * 4);
    y.sum().backward();
    EXPECT_TRUE(w.grad().isfinite().all().item<bool>());
    w.mutable_grad() = at::Tensor();
    x.mutable_grad() = at::Tensor();
  }
  // Under no_grad nothing is kept.
  arith::reset_saved_bytes();
  {
    torch::NoGradGuard off;
    arith::ArithOptions luq;
    luq.mode = arith::Mode::Luq4;
    arith::linear(x, w, at::Tensor(), luq, g);
  }
  EXPECT_EQ(arith::saved_bytes().kept, 0);
}

TEST(ArithModels, CnnAndResNetTrainUnderEveryArithmeticAndVitRefuses) {
  for (const char* name : {"cnn", "resnet20"}) {
    for (const arith::Mode mode : {arith::Mode::Luq4, arith::Mode::Rmm}) {
      auto model = models::make_model(name, 1, 12, 10);
      arith::ArithOptions o;
      o.mode = mode;
      model->set_arithmetic(o);
      const at::Tensor loss = model->forward(at::randn({8, 1, 12, 12})).logsumexp(1).mean();
      loss.backward();
      for (const auto& p : model->parameters())
        ASSERT_TRUE(p.grad().defined() && p.grad().isfinite().all().item<bool>()) << name << " " << arith::to_string(mode);
    }
  }
  auto vit = models::make_model("vit", 1, 12, 10);
  arith::ArithOptions luq;
  luq.mode = arith::Mode::Luq4;
  testing::expect_error([&] { vit->set_arithmetic(luq); }, "vit trains in fp32");
  testing::expect_error([] { arith::parse_mode("fp8"); }, "arithmetic must be one of");
}

}  // namespace
}  // namespace lowbit
