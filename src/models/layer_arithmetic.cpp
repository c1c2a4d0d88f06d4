#include "models/layer_arithmetic.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>

namespace lowbit::models {

LayerArithmetic::LayerArithmetic() : generator(at::detail::createCPUGenerator(0)) {}

void LayerArithmetic::set(const arith::ArithOptions& o) {
  TORCH_CHECK(o.rmm_keep > 0 && o.rmm_keep <= 1, "rmm keep fraction must be in (0, 1]; got ", o.rmm_keep);
  TORCH_CHECK(o.fqt_bits >= 1 && o.fqt_bits <= 8, "fqt bits must be in [1, 8]; got ", o.fqt_bits);
  options = o;
  generator = at::detail::createCPUGenerator(o.seed);
}

at::Tensor LayerArithmetic::linear(const torch::nn::Linear& layer, const at::Tensor& x, arith::LayerPlace place) {
  const at::Tensor& bias = layer->options.bias() ? layer->bias : at::Tensor();
  at::Tensor out = arith::linear(x, layer->weight, bias, options, generator, place);
  if (statistics) statistics->observe(layer->weight, x, out);
  return out;
}

at::Tensor LayerArithmetic::conv(const torch::nn::Conv2d& layer, const at::Tensor& x, arith::LayerPlace place) {
  const auto& o = layer->options;
  TORCH_CHECK(o.groups() == 1 && o.dilation()->at(0) == 1 && o.dilation()->at(1) == 1,
              "low-bit arithmetic supports convolutions without groups or dilation");
  const auto& padding = std::get<torch::ExpandingArray<2>>(o.padding());
  const at::Tensor& bias = o.bias() ? layer->bias : at::Tensor();
  at::Tensor out = arith::conv2d(x, layer->weight, bias, *o.stride(), *padding, options, generator, place);
  if (statistics) statistics->observe(layer->weight, x, out);
  return out;
}

}  // namespace lowbit::models
