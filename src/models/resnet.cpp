// CIFAR-style ResNet-20 (He et al. 2016, section 4.2), with 1x1 conv + BN projection shortcuts.
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "models/models.h"

namespace lowbit::models {
namespace {

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, kernel)
                               .stride(stride)
                               .padding(kernel / 2)
                               .bias(false));
}

struct BasicBlock : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, shortcut_conv{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, shortcut_bn{nullptr};
  std::shared_ptr<LayerArithmetic> compute;  // the model's: set_arithmetic reaches the block
  BasicBlock(int64_t in, int64_t out, int64_t stride, std::shared_ptr<LayerArithmetic> arithmetic)
      : compute(std::move(arithmetic)) {
    conv1 = register_module("conv1", conv(in, out, 3, stride));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(out));
    conv2 = register_module("conv2", conv(out, out, 3, 1));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      shortcut_conv = register_module("shortcut_conv", conv(in, out, 1, stride));
      shortcut_bn = register_module("shortcut_bn", torch::nn::BatchNorm2d(out));
    }
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = at::relu(bn1->forward(compute->conv(conv1, x)));
    y = bn2->forward(compute->conv(conv2, y));
    const at::Tensor identity = shortcut_conv ? shortcut_bn->forward(compute->conv(shortcut_conv, x)) : x;
    return at::relu(y + identity);
  }
};

struct ResNet20 : Classifier {
  torch::nn::Conv2d stem{nullptr};
  torch::nn::BatchNorm2d stem_bn{nullptr};
  std::vector<std::shared_ptr<BasicBlock>> blocks;
  torch::nn::Linear fc{nullptr};
  ResNet20(int64_t in_channels, int64_t num_classes) {
    stem = register_module("stem", conv(in_channels, 16, 3, 1));
    stem_bn = register_module("stem_bn", torch::nn::BatchNorm2d(16));
    int64_t channels = 16;
    for (int stage = 0; stage < 3; ++stage) {
      const int64_t out = 16 << stage;
      for (int b = 0; b < 3; ++b) {
        const int64_t stride = (stage > 0 && b == 0) ? 2 : 1;
        blocks.push_back(register_module(
            "stage" + std::to_string(stage + 1) + "_block" + std::to_string(b + 1),
            std::make_shared<BasicBlock>(channels, out, stride, compute)));
        channels = out;
      }
    }
    fc = register_module("fc", torch::nn::Linear(channels, num_classes));
  }
  at::Tensor forward(at::Tensor x) override {
    x = at::relu(stem_bn->forward(compute->conv(stem, x, arith::LayerPlace::Edge)));
    for (const auto& block : blocks) x = block->forward(x);
    return compute->linear(fc, at::adaptive_avg_pool2d(x, {1, 1}).flatten(1), arith::LayerPlace::Edge);
  }
};

}  // namespace

std::shared_ptr<Classifier> make_resnet20(int64_t in_channels, int64_t num_classes) {
  TORCH_CHECK(in_channels > 0 && num_classes > 1, "resnet20: need in_channels > 0 and "
              "num_classes > 1, got ", in_channels, " and ", num_classes);
  return std::make_shared<ResNet20>(in_channels, num_classes);
}

}  // namespace lowbit::models
