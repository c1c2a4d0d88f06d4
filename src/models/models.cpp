// make_model, and the MLP and small CNN.
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "models/models.h"

namespace lowbit::models {
namespace {

void check_sizes(const char* model, int64_t in_channels, int64_t image_size, int64_t num_classes) {
  TORCH_CHECK(in_channels > 0 && image_size > 0 && num_classes > 1, model,
              ": need in_channels > 0, image_size > 0 and num_classes > 1, got ", in_channels,
              ", ", image_size, ", ", num_classes);
}

struct Mlp : Classifier {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  Mlp(int64_t in_features, int64_t num_classes) {
    fc1 = register_module("fc1", torch::nn::Linear(in_features, 256));
    fc2 = register_module("fc2", torch::nn::Linear(256, 256));
    fc3 = register_module("fc3", torch::nn::Linear(256, num_classes));
  }
  at::Tensor forward(at::Tensor x) override {
    x = at::relu(compute->linear(fc1, x.flatten(1), arith::LayerPlace::Edge));
    x = at::relu(compute->linear(fc2, x));
    return compute->linear(fc3, x, arith::LayerPlace::Edge);
  }
};

struct Cnn : Classifier {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  Cnn(int64_t in_channels, int64_t image_size, int64_t num_classes) {
    using torch::nn::Conv2dOptions;
    // BatchNorm follows each convolution, so the convolutions carry no bias.
    conv1 = register_module("conv1", torch::nn::Conv2d(Conv2dOptions(in_channels, 32, 3).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(32));
    conv2 = register_module("conv2", torch::nn::Conv2d(Conv2dOptions(32, 64, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(64));
    const int64_t side = image_size / 4;  // two 2x2 max pools (floor)
    fc1 = register_module("fc1", torch::nn::Linear(64 * side * side, 128));
    fc2 = register_module("fc2", torch::nn::Linear(128, num_classes));
  }
  at::Tensor forward(at::Tensor x) override {
    x = at::max_pool2d(at::relu(bn1->forward(compute->conv(conv1, x, arith::LayerPlace::Edge))), {2, 2});
    x = at::max_pool2d(at::relu(bn2->forward(compute->conv(conv2, x))), {2, 2});
    x = at::relu(compute->linear(fc1, x.flatten(1)));
    return compute->linear(fc2, x, arith::LayerPlace::Edge);
  }
};

}  // namespace

std::shared_ptr<Classifier> make_mlp(int64_t in_channels, int64_t image_size, int64_t num_classes) {
  check_sizes("mlp", in_channels, image_size, num_classes);
  return std::make_shared<Mlp>(in_channels * image_size * image_size, num_classes);
}

std::shared_ptr<Classifier> make_cnn(int64_t in_channels, int64_t image_size, int64_t num_classes) {
  check_sizes("cnn", in_channels, image_size, num_classes);
  TORCH_CHECK(image_size >= 4, "cnn: image_size must be at least 4 (two 2x2 poolings), got ",
              image_size);
  return std::make_shared<Cnn>(in_channels, image_size, num_classes);
}

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names = {"mlp", "cnn", "resnet20", "vit"};
  return names;
}

std::shared_ptr<Classifier> make_model(const std::string& name, int64_t in_channels,
                                       int64_t image_size, int64_t num_classes) {
  if (name == "mlp") return make_mlp(in_channels, image_size, num_classes);
  if (name == "cnn") return make_cnn(in_channels, image_size, num_classes);
  if (name == "resnet20") {
    check_sizes("resnet20", in_channels, image_size, num_classes);
    return make_resnet20(in_channels, num_classes);
  }
  if (name == "vit") return make_vit(in_channels, image_size, num_classes);
  std::string names;
  for (const std::string& n : model_names()) names += (names.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "unknown model '", name, "' (expected one of: ", names, ")");
}

}  // namespace lowbit::models
