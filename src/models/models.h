// Small image classifiers for `lowbit train`. Together their parameters have every shape the
// Shampoo partitioner handles: 1-D (biases, BatchNorm/LayerNorm weights), 2-D (linear),
// 3-D (ViT class token and position embedding) and 4-D (convolutions).
#pragma once

#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/layer_arithmetic.h"

namespace lowbit::models {

// Maps images [batch, in_channels, image_size, image_size] to logits [batch, num_classes].
struct Classifier : torch::nn::Module {
  virtual at::Tensor forward(at::Tensor x) = 0;
  // The arithmetic of its linear and convolution layers (lowbit/arith.h; fp32 by default).
  // Throws for a model whose layers do not support it (vit: fp32 only).
  virtual void set_arithmetic(const arith::ArithOptions& options) { compute->set(options); }
  const arith::ArithOptions& arithmetic() const { return compute->options; }
  // Reports every linear and convolution layer's input and output to `statistics` (K-FAC,
  // AdaBK); nullptr stops it.
  void observe_layers(std::shared_ptr<LayerStatistics> statistics) { compute->statistics = std::move(statistics); }

 protected:
  std::shared_ptr<LayerArithmetic> compute = std::make_shared<LayerArithmetic>();
};

// "mlp":      flatten, two hidden layers of 256 with ReLU.
// "cnn":      conv 32 3x3 + BN + ReLU + 2x2 max pool, conv 64 3x3 + BN + ReLU + 2x2 max pool,
//             linear 128 + ReLU, linear num_classes (image_size >= 4).
// "resnet20": CIFAR-style ResNet-20: 3x3 conv 16 + BN, 3 stages of 3 basic blocks with 16/32/64
//             channels (stride 2 at stages 2 and 3, 1x1 conv + BN shortcuts), global average
//             pool, linear.
// "vit":      patch embedding conv, class token [1, 1, 64], learned position embedding
//             [1, tokens + 1, 64], 2 pre-norm transformer layers (4-head attention, MLP 128,
//             LayerNorm), LayerNorm, linear head on the class token. The patch is the smallest
//             size that divides image_size into a grid of at most 8x8 (28 -> 4, 32 -> 4).
// Unknown names are an error listing model_names().
std::shared_ptr<Classifier> make_model(const std::string& name, int64_t in_channels,
                                       int64_t image_size, int64_t num_classes);

const std::vector<std::string>& model_names();

// The constructors behind make_model.
std::shared_ptr<Classifier> make_mlp(int64_t in_channels, int64_t image_size, int64_t num_classes);
std::shared_ptr<Classifier> make_cnn(int64_t in_channels, int64_t image_size, int64_t num_classes);
std::shared_ptr<Classifier> make_resnet20(int64_t in_channels, int64_t num_classes);
std::shared_ptr<Classifier> make_vit(int64_t in_channels, int64_t image_size, int64_t num_classes);

}  // namespace lowbit::models
