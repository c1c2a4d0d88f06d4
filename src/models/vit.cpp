// A small Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned
// position embedding, pre-norm transformer layers.
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "models/models.h"

namespace lowbit::models {
namespace {

constexpr int64_t kDim = 64;
constexpr int64_t kHeads = 4;
constexpr int64_t kMlpDim = 128;
constexpr int64_t kLayers = 2;
constexpr int64_t kMaxGrid = 8;

struct TransformerLayer : torch::nn::Module {
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, mlp1{nullptr}, mlp2{nullptr};
  TransformerLayer() {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    qkv = register_module("qkv", torch::nn::Linear(kDim, 3 * kDim));
    proj = register_module("proj", torch::nn::Linear(kDim, kDim));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    mlp1 = register_module("mlp1", torch::nn::Linear(kDim, kMlpDim));
    mlp2 = register_module("mlp2", torch::nn::Linear(kMlpDim, kDim));
  }
  // x: [batch, tokens, dim]
  at::Tensor attention(const at::Tensor& x) {
    const int64_t batch = x.size(0), tokens = x.size(1), head_dim = kDim / kHeads;
    // [batch, tokens, 3, heads, head_dim] -> 3 x [batch, heads, tokens, head_dim]
    const at::Tensor qkv_heads =
        qkv->forward(x).view({batch, tokens, 3, kHeads, head_dim}).permute({2, 0, 3, 1, 4});
    const at::Tensor q = qkv_heads[0], k = qkv_heads[1], v = qkv_heads[2];
    const at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(head_dim));
    const at::Tensor mixed = at::matmul(at::softmax(scores, -1), v);  // [batch, heads, tokens, hd]
    return proj->forward(mixed.transpose(1, 2).reshape({batch, tokens, kDim}));
  }
  at::Tensor forward(at::Tensor x) {
    x = x + attention(norm1->forward(x));
    return x + mlp2->forward(at::gelu(mlp1->forward(norm2->forward(x))));
  }
};

struct Vit : Classifier {
  void set_arithmetic(const arith::ArithOptions& options) override {
    TORCH_CHECK(options.mode == arith::Mode::Fp32, "vit: low-bit arithmetic (\"", arith::to_string(options.mode),
                "\") is implemented for mlp, cnn and resnet20; vit trains in fp32");
    Classifier::set_arithmetic(options);
  }
  int64_t patch;
  torch::nn::Conv2d patch_embed{nullptr};
  at::Tensor cls_token, pos_embed;
  std::vector<std::shared_ptr<TransformerLayer>> layers;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  Vit(int64_t in_channels, int64_t image_size, int64_t num_classes, int64_t patch_size)
      : patch(patch_size) {
    patch_embed = register_module(
        "patch_embed",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, kDim, patch).stride(patch)));
    const int64_t grid = image_size / patch;
    cls_token = register_parameter("cls_token", at::randn({1, 1, kDim}) * 0.02);
    pos_embed = register_parameter("pos_embed", at::randn({1, grid * grid + 1, kDim}) * 0.02);
    for (int64_t i = 0; i < kLayers; ++i) {
      layers.push_back(register_module("layer" + std::to_string(i + 1),
                                       std::make_shared<TransformerLayer>()));
    }
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    head = register_module("head", torch::nn::Linear(kDim, num_classes));
  }
  at::Tensor forward(at::Tensor x) override {
    x = patch_embed->forward(x).flatten(2).transpose(1, 2);  // [batch, grid^2, dim]
    x = at::cat({cls_token.expand({x.size(0), 1, kDim}), x}, 1) + pos_embed;
    for (const auto& layer : layers) x = layer->forward(x);
    return head->forward(norm->forward(x.select(1, 0)));
  }
};

}  // namespace

std::shared_ptr<Classifier> make_vit(int64_t in_channels, int64_t image_size, int64_t num_classes) {
  TORCH_CHECK(in_channels > 0 && image_size > 0 && num_classes > 1, "vit: need in_channels > 0, "
              "image_size > 0 and num_classes > 1, got ", in_channels, ", ", image_size, ", ",
              num_classes);
  int64_t patch = 1;
  while (image_size % patch != 0 || image_size / patch > kMaxGrid) ++patch;
  return std::make_shared<Vit>(in_channels, image_size, num_classes, patch);
}

}  // namespace lowbit::models
