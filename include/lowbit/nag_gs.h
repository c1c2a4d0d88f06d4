// lowbit::NagGS (Leplat et al., arXiv 2209.14937): the semi-implicit Gauss-Seidel
// discretisation of an accelerated Nesterov-like SDE. With step alpha (lr), mu >= 0 and
// gamma > 0 (itself evolving), one step with the gradient g at the current point x:
//   b = alpha mu / (alpha mu + gamma)
//   v = (1 - b) v + b x - alpha / (alpha mu + gamma) g      (= (1-b) v + b (x - g/mu), mu > 0)
//   gamma = (gamma + alpha mu) / (1 + alpha)
//   x = (1 - a) x + a v,   a = alpha / (1 + alpha)
// v starts at x; gamma starts at the option's value.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <vector>

#include <lowbit/state_bytes.h>

namespace lowbit {

struct NagGSOptions : public torch::optim::OptimizerCloneableOptions<NagGSOptions> {
  NagGSOptions(double lr = 0.1);
  TORCH_ARG(double, lr) = 0.1;    // alpha
  TORCH_ARG(double, mu) = 1.0;    // >= 0
  TORCH_ARG(double, gamma) = 1.0; // > 0, initial value
  TORCH_ARG(bool, skip_nonfinite) = false;  // skip (and count) a step that would overflow instead of raising

 public:
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const NagGSOptions& lhs, const NagGSOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

struct NagGSParamState : public torch::optim::OptimizerCloneableParamState<NagGSParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(double, gamma) = 1.0;
  TORCH_ARG(torch::Tensor, velocity);  // v

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class NagGS : public torch::optim::Optimizer {
 public:
  explicit NagGS(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, NagGSOptions defaults = {});
  explicit NagGS(std::vector<torch::Tensor> params, NagGSOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own would give a group of a type it
  // does not know the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  StateBytes state_bytes() const;
  // Steps skipped by skip_nonfinite: they would have overflowed (docs/second_order.md,
  // "Steps that would overflow").
  int64_t skipped_steps() const { return skipped_steps_; }

 private:
  int64_t skipped_steps_ = 0;
};

}  // namespace lowbit
