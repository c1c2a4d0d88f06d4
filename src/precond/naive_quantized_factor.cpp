#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {

NaiveQuantizedFactor::NaiveQuantizedFactor(int64_t order, const at::TensorOptions& device,
                                           const FactorConfig& config)
    : KroneckerFactor(order), config_(config), quant_(config.quant) {
  quant_.keep_diagonal = true;  // fp32 diagonal, quantized off-diagonal
  const at::Tensor identity = at::eye(order, device.dtype(at::kFloat));
  statistic_ = QuantizedMatrix::quantize(config.epsilon * identity, quant_);
  root_ = QuantizedMatrix::quantize(identity, quant_);
}

void NaiveQuantizedFactor::update_statistic(const at::Tensor& outer) {
  const at::Tensor a = statistic_.dequantize().mul_(config_.stat_decay).add_(outer, 1.0 - config_.stat_decay);
  statistic_ = QuantizedMatrix::quantize(a, quant_);
}

bool NaiveQuantizedFactor::update_inverse_root() {
  const at::Tensor root = linalg::inverse_root_newton(statistic_.dequantize(),
                                                      static_cast<int>(config_.root_exponent), config_.epsilon);
  if (!root.isfinite().all().item<bool>()) {
    ++failures_;
    return false;
  }
  root_ = QuantizedMatrix::quantize(root, quant_);
  return true;
}

void NaiveQuantizedFactor::save(TensorMap& out, const std::string& prefix) const {
  save_quantized(out, prefix + "statistic.", statistic_);
  save_quantized(out, prefix + "root.", root_);
}

void NaiveQuantizedFactor::load(const TensorMap& in, const std::string& prefix) {
  QuantizedMatrix statistic = load_quantized(in, prefix + "statistic.", {order_, order_}, quant_);
  QuantizedMatrix root = load_quantized(in, prefix + "root.", {order_, order_}, quant_);
  const at::Device device = statistic_.codes().device();
  statistic_ = statistic.to(device);
  root_ = root.to(device);
}

}  // namespace lowbit::precond
