// 1-bit FQT's autograd functions (lowbit/arith.h): a 1-bit forward that keeps the packed
// input, and a backward whose two products each get the neural gradient quantized in the
// groups that keep their scales outside the product's sum (Sample-Channel joint Quantization),
// with Activation Gradient Pruning.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "arith/fqt_layers.h"
#include "arith/layer_support.h"

namespace lowbit::arith::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

struct FqtConfig {
  int bits;
  bool scq;
  bool edge;
};

// Keeps what backward needs of x (packed 1-bit codes, or x itself at an edge layer) and
// returns x's forward value.
at::Tensor keep_input(AutogradContext* ctx, const at::Tensor& x, const FqtConfig& c) {
  ctx->saved_data["edge"] = c.edge;
  ctx->saved_data["bits"] = static_cast<int64_t>(c.bits);
  ctx->saved_data["scq"] = c.scq;
  if (c.edge) {
    ctx->saved_data["x"] = x.detach();
    count_kept(x.numel() * 4, x.numel() * 4);
    return x;
  }
  const BinaryCodes codes = binarize(x);
  ctx->saved_data["x_codes"] = codes.packed;
  ctx->saved_data["x_scales"] = codes.scales;
  ctx->saved_data["x_non_negative"] = codes.non_negative;
  ctx->saved_data["x_shape"] = x.sizes().vec();
  count_kept(codes.bytes(), x.numel() * 4);
  return debinarize(codes, x.sizes()).to(x.device(), x.scalar_type());
}

at::Tensor kept_input(AutogradContext* ctx, const at::Device& device) {
  if (ctx->saved_data["edge"].toBool()) return ctx->saved_data["x"].toTensor();
  BinaryCodes codes;
  codes.packed = ctx->saved_data["x_codes"].toTensor();
  codes.scales = ctx->saved_data["x_scales"].toTensor();
  codes.non_negative = ctx->saved_data["x_non_negative"].toBool();
  const std::vector<int64_t> shape = ctx->saved_data["x_shape"].toIntVector();
  codes.numel = c10::multiply_integers(shape);
  return debinarize(codes, shape).to(device);
}

at::Tensor forward_weight(AutogradContext* ctx, const at::Tensor& w) {
  return ctx->saved_data["edge"].toBool() ? w : binarize_weight(w);
}

// The neural gradient as each backward product sees it: per sample (dim 0) for dX, per output
// channel for dW (or per sample again without SCQ).
struct QuantizedGradients {
  at::Tensor for_input;
  at::Tensor for_weight;
};
QuantizedGradients quantize_gradient(AutogradContext* ctx, const at::Tensor& gy, int64_t channel_dim) {
  at::Generator generator = ctx->saved_data["generator"].toGenerator();
  const int bits = static_cast<int>(ctx->saved_data["bits"].toInt());
  const at::Tensor per_sample = agp_quantize(gy, 0, bits, generator);
  if (!ctx->saved_data["scq"].toBool()) return {per_sample, per_sample};
  return {per_sample, agp_quantize(gy, channel_dim, bits, generator)};
}

struct Fqt1Linear : torch::autograd::Function<Fqt1Linear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, int64_t bits, bool scq,
                            bool edge, at::Generator generator) {
    const at::Tensor xq = keep_input(ctx, x, {static_cast<int>(bits), scq, edge});
    ctx->save_for_backward({w});
    ctx->saved_data["generator"] = generator;
    return at::linear(xq, forward_weight(ctx, w));
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor gy = grads[0];
    const at::Tensor x = kept_input(ctx, gy.device());
    const QuantizedGradients g = quantize_gradient(ctx, gy, gy.dim() - 1);
    const at::Tensor dx = at::matmul(g.for_input, forward_weight(ctx, w));
    const at::Tensor dw = at::matmul(g.for_weight.reshape({-1, gy.size(-1)}).t(), x.reshape({-1, x.size(-1)}));
    return {dx, dw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct Fqt1Conv2d : torch::autograd::Function<Fqt1Conv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, int64_t bits, bool scq, bool edge,
                            at::Generator generator) {
    const at::Tensor xq = keep_input(ctx, x, {static_cast<int>(bits), scq, edge});
    ctx->save_for_backward({w});
    ctx->saved_data["generator"] = generator;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    return at::conv2d(xq, forward_weight(ctx, w), {}, stride, padding);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor gy = grads[0];
    const at::Tensor x = kept_input(ctx, gy.device());
    const at::Tensor wq = forward_weight(ctx, w);
    const QuantizedGradients g = quantize_gradient(ctx, gy, 1);
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const auto product = [&](const at::Tensor& gq, bool input) {
      return at::convolution_backward(gq, x, wq, c10::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                      {input, !input, false});
    };
    const at::Tensor dx = std::get<0>(product(g.for_input, true));
    const at::Tensor dw = std::get<1>(product(g.for_weight, false));
    return {dx, dw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check(const ArithOptions& o) {
  TORCH_CHECK(o.fqt_bits >= 1 && o.fqt_bits <= 8, "fqt_bits must be in [1, 8]; got ", o.fqt_bits);
}

}  // namespace

at::Tensor on_1bit_grid(const at::Tensor& x) {
  return debinarize(binarize(x), x.sizes()).to(x.device(), x.scalar_type());
}

at::Tensor fqt1_linear(const at::Tensor& x, const at::Tensor& weight, const ArithOptions& o, at::Generator generator,
                       bool edge) {
  check(o);
  return Fqt1Linear::apply(x, weight, static_cast<int64_t>(o.fqt_bits), o.fqt_scq, edge, generator);
}

at::Tensor fqt1_conv2d(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       const ArithOptions& o, at::Generator generator, bool edge) {
  check(o);
  return Fqt1Conv2d::apply(x, weight, stride.vec(), padding.vec(), static_cast<int64_t>(o.fqt_bits), o.fqt_scq, edge,
                           generator);
}

}  // namespace lowbit::arith::detail
