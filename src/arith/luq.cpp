// The two quantizers of 4-bit training: LUQ for neural gradients (stochastic, unbiased) and
// the uniform grid of the forward pass (deterministic, packed for what backward keeps).
#include <ATen/ATen.h>

#include <lowbit/arith.h>

#include <algorithm>
#include <cmath>

namespace lowbit::arith {

at::Tensor luq_quantize(const at::Tensor& x, int bits, at::Generator generator) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "luq_quantize: bits must be in [2, 8]; got ", bits);
  if (x.numel() == 0) return at::zeros_like(x);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "luq_quantize: expected a floating tensor; got ", x.scalar_type());
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor a = xf.abs();
  const float max = a.max().item<float>();
  TORCH_CHECK(std::isfinite(max), "luq_quantize: the tensor holds NaN or Inf");
  if (max == 0) return at::zeros_like(x);
  const int top = (1 << (bits - 1)) - 2;  // the largest level is alpha 2^top = max
  const float alpha = std::ldexp(max, -top);  // exact: a power-of-two scaling
  const at::Tensor u = at::rand(x.sizes(), generator, xf.options().device(at::kCPU)).to(x.device());
  // Above alpha: between lower = alpha 2^j and 2 lower, up with probability (a - lower) / lower.
  // frexp gives j from the binary exponent; a / alpha is rounded, so the two exact
  // comparisons below put a value next to a level on its right side.
  const at::Tensor j = (std::get<1>(at::frexp(a.clamp_min(alpha) / alpha)) - 1).clamp(0, top);
  at::Tensor lower = at::ldexp(at::full_like(a, alpha), j);
  lower = at::where(lower > a, lower / 2, lower);
  lower = at::where((lower * 2 <= a) & (lower * 2 <= max), lower * 2, lower).clamp_min(alpha);
  const at::Tensor upper = at::where(lower * 2 > max, lower, lower * 2);
  const at::Tensor p_up = ((a - lower) / lower).clamp(0, 1);
  const at::Tensor above = at::where(u < p_up, upper, lower);
  // Below alpha: alpha with probability a / alpha, else 0 (unbiased underflow).
  const at::Tensor below = (u < a / alpha).to(at::kFloat) * alpha;
  return (at::sign(xf) * at::where(a < alpha, below, above)).to(x.scalar_type());
}

int64_t UniformCodes::bytes() const { return packed.numel() + 8; }

namespace {

constexpr int64_t kClipSample = 16384;

// The clipping ratio r (scale = absmax r / levels) whose grid (codes -low..levels) has the least
// squared error on a strided sample of xf: a geometric sweep r = 0.8^k down to 0.01, then
// quarter steps around the best.
double mse_optimal_scale(const at::Tensor& xf, double absmax, int64_t low, int64_t levels) {
  const int64_t stride = std::max<int64_t>(1, xf.numel() / kClipSample);
  const at::Tensor sample = xf.slice(0, 0, xf.numel(), stride).to(at::kDouble);
  const auto scale_of = [&](double r) { return absmax * r / static_cast<double>(levels); };
  const auto error_of = [&](double r) {
    const double scale = scale_of(r);
    return ((sample / scale).round().clamp(-low, levels) * scale - sample).pow(2).sum().item<double>();
  };
  double best_r = 1, best_error = error_of(1);
  const auto consider = [&](double r) {
    if (r > 1) return;
    const double error = error_of(r);
    if (error < best_error) best_error = error, best_r = r;
  };
  for (double r = 0.8; r >= 0.01; r *= 0.8) consider(r);
  const double coarse = best_r;
  for (const int j : {-3, -2, -1, 1, 2, 3}) consider(coarse * std::pow(0.8, j / 4.0));
  return scale_of(best_r);
}

}  // namespace

UniformCodes uniform_quantize(const at::Tensor& x, int bits, bool clip) {
  TORCH_CHECK(bits == 4, "uniform_quantize: only 4 bits are packed; got ", bits);
  const at::Tensor xf = x.detach().to(at::kFloat).reshape({-1});
  UniformCodes c;
  c.numel = xf.numel();
  TORCH_CHECK(xf.numel() == 0 || xf.isfinite().all().item<bool>(),
              "uniform_quantize: the tensor holds NaN or Inf (a diverged forward pass?)");
  const bool non_negative = xf.numel() == 0 || xf.min().item<float>() >= 0;
  const int64_t levels = non_negative ? (1 << bits) - 1 : (1 << (bits - 1)) - 1;
  c.offset = non_negative ? 0 : levels;
  const double absmax = xf.numel() == 0 ? 0 : xf.abs().max().item<double>();
  c.scale = absmax > 0 ? absmax / static_cast<double>(levels) : 1.0;
  if (clip && absmax > 0) c.scale = mse_optimal_scale(xf, absmax, c.offset, levels);
  at::Tensor codes = (xf / c.scale).round().clamp(-c.offset, levels).add(c.offset).to(at::kByte);
  if (codes.numel() % 2 != 0) codes = at::cat({codes, at::zeros({1}, codes.options())});
  const at::Tensor pairs = codes.view({-1, 2});
  c.packed = (pairs.select(1, 0) | pairs.select(1, 1).__lshift__(4)).contiguous();
  return c;
}

at::Tensor uniform_dequantize(const UniformCodes& c, at::IntArrayRef shape) {
  const at::Tensor low = c.packed.bitwise_and(0x0F), high = c.packed.__rshift__(4);
  const at::Tensor codes = at::stack({low, high}, 1).reshape({-1}).narrow(0, 0, c.numel);
  return ((codes.to(at::kFloat) - static_cast<float>(c.offset)) * static_cast<float>(c.scale)).reshape(shape);
}

}  // namespace lowbit::arith
