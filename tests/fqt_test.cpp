// 1-bit FQT (lowbit/arith.h): the 1-bit forward grids (values, optimal scales, packing), Activation
// Gradient Pruning (which groups survive, their grid, unbiasedness within them), and the fqt1
// layers' gradients against a dense fp64 computation of what they should equal in expectation.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>

#include <lowbit/arith.h>

#include <cmath>
#include <iostream>

#include "expect_error.h"

namespace lowbit {
namespace {

at::Generator generator(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

TEST(Binarize, SignedRowsBecomePlusMinusTheirMeanMagnitude) {
  const at::Tensor x = at::randn({6, 37}, generator(1));
  const arith::BinaryCodes c = arith::binarize(x);
  EXPECT_FALSE(c.non_negative);
  EXPECT_EQ(c.packed.numel(), (6 * 37 + 7) / 8);
  EXPECT_EQ(c.bytes(), (6 * 37 + 7) / 8 + 6 * 4 + 1);
  const at::Tensor back = arith::debinarize(c, x.sizes());
  // s is a mean of 37 fp32 magnitudes, which another summation order moves by <= 2 gamma_37
  // relative (gamma_n = n u, u = 2^-24; all terms positive): 74 u, plus the division.
  const at::Tensor s = x.abs().mean(1, true);
  EXPECT_TRUE(at::allclose(back, at::where(x >= 0, s, -s), 75 * 0x1p-24, 0));
}

// Non-negative rows (ReLU outputs): {0, s} with threshold s / 2. Lloyd's iteration should land
// within 1% of the best L2 error over a fine search of s (threshold s / 2, per row).
TEST(Binarize, NonNegativeRowsGetANearOptimalTwoLevelGrid) {
  at::Generator g = generator(2);
  const at::Tensor x = at::relu(at::randn({5, 300}, g)) * at::rand({5, 1}, g) * 3;
  const arith::BinaryCodes c = arith::binarize(x);
  ASSERT_TRUE(c.non_negative);
  const at::Tensor back = arith::debinarize(c, x.sizes()).to(at::kDouble);
  const at::Tensor xd = x.to(at::kDouble);
  for (int64_t r = 0; r < 5; ++r) {
    const at::Tensor row = xd[r], q = back[r];
    const double s = c.scales[r].item<double>();
    EXPECT_TRUE(((q == 0) | (q == s)).all().item<bool>());  // the two levels, stored exactly
    const double error = (row - q).pow(2).sum().item<double>();
    double best = row.pow(2).sum().item<double>();
    for (double t = 0.002; t <= 1.0; t += 0.002) {
      const double level = t * row.max().item<double>();
      const at::Tensor candidate = at::where(row > level / 2, at::full_like(row, level), at::zeros_like(row));
      best = std::min(best, (row - candidate).pow(2).sum().item<double>());
    }
    // A stated claim about Lloyd's iteration (deterministic, no MKL path involved): within
    // 1% of the search's best (the search's own grid is 0.2% of the row max).
    EXPECT_LE(error, best * 1.01) << "row " << r;
  }
}

TEST(Binarize, WeightsBecomeTheirMeanMagnitudeSignedPerOutputChannel) {
  const at::Tensor w = at::randn({4, 3, 3, 3}, generator(3));
  const at::Tensor q = arith::binarize_weight(w);
  // A mean of 27 magnitudes in fp32, in any summation order: <= 2 gamma_27 + u relative.
  const at::Tensor alpha = w.abs().flatten(1).mean(1).view({4, 1, 1, 1});
  EXPECT_TRUE(at::allclose(q, at::where(w >= 0, alpha, -alpha), 55 * 0x1p-24, 0));
}

// Rows of very different ranges, so the pruning has a clear choice.
at::Tensor heterogeneous_gradient(uint64_t seed) {
  at::Generator g = generator(seed);
  return at::randn({12, 40}, g) * at::pow(10.0, at::rand({12, 1}, g) * 3 - 2);
}

TEST(Agp, KeepsTheWidestGroupsOnTheirOwnGridAndZerosTheRest) {
  const at::Tensor gy = heterogeneous_gradient(4);
  const at::Tensor range = std::get<0>(gy.max(1)) - std::get<0>(gy.min(1));
  const at::Tensor widest = std::get<1>(at::topk(range, 3));  // ceil(12 / 4)
  const at::Tensor q = arith::agp_quantize(gy, 0, 4, generator(5));
  for (int64_t r = 0; r < 12; ++r) {
    const bool kept = (widest == r).any().item<bool>();
    if (!kept) {
      EXPECT_TRUE((q[r] == 0).all().item<bool>()) << "row " << r;
      continue;
    }
    const double low = gy[r].min().item<double>(), step = range[r].item<double>() / 15;
    const at::Tensor steps = (q[r].to(at::kDouble) - low) / step;
    // q = low + k step in fp32: the step (range / 15) and the sum round, <= u (|low| + 15 step)
    // with |low| <= range = 15 step here (rows of one sign or both), plus the range's own
    // rounding (u 15 step): <= 45 u in units of step; 64 u = 3.8e-6.
    const double slack = 64 * 0x1p-24;
    EXPECT_TRUE(((steps - steps.round()).abs() < slack).all().item<bool>()) << "row " << r;
    EXPECT_GE(steps.min().item<double>(), -slack);
    EXPECT_LE(steps.max().item<double>(), 15 + slack);
    EXPECT_LE((q[r] - gy[r]).abs().max().item<double>(), step * (1 + slack));  // one step at most
  }
  // Groups along dim 1 (channels): the 40 columns, 10 kept.
  const at::Tensor by_column = arith::agp_quantize(gy, 1, 4, generator(6));
  EXPECT_EQ((by_column.abs().sum(0) > 0).sum().item<int64_t>(), 10);
}

// Within the kept groups E[q] = g: the mean of N draws is within 5 standard errors (the exact
// per-element variance of a two-point rounding, p (1 - p) step^2; P(|Z| > 5) = 5.7e-7 per
// element, 2.7e-4 over the 480). At 1 bit every group is kept and every value is its
// group's min or max. The floor, 64 u step, is the fp32 levels' own rounding (see above): a
// systematic offset that matters only where a draw hardly varies.
TEST(Agp, IsUnbiasedWithinTheKeptGroups) {
  const at::Tensor gy = heterogeneous_gradient(7).to(at::kDouble);
  for (const int bits : {1, 4}) {
    const int draws = 2000;
    at::Generator g = generator(8);
    at::Tensor sum = at::zeros_like(gy);
    for (int i = 0; i < draws; ++i) sum += arith::agp_quantize(gy.to(at::kFloat), 0, bits, g).to(at::kDouble);
    const at::Tensor mean = sum / draws;
    const at::Tensor kept = (mean.abs().sum(1, true) > 0).to(at::kDouble);
    EXPECT_EQ(kept.sum().item<int64_t>(), (12 + bits - 1) / bits);
    const at::Tensor low = std::get<0>(gy.min(1, true)), step = (std::get<0>(gy.max(1, true)) - low) / (std::ldexp(1, bits) - 1);
    const at::Tensor frac = (gy - low) / step - at::floor((gy - low) / step);
    const at::Tensor stderr_ = (frac * (1 - frac)).sqrt() * step / std::sqrt(static_cast<double>(draws));
    const at::Tensor z = ((mean - gy) * kept).abs() / (stderr_ + 64 * 0x1p-24 * step);
    std::cout << "[agp " << bits << " bits] largest |mean - g| in standard errors: " << z.max().item<double>() << "\n";
    EXPECT_LT(z.max().item<double>(), 5.0);
  }
  testing::expect_error([&] { arith::agp_quantize(at::randn({3, 4}), 2, 4, generator(0)); }, "group_dim 2");
  testing::expect_error([&] { arith::agp_quantize(at::randn({3, 4}), 0, 9, generator(0)); }, "bits must be in [1, 8]");
  testing::expect_error([&] { arith::agp_quantize(at::full({3, 4}, NAN), 0, 4, generator(0)); }, "NaN or Inf");
}

// What an fqt1 layer's gradients equal in expectation, in fp64: the fp32-style backward of
// its 1-bit forward (straight through to x and W), with the output gradient replaced by its
// AGP mask applied: rows (samples) for dX, output channels for dW (or samples without SCQ).
at::Tensor group_mask(const at::Tensor& gy, int64_t dim, int bits) {
  const at::Tensor groups = gy.movedim(dim, 0).reshape({gy.size(dim), -1});
  const at::Tensor range = std::get<0>(groups.max(1)) - std::get<0>(groups.min(1));
  const int64_t kept = (gy.size(dim) + bits - 1) / bits;
  at::Tensor mask = at::zeros({gy.size(dim)}, gy.options());
  mask.index_fill_(0, std::get<1>(at::topk(range, kept)), 1.0);
  std::vector<int64_t> shape(static_cast<size_t>(gy.dim()), 1);
  shape[static_cast<size_t>(dim)] = gy.size(dim);
  return gy * mask.view(shape);
}

struct Expected {
  at::Tensor dx, dw;
};

template <typename Layer>
void expect_mean_gradients(const char* name, Layer layer, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& gy, const Expected& expected, int draws) {
  at::Tensor sum_dx = at::zeros_like(x, at::kDouble), sum_dw = at::zeros_like(w, at::kDouble);
  at::Tensor sq_dx = at::zeros_like(sum_dx), sq_dw = at::zeros_like(sum_dw);
  for (int i = 0; i < draws; ++i) {
    const at::Tensor xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true);
    layer(xr, wr).backward(gy);
    const at::Tensor dx = xr.grad().to(at::kDouble), dw = wr.grad().to(at::kDouble);
    sum_dx += dx, sq_dx += dx * dx, sum_dw += dw, sq_dw += dw * dw;
  }
  const auto check = [&](const char* what, const at::Tensor& sum, const at::Tensor& sq, const at::Tensor& exact) {
    const at::Tensor mean = sum / draws;
    const at::Tensor stderr_ = ((sq / draws - mean * mean).clamp_min(0) / draws).sqrt();
    // (The floor is fp32's systematic error, which averaging does not remove: the backward
    // products sum <= 128 terms (the conv's dW: 8 samples x 16 positions), gamma_128 = 7.6e-6
    // of the sum of their magnitudes, which is ~max|exact| here (1e-5 max|exact|).)
    const at::Tensor z = (mean - exact).abs() / (stderr_ + 1e-5 * exact.abs().max());
    const double rel = ((mean - exact).norm() / exact.norm()).item<double>();
    // The mean's relative error as the standard errors predict it; its square sums hundreds
    // of independent element errors, so 2x (4x in the square) is not reached by chance.
    const double predicted = (stderr_.norm() / exact.norm()).item<double>();
    std::cout << "[" << name << "] " << what << ": mean of " << draws << " within " << z.max().item<double>()
              << " standard errors, relative error " << rel << " (predicted " << predicted << ")\n";
    // 6 standard errors (estimated from 1500 draws): P(|Z| > 6) = 2e-9, 2e-6 over <= 1200.
    EXPECT_LT(z.max().item<double>(), 6.0) << what;
    EXPECT_LT(rel, 2 * predicted + 1e-5) << what;
  };
  check("dX", sum_dx, sq_dx, expected.dx);
  check("dW", sum_dw, sq_dw, expected.dw);
}

arith::ArithOptions fqt(int bits, bool scq) {
  arith::ArithOptions o;
  o.mode = arith::Mode::Fqt1;
  o.fqt_bits = bits;
  o.fqt_scq = scq;
  return o;
}

TEST(FqtLayers, LinearForwardIsTheOneBitProductAndItsGradientsAreUnbiasedPerMask) {
  at::Generator g = generator(9);
  const at::Tensor x = at::relu(at::randn({24, 30}, g)), w = at::randn({10, 30}, g), b = at::randn({10}, g);
  const at::Tensor gy = at::randn({24, 10}, g) * at::pow(10.0, at::rand({24, 1}, g) * 2 - 1);
  const at::Tensor xq = arith::debinarize(arith::binarize(x), x.sizes()).to(at::kDouble);
  const at::Tensor wq = arith::binarize_weight(w).to(at::kDouble), gd = gy.to(at::kDouble);
  at::Generator draws = generator(10);
  {
    torch::NoGradGuard off;
    const at::Tensor y = arith::linear(x, w, b, fqt(4, true), draws);
    // fp32 product of the 1-bit operands against fp64: elementwise within gamma_31 of
    // |xq| |wq|^T + |b| (30 products and the bias, Higham 3.5).
    const at::Tensor magnitude = at::linear(xq.abs(), wq.abs(), b.to(at::kDouble).abs());
    EXPECT_TRUE(((y.to(at::kDouble) - at::linear(xq, wq, b.to(at::kDouble))).abs() <= 31 * 0x1p-24 * magnitude)
                    .all().item<bool>());
  }
  for (const auto& [bits, scq] : {std::pair{1, true}, std::pair{4, true}, std::pair{4, false}}) {
    const arith::ArithOptions o = fqt(bits, scq);
    const Expected expected{at::matmul(group_mask(gd, 0, bits), wq),
                            at::matmul(group_mask(gd, scq ? 1 : 0, bits).t(), xq)};
    const std::string name = "fqt1 linear b=" + std::to_string(bits) + (scq ? " SCQ" : " per-sample");
    expect_mean_gradients(name.c_str(),
                          [&](const at::Tensor& xi, const at::Tensor& wi) { return arith::linear(xi, wi, b, o, draws); },
                          x, w, gy, expected, 1500);
  }
}

TEST(FqtLayers, ConvGradientsAreUnbiasedPerMaskAndEdgeLayersKeepTheFp32Forward) {
  at::Generator g = generator(11);
  const at::Tensor x = at::randn({8, 3, 7, 7}, g), w = at::randn({6, 3, 3, 3}, g), b = at::randn({6}, g);
  const at::Tensor gy = at::randn({8, 6, 4, 4}, g) * at::pow(10.0, at::rand({8, 6, 1, 1}, g) - 0.5);
  const at::Tensor xq = arith::debinarize(arith::binarize(x), x.sizes()).to(at::kDouble);
  const at::Tensor wq = arith::binarize_weight(w).to(at::kDouble), gd = gy.to(at::kDouble);
  at::Generator draws = generator(12);
  const std::vector<int64_t> stride{2, 2}, padding{1, 1};
  const auto conv_grads = [&](const at::Tensor& gmask_x, const at::Tensor& gmask_w) {
    auto [dx, unused_w, unused_b] = at::convolution_backward(gmask_x, xq, wq, c10::nullopt, stride, padding, {1, 1},
                                                             false, {0, 0}, 1, {true, false, false});
    auto [unused_x, dw, unused_b2] = at::convolution_backward(gmask_w, xq, wq, c10::nullopt, stride, padding, {1, 1},
                                                              false, {0, 0}, 1, {false, true, false});
    return Expected{dx, dw};
  };
  const arith::ArithOptions o = fqt(4, true);
  expect_mean_gradients(
      "fqt1 conv b=4 SCQ",
      [&](const at::Tensor& xi, const at::Tensor& wi) { return arith::conv2d(xi, wi, b, stride, padding, o, draws); },
      x, w, gy, conv_grads(group_mask(gd, 0, 4), group_mask(gd, 1, 4)), 1500);
  // An edge layer: the fp32 forward, exactly; its gradients still go through AGP.
  const at::Tensor y = arith::conv2d(x, w, b, stride, padding, o, draws, arith::LayerPlace::Edge);
  EXPECT_TRUE(at::equal(y, at::conv2d(x, w, b, stride, padding)));
}

// Kept for backward: an inner layer its input's packed bits and one scale a sample,
// ceil(n / 8) + 4 samples + 1 bytes; an edge layer the fp32 input.
TEST(FqtLayers, KeptBytesEqualTheirFormulas) {
  at::Generator g = generator(13);
  const at::Tensor x = at::randn({16, 3, 9, 9}, g).requires_grad_(true), w = at::randn({4, 3, 3, 3}, g);
  const arith::ArithOptions o = fqt(4, true);
  arith::reset_saved_bytes();
  at::Tensor y = arith::conv2d(x, w, {}, {1, 1}, {0, 0}, o, g);
  EXPECT_EQ(arith::saved_bytes().kept, (x.numel() + 7) / 8 + 16 * 4 + 1);
  EXPECT_EQ(arith::saved_bytes().fp32, x.numel() * 4);
  arith::reset_saved_bytes();
  y = arith::conv2d(x, w, {}, {1, 1}, {0, 0}, o, g, arith::LayerPlace::Edge);
  EXPECT_EQ(arith::saved_bytes().kept, x.numel() * 4);
  arith::reset_saved_bytes();
  {
    torch::NoGradGuard off;
    y = arith::conv2d(x, w, {}, {1, 1}, {0, 0}, o, g);
  }
  EXPECT_EQ(arith::saved_bytes().kept, 0);
  arith::ArithOptions bad = fqt(0, true);
  testing::expect_error([&] { arith::conv2d(x, w, {}, {1, 1}, {0, 0}, bad, g); }, "fqt_bits must be in [1, 8]");
}

}  // namespace
}  // namespace lowbit
