#include "train/optimizer_factory.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

namespace lowbit::train {

const std::vector<std::string> kOptimizerNames = {"sgdm", "adamw", "shampoo", "shampoo4", "shampoo4-naive"};

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> params,
                                                        const ShampooOptions& shampoo) {
  if (name == "sgdm")
    return std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(shampoo.lr()).momentum(shampoo.momentum())
                    .nesterov(shampoo.nesterov()).weight_decay(shampoo.weight_decay()));
  if (name == "adamw")
    return std::make_unique<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(shampoo.lr()).betas(shampoo.betas()).eps(shampoo.eps())
                    .weight_decay(shampoo.weight_decay()));
  ShampooOptions options = shampoo;
  if (name == "shampoo") {
    options.bits(32);
  } else if (name == "shampoo4" || name == "shampoo4-naive") {
    if (options.bits() == 32) options.bits(4);
    options.quantize(name == "shampoo4" ? "eigenvectors" : "matrix");
  } else {
    TORCH_CHECK(false, "--optimizer must be one of sgdm, adamw, shampoo, shampoo4, shampoo4-naive; got \"",
                name, "\"");
  }
  return std::make_unique<Shampoo>(params, options);
}

StateBytes optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  if (const auto* shampoo = dynamic_cast<const Shampoo*>(&optimizer)) return shampoo->state_bytes();
  StateBytes bytes;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined()) bytes.first_order += t.numel() * static_cast<int64_t>(t.element_size());
  };
  for (const auto& [key, state] : optimizer.state()) {
    if (const auto* s = dynamic_cast<const torch::optim::SGDParamState*>(state.get())) add(s->momentum_buffer());
    if (const auto* s = dynamic_cast<const torch::optim::AdamWParamState*>(state.get())) {
      add(s->exp_avg());
      add(s->exp_avg_sq());
      add(s->max_exp_avg_sq());
    }
  }
  return bytes;
}

}  // namespace lowbit::train
