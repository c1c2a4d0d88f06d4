// lowbit::Sophia (Liu et al., arXiv 2305.14342): momentum divided by a diagonal Hessian
// estimate refreshed every k steps, clipped element-wise:
//   m = b1 m + (1 - b1) g
//   every k steps: h = b2 h + (1 - b2) h_hat
//   p = p - lr wd p;  p = p - lr clip(m / max(rho h, eps), 1)
// h_hat comes from one of two estimators:
//   "hutchinson": u * (H u) with Rademacher u. step() needs a closure that computes the loss
//                 and calls loss.backward(create_graph=true), on every step.
//   "gnb"         (Gauss-Newton-Bartlett): B * g_hat * g_hat, where g_hat is the gradient of
//                 the loss on labels sampled from the model's own output distribution. The
//                 training loop computes that gradient every k steps and calls
//                 update_hessian(B); step() itself is first-order (closure optional).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <ATen/core/Generator.h>

#include <string>
#include <tuple>
#include <vector>

#include <lowbit/state_bytes.h>

namespace lowbit {

struct SophiaOptions : public torch::optim::OptimizerCloneableOptions<SophiaOptions> {
  SophiaOptions(double lr = 1e-4);
  TORCH_ARG(double, lr) = 1e-4;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.965, 0.99);  // momentum, Hessian EMA
  TORCH_ARG(double, rho) = 0.04;             // gamma of the paper: scale of h in the clip
  TORCH_ARG(double, eps) = 1e-12;
  TORCH_ARG(double, weight_decay) = 0.1;     // decoupled
  TORCH_ARG(std::string, estimator) = "gnb"; // "gnb" | "hutchinson"
  TORCH_ARG(int64_t, hessian_interval) = 10; // k
  TORCH_ARG(int64_t, seed) = 0;              // Hutchinson probes (the first group's seed)
  TORCH_ARG(bool, skip_nonfinite) = false;  // skip (and count) a step that would overflow instead of raising

 public:
  void validate() const;  // throws naming the option and what is allowed
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const SophiaOptions& lhs, const SophiaOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

struct SophiaParamState : public torch::optim::OptimizerCloneableParamState<SophiaParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(torch::Tensor, exp_avg);  // m
  TORCH_ARG(torch::Tensor, hessian);  // h

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class Sophia : public torch::optim::Optimizer {
 public:
  explicit Sophia(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaOptions defaults = {});
  explicit Sophia(std::vector<torch::Tensor> params, SophiaOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own would give a group of a type it
  // does not know the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  torch::Tensor step(LossClosure closure = nullptr) override;
  // "gnb": folds B * grad * grad into h, grad being the gradient of the loss on sampled labels
  // (mean over a batch of B examples), now in each parameter's .grad.
  void update_hessian(int64_t batch_size);
  // Whether the coming step() refreshes the Hessian ("hutchinson"), or update_hessian is due
  // after it ("gnb"): every hessian_interval steps, starting with the first (true when any
  // group is due).
  bool hessian_due() const;

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;  // validated; on error nothing changes
  StateBytes state_bytes() const;
  // Steps skipped by skip_nonfinite: they would have overflowed (docs/second_order.md,
  // "Steps that would overflow").
  int64_t skipped_steps() const { return skipped_steps_; }

 private:
  SophiaParamState& state_for(const torch::Tensor& p);
  int64_t steps_ = 0;
  at::Generator generator_;
  int64_t skipped_steps_ = 0;
};

}  // namespace lowbit
