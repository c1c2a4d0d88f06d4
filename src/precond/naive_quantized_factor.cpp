#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {

NaiveQuantizedFactor::NaiveQuantizedFactor(int64_t order, const at::TensorOptions& device,
                                           const FactorConfig& config)
    : KroneckerFactor(order, device, config), quant_(config.quant) {
  quant_.keep_diagonal = true;  // fp32 diagonal, quantized off-diagonal
  const at::Tensor identity = at::eye(order, device.dtype(at::kFloat));
  statistic_ = QuantizedMatrix::quantize(config.epsilon * identity, quant_);
  root_ = QuantizedMatrix::quantize(identity, quant_);
}

void NaiveQuantizedFactor::refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context) {
  std::vector<NaiveQuantizedFactor*> statistics;
  std::vector<at::Tensor> sides;
  for (const RefreshItem& item : batch)
    if (item.side.defined()) {
      statistics.push_back(static_cast<NaiveQuantizedFactor*>(item.factor));
      sides.push_back(item.side);
    }
  if (!statistics.empty()) {
    // A = beta D(Q(A)) + (1 - beta) side side^T for the whole batch, stored again at low bits.
    const NaiveQuantizedFactor& first = *statistics.front();
    const int64_t count = static_cast<int64_t>(statistics.size()), n = first.order_;
    const at::TensorOptions fp32 = at::TensorOptions(first.device_).dtype(at::kFloat);
    at::Tensor candidates = context.workspace->take(0, {count, n, n}, fp32);
    outer_products(sides, candidates, first.config_.gram_statistics);
    at::Tensor previous = context.workspace->take(1, {count, n, n}, fp32);
    std::vector<const QuantizedMatrix*> stored;
    for (const NaiveQuantizedFactor* f : statistics) stored.push_back(&f->statistic_);
    QuantizedMatrix::dequantize_stack(stored, previous);
    candidates.mul_(1.0 - first.config_.stat_decay).add_(previous, first.config_.stat_decay);
    const at::Tensor keep = keep_mask(candidates), failed = keep.logical_not();
    const std::vector<QuantizedMatrix> coded = QuantizedMatrix::quantize_stack(candidates.nan_to_num_(0.0, 0.0, 0.0), first.quant_,
                                                                                    FiniteInput::Assumed);
    for (int64_t i = 0; i < count; ++i) {
      NaiveQuantizedFactor& f = *statistics[static_cast<size_t>(i)];
      f.statistic_ = QuantizedMatrix::select(keep[i], coded[static_cast<size_t>(i)], f.statistic_);
      f.count_failure(failed[i]);
    }
  }
  // The coupled Newton iteration decides when to stop on the host: one factor at a time.
  for (const RefreshItem& item : batch)
    if (item.root) static_cast<NaiveQuantizedFactor*>(item.factor)->update_root();
}

void NaiveQuantizedFactor::update_root() {
  const at::Tensor root = linalg::inverse_root_newton(statistic_.dequantize(), static_cast<int>(config_.root_exponent),
                                                      config_.epsilon, 100, 1e-6, config_.damping);
  const at::Tensor keep = keep_mask(root.unsqueeze(0))[0];
  count_failure(keep.logical_not());
  root_ = QuantizedMatrix::select(keep, QuantizedMatrix::quantize(root.nan_to_num(0.0, 0.0, 0.0), quant_, FiniteInput::Assumed), root_);
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
