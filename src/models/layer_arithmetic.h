// How a model's linear and convolution layers compute (lowbit/arith.h): fp32, LUQ-4, FQT-1 or RMM.
// One object per model, shared with its blocks, so set_arithmetic reaches every layer.
#pragma once

#include <ATen/core/Generator.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <lowbit/arith.h>
#include <lowbit/layer_statistics.h>

#include <memory>

namespace lowbit::models {

struct LayerArithmetic {
  arith::ArithOptions options;
  at::Generator generator;  // LUQ rounding and RMM sketches; seeded by set()
  // K-FAC / AdaBK's statistics hook: told every layer's input and output (null: none).
  std::shared_ptr<LayerStatistics> statistics;

  LayerArithmetic();
  void set(const arith::ArithOptions& o);
  // `place`: Edge for the model's first and last layer (fqt1 keeps their forward in fp32).
  at::Tensor linear(const torch::nn::Linear& layer, const at::Tensor& x,
                    arith::LayerPlace place = arith::LayerPlace::Inner);
  at::Tensor conv(const torch::nn::Conv2d& layer, const at::Tensor& x,
                  arith::LayerPlace place = arith::LayerPlace::Inner);
};

}  // namespace lowbit::models
