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
  if (config_.eigenbasis) update_eigenbasis();
}

void DenseFactor::update_eigenbasis() {
  // SOAP's refresh: one warm-started power-iteration + QR step (or a full eigh), as the
  // 4-bit factor refreshes its eigenvectors, so 32- and 4-bit SOAP track alike. The first
  // refresh (from the identity) is a full eigh, as in the paper: a QR step from I is far from
  // an eigenbasis and the next ones would rotate it a lot, under Adam's second moment.
  const bool first = at::equal(root_, at::eye(order_, root_.options()));
  std::optional<linalg::Eigen> e;
  if (config_.eigen_update == EigenUpdate::QrStep && !first) {
    e = linalg::qr_subspace_step(statistic_, root_);
  } else {
    e = linalg::eigh_with_fallback(statistic_, config_.eigh);
  }
  if (!e || !e->vectors.isfinite().all().item<bool>()) {
    ++failures_;
    return;
  }
  root_ = e->vectors.to(at::kFloat).contiguous();
}

bool DenseFactor::update_inverse_root() {
  if (config_.eigenbasis) return true;  // the basis follows the statistics
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
