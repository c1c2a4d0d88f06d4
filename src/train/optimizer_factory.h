// Builds the optimizers `lowbit train` offers, by name, and measures their state.
#pragma once

#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <vector>

#include <lowbit/shampoo.h>

namespace lowbit::train {

// "sgdm" and "adamw" are LibTorch's own optimizers (the baselines); "shampoo" (32-bit),
// "shampoo4" and "shampoo4-naive" are lowbit::Shampoo with `shampoo` as the base options
// (its bits/quantize are overridden by the name; lr, momentum, betas, weight decay and
// nesterov apply to every optimizer).
extern const std::vector<std::string> kOptimizerNames;

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> params,
                                                        const ShampooOptions& shampoo);

// Optimizer state in bytes, split as lowbit::Shampoo reports it.
StateBytes optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

}  // namespace lowbit::train
