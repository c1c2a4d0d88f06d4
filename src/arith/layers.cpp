// The linear and convolution layers under LUQ-4 and RMM as autograd functions, and the
// dispatch of every mode (see lowbit/arith.h; fqt1's functions are in fqt_layers.cpp). Each
// records what it keeps for backward in a per-thread counter.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <lowbit/arith.h>

#include "arith/fqt_layers.h"
#include "arith/layer_support.h"

#include <cmath>

namespace lowbit::arith {
namespace detail {

namespace {
thread_local SavedBytes saved;
}  // namespace

void count_kept(int64_t kept, int64_t fp32) {
  saved.kept += kept;
  saved.fp32 += fp32;
}

at::Tensor with_bias(const at::Tensor& y, const at::Tensor& bias, int64_t channel_dim) {
  if (!bias.defined()) return y;
  std::vector<int64_t> shape(static_cast<size_t>(y.dim()), 1);
  shape[static_cast<size_t>(channel_dim)] = bias.numel();
  return y + bias.view(shape);
}

}  // namespace detail

namespace {

using detail::count_kept;
using detail::fqt1_conv2d;
using detail::fqt1_linear;
using detail::on_1bit_grid;
using detail::with_bias;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

constexpr int kGradientBits = 4;

// A tensor's value on the 4-bit forward grid. For weights the gradient goes straight through
// to the fp32 weight.
at::Tensor on_4bit_grid(const at::Tensor& t, bool clip) {
  return uniform_dequantize(uniform_quantize(t, 4, clip), t.sizes()).to(t.device());
}

void keep_codes(AutogradContext* ctx, const UniformCodes& c, const at::Tensor& x) {
  ctx->saved_data["x_codes"] = c.packed;
  ctx->saved_data["x_scale"] = c.scale;
  ctx->saved_data["x_offset"] = c.offset;
  ctx->saved_data["x_shape"] = x.sizes().vec();
  count_kept(c.bytes(), x.numel() * 4);
}

at::Tensor kept_input(AutogradContext* ctx) {
  UniformCodes c;
  c.packed = ctx->saved_data["x_codes"].toTensor();
  c.scale = ctx->saved_data["x_scale"].toDouble();
  c.offset = ctx->saved_data["x_offset"].toInt();
  const std::vector<int64_t> shape = ctx->saved_data["x_shape"].toIntVector();
  c.numel = c10::multiply_integers(shape);
  return uniform_dequantize(c, shape);
}

struct LuqLinear : torch::autograd::Function<LuqLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, bool clip,
                            at::Generator generator) {
    const UniformCodes codes = uniform_quantize(x, 4, clip);
    keep_codes(ctx, codes, x);
    ctx->save_for_backward({w});
    ctx->saved_data["generator"] = generator;
    ctx->saved_data["clip"] = clip;
    return at::linear(uniform_dequantize(codes, x.sizes()).to(x.device()), on_4bit_grid(w, clip));
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor gy = grads[0];
    const at::Tensor gq = luq_quantize(gy, kGradientBits, ctx->saved_data["generator"].toGenerator());
    const at::Tensor x = kept_input(ctx).to(gy.device());
    const at::Tensor g2 = gq.reshape({-1, gq.size(-1)}), x2 = x.reshape({-1, x.size(-1)});
    const at::Tensor dx = at::matmul(gq, on_4bit_grid(w, ctx->saved_data["clip"].toBool()));
    const at::Tensor dw = at::matmul(g2.t(), x2);
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

struct LuqConv2d : torch::autograd::Function<LuqConv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, bool clip, at::Generator generator) {
    const UniformCodes codes = uniform_quantize(x, 4, clip);
    keep_codes(ctx, codes, x);
    ctx->save_for_backward({w});
    ctx->saved_data["generator"] = generator;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["clip"] = clip;
    return at::conv2d(uniform_dequantize(codes, x.sizes()).to(x.device()), on_4bit_grid(w, clip), {}, stride, padding);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor gy = grads[0];
    const at::Tensor gq = luq_quantize(gy, kGradientBits, ctx->saved_data["generator"].toGenerator());
    const at::Tensor x = kept_input(ctx).to(gy.device());
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const at::Tensor wq = on_4bit_grid(w, ctx->saved_data["clip"].toBool());
    auto [dx, dw, unused] = at::convolution_backward(gq, x, wq, c10::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                                     {true, true, false});
    return {dx, dw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The Gaussian sketch S (rows x k, entries N(0, 1/k)) of a seed: drawn on the CPU so forward
// and backward (and every device) see the same one.
at::Tensor sketch(int64_t rows, int64_t k, int64_t seed, const at::Device& device) {
  at::Generator gen = at::detail::createCPUGenerator(static_cast<uint64_t>(seed));
  return (at::randn({rows, k}, gen, at::kFloat) / std::sqrt(static_cast<double>(k))).to(device);
}

struct SketchedLinear : torch::autograd::Function<SketchedLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double keep,
                            at::Generator generator) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    const int64_t rows = x2.size(0);
    const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(keep * static_cast<double>(rows))));
    const int64_t seed = at::randint(0, int64_t{1} << 62, {1}, generator, at::kLong).item<int64_t>();
    const at::Tensor kept = at::matmul(sketch(rows, k, seed, x.device()).t(), x2.to(at::kFloat));  // S^T X
    ctx->saved_data["sketch_x"] = kept;
    ctx->saved_data["seed"] = seed;
    ctx->save_for_backward({w});
    count_kept(kept.numel() * 4 + 8, x.numel() * 4);
    return at::linear(x, w);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor gy = grads[0];
    const at::Tensor g2 = gy.reshape({-1, gy.size(-1)});
    const at::Tensor kept = ctx->saved_data["sketch_x"].toTensor();
    const at::Tensor s = sketch(g2.size(0), kept.size(0), ctx->saved_data["seed"].toInt(), gy.device());
    const at::Tensor dx = at::matmul(gy, w);                      // exact
    const at::Tensor dw = at::matmul(at::matmul(s.t(), g2).t(), kept);  // (S^T dY)^T (S^T X)
    return {dx, dw.to(w.scalar_type()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

SavedBytes saved_bytes() { return detail::saved; }
void reset_saved_bytes() { detail::saved = {}; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const ArithOptions& o,
                  at::Generator generator, LayerPlace place) {
  const bool edge = place == LayerPlace::Edge;
  if (!at::GradMode::is_enabled()) {  // evaluation: the forward arithmetic, nothing kept
    if (o.mode == Mode::Luq4) return at::linear(on_4bit_grid(x, o.luq_clip), on_4bit_grid(weight, o.luq_clip), bias);
    if (o.mode == Mode::Fqt1 && !edge) return at::linear(on_1bit_grid(x), binarize_weight(weight), bias);
    return at::linear(x, weight, bias);
  }
  switch (o.mode) {
    case Mode::Luq4: return with_bias(LuqLinear::apply(x, weight, o.luq_clip, generator), bias, x.dim() - 1);
    case Mode::Fqt1: return with_bias(fqt1_linear(x, weight, o, generator, edge), bias, x.dim() - 1);
    case Mode::Rmm:
      TORCH_CHECK(o.rmm_keep > 0 && o.rmm_keep <= 1, "rmm_keep must be in (0, 1]; got ", o.rmm_keep);
      return with_bias(SketchedLinear::apply(x, weight, o.rmm_keep, generator), bias, x.dim() - 1);
    case Mode::Fp32: break;
  }
  count_kept(x.numel() * 4, x.numel() * 4);
  return at::linear(x, weight, bias);
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, const ArithOptions& o, at::Generator generator, LayerPlace place) {
  const bool edge = place == LayerPlace::Edge;
  if (!at::GradMode::is_enabled()) {
    if (o.mode == Mode::Luq4)
      return at::conv2d(on_4bit_grid(x, o.luq_clip), on_4bit_grid(weight, o.luq_clip), bias, stride, padding);
    if (o.mode == Mode::Fqt1 && !edge)
      return at::conv2d(on_1bit_grid(x), binarize_weight(weight), bias, stride, padding);
    return at::conv2d(x, weight, bias, stride, padding);
  }
  if (o.mode == Mode::Luq4)
    return with_bias(LuqConv2d::apply(x, weight, stride.vec(), padding.vec(), o.luq_clip, generator), bias, 1);
  if (o.mode == Mode::Fqt1) return with_bias(fqt1_conv2d(x, weight, stride, padding, o, generator, edge), bias, 1);
  count_kept(x.numel() * 4, x.numel() * 4);  // fp32 and rmm (which sketches linear layers only)
  return at::conv2d(x, weight, bias, stride, padding);
}

}  // namespace lowbit::arith
