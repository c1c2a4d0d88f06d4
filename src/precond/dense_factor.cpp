// fp32 Shampoo factor: statistic and inverse root kept as dense fp32 matrices.
#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {

DenseFactor::DenseFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config)
    : KroneckerFactor(order), config_(config) {
  const at::TensorOptions fp32 = device.dtype(at::kFloat);
  statistic_ = config.epsilon * at::eye(order, fp32);  // L_0 = eps * I, as in the paper
  root_ = at::eye(order, fp32);
}

void DenseFactor::update_statistic(const at::Tensor& outer) {
  statistic_.mul_(config_.stat_decay).add_(outer, 1.0 - config_.stat_decay);
}

bool DenseFactor::update_inverse_root() {
  std::optional<at::Tensor> root;
  if (config_.root_method == RootMethod::Eigen) {
    root = linalg::inverse_root_eigen(statistic_, config_.root_exponent, config_.epsilon, config_.eigh);
  } else {
    root = linalg::inverse_root_newton(statistic_, static_cast<int>(config_.root_exponent), config_.epsilon);
  }
  if (!root || !root->isfinite().all().item<bool>()) {
    ++failures_;
    return false;
  }
  root_ = root->to(at::kFloat);
  return true;
}

int64_t DenseFactor::state_bytes() const { return 2 * order_ * order_ * 4; }

void DenseFactor::save(TensorMap& out, const std::string& prefix) const {
  out[prefix + "statistic"] = statistic_;
  out[prefix + "root"] = root_;
}

void DenseFactor::load(const TensorMap& in, const std::string& prefix) {
  const at::Tensor statistic = read_entry(in, prefix + "statistic", at::kFloat, {order_, order_});
  const at::Tensor root = read_entry(in, prefix + "root", at::kFloat, {order_, order_});
  statistic_ = statistic.to(statistic_.device()).clone();
  root_ = root.to(root_.device()).clone();
}

}  // namespace lowbit::precond
