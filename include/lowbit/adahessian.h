// lowbit::AdaHessian (Yao et al., arXiv 2006.00719): Adam whose second moment is the
// squared Hutchinson estimate D of the Hessian diagonal, averaged over the spatial
// dimensions of convolution kernels:
//   D = z * (H z)  (4-D kernels: mean of |D| over the kernel's height and width)
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) D^2
//   p = p - lr (m / bc1 / ((sqrt(v) / sqrt(bc2))^k + eps) + wd p)    (k: hessian_power)
// step() needs a closure that computes the loss and calls loss.backward(create_graph=true).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <ATen/core/Generator.h>

#include <tuple>
#include <vector>

#include <lowbit/state_bytes.h>

namespace lowbit {

struct AdaHessianOptions : public torch::optim::OptimizerCloneableOptions<AdaHessianOptions> {
  AdaHessianOptions(double lr = 0.15);
  TORCH_ARG(double, lr) = 0.15;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-4;
  TORCH_ARG(double, weight_decay) = 0.0;    // decoupled, as in the authors' code
  TORCH_ARG(double, hessian_power) = 1.0;   // k in (0, 1]
  TORCH_ARG(int64_t, hessian_interval) = 1; // refresh D every this many steps (reused between)
  TORCH_ARG(int64_t, seed) = 0;             // Hutchinson probes (the first group's seed)
  TORCH_ARG(bool, skip_nonfinite) = false;  // skip (and count) a step that would overflow instead of raising

 public:
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const AdaHessianOptions& lhs, const AdaHessianOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

struct AdaHessianParamState : public torch::optim::OptimizerCloneableParamState<AdaHessianParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(torch::Tensor, exp_avg);             // m
  TORCH_ARG(torch::Tensor, exp_hessian_diag_sq); // v
  TORCH_ARG(torch::Tensor, hessian_diag);        // the last D (reused between refreshes)

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class AdaHessian : public torch::optim::Optimizer {
 public:
  explicit AdaHessian(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                      AdaHessianOptions defaults = {});
  explicit AdaHessian(std::vector<torch::Tensor> params, AdaHessianOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own would give a group of a type it
  // does not know the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  torch::Tensor step(LossClosure closure = nullptr) override;  // closure required
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  StateBytes state_bytes() const;
  // Steps skipped by skip_nonfinite: they would have overflowed (docs/second_order.md,
  // "Steps that would overflow").
  int64_t skipped_steps() const { return skipped_steps_; }

 private:
  AdaHessianParamState& state_for(const torch::Tensor& p);
  bool has_diagonal(const torch::Tensor& p) const;
  int64_t steps_ = 0;
  at::Generator generator_;
  int64_t skipped_steps_ = 0;
};

}  // namespace lowbit
