// Cholesky-quantized Shampoo with error feedback (Li et al., arXiv 2412.10663): the statistic
// is kept as its Cholesky factor (precond/cholesky_storage.h), the inverse root as an fp32
// diagonal plus a low-bit off-diagonal (as the naive method keeps it).
#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

// Jitter ladder for a Cholesky that fails in fp64 (a statistic that lost definiteness only
// by round-off): relative to the largest diagonal entry.
constexpr double kJitter[] = {0.0, 1e-10, 1e-8, 1e-6, 1e-4};

std::optional<at::Tensor> cholesky_with_jitter(const at::Tensor& a) {
  const double scale = a.diagonal().max().item<double>();
  const at::Tensor identity = at::eye(a.size(0), a.options());
  for (const double jitter : kJitter) {
    const auto [factor, info] = at::linalg_cholesky_ex(jitter == 0 ? a : a + identity * (jitter * scale));
    if (info.item<int64_t>() == 0 && factor.isfinite().all().item<bool>()) return factor;
  }
  return std::nullopt;
}

}  // namespace

CholeskyQuantizedFactor::CholeskyQuantizedFactor(int64_t order, const at::TensorOptions& device,
                                                 const FactorConfig& config)
    : KroneckerFactor(order, device, config), root_quant_(config.quant) {
  TORCH_CHECK(order >= 2, "a Cholesky-quantized factor needs order >= 2; got ", order);
  root_quant_.keep_diagonal = true;
  const at::TensorOptions fp32 = device.dtype(at::kFloat);
  // L_0 = epsilon I as for the other factors: C_0 = sqrt(epsilon) I, and no error yet.
  factor_ = store_cholesky(std::sqrt(config.epsilon) * at::eye(order, fp32), config.quant, config.error_feedback,
                           config.error_feedback_decay, nullptr);
  root_ = QuantizedMatrix::quantize(at::eye(order, fp32), root_quant_);
}

at::Tensor CholeskyQuantizedFactor::statistic() const {
  const at::Tensor c = reconstruct_factor(factor_);
  return at::matmul(c, c.t());
}

void CholeskyQuantizedFactor::refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext&) {
  // The jitter ladder of the fp64 Cholesky decides on the host: one factor at a time.
  for (const RefreshItem& item : batch) {
    auto* f = static_cast<CholeskyQuantizedFactor*>(item.factor);
    if (item.side.defined()) f->update_statistic_of(item.side);
    if (item.root) f->update_root();
  }
}

void CholeskyQuantizedFactor::update_statistic_of(const at::Tensor& side_in) {
  // In fp64: S = b C~ C~^T + (1 - b) (G G^T + delta I) with delta = epsilon * max diag, so the
  // factor is that of (L + delta I) and the ridge stays delta at the fixed point.
  const at::Tensor side = side_in.to(at::kDouble);
  const at::Tensor c = reconstruct_factor(factor_).to(at::kDouble);
  at::Tensor a = at::matmul(c, c.t()).mul_(config_.stat_decay);
  if (config_.gram_statistics) {
    a.add_(side, 1.0 - config_.stat_decay);
  } else {
    a.addmm_(side, side.t(), 1.0, 1.0 - config_.stat_decay);
  }
  const double delta = config_.epsilon * a.diagonal().max().item<double>();
  a.diagonal().add_((1.0 - config_.stat_decay) * delta);
  const std::optional<at::Tensor> factor = cholesky_with_jitter(a);
  if (!factor) {
    count_failure(at::ones({}, failures_.options().dtype(at::kBool)));
    return;
  }
  factor_ = store_cholesky(*factor, config_.quant, config_.error_feedback, config_.error_feedback_decay, &factor_);
}

void CholeskyQuantizedFactor::update_root() {
  const std::optional<at::Tensor> root =
      linalg::inverse_root_eigen(statistic(), config_.root_exponent, config_.epsilon, config_.eigh, config_.damping);
  const at::Tensor candidate = root ? root->to(at::kFloat) : at::full({order_, order_}, NAN, failures_.options().dtype(at::kFloat));
  const at::Tensor keep = keep_mask(candidate.unsqueeze(0))[0];
  count_failure(keep.logical_not());
  root_ = QuantizedMatrix::select(keep, QuantizedMatrix::quantize(candidate.nan_to_num(0.0, 0.0, 0.0), root_quant_, FiniteInput::Assumed), root_);
}

int64_t CholeskyQuantizedFactor::state_bytes() const { return factor_.nbytes() + root_.nbytes(); }

void CholeskyQuantizedFactor::save(TensorMap& out, const std::string& prefix) const {
  out[prefix + "cholesky_diagonal"] = factor_.diagonal;
  save_quantized(out, prefix + "cholesky_lower.", factor_.lower);
  if (factor_.error_feedback()) save_quantized(out, prefix + "cholesky_error.", factor_.error);
  save_quantized(out, prefix + "root.", root_);
}

void CholeskyQuantizedFactor::load(const TensorMap& in, const std::string& prefix) {
  const QuantOptions triangle = triangle_options(config_.quant);
  const int64_t packed = order_ * (order_ - 1) / 2;
  QuantizedCholesky staged;
  const at::Tensor diagonal = read_entry(in, prefix + "cholesky_diagonal", at::kFloat, {order_});
  TORCH_CHECK(diagonal.gt(0).all().item<bool>() && diagonal.isfinite().all().item<bool>(), "checkpoint entry \"",
              prefix, "cholesky_diagonal\" must be finite and > 0 (a Cholesky factor's diagonal)");
  staged.lower = load_quantized(in, prefix + "cholesky_lower.", {1, packed}, triangle);
  const std::string error_prefix = prefix + "cholesky_error.";
  const auto first = in.lower_bound(error_prefix);
  const bool has_error = first != in.end() && first->first.rfind(error_prefix, 0) == 0;
  TORCH_CHECK(has_error == config_.error_feedback, "checkpoint entries under \"", prefix, "\" were saved ",
              has_error ? "with" : "without", " error feedback; the optimizer runs ",
              config_.error_feedback ? "with" : "without", " it");
  if (has_error) staged.error = load_quantized(in, error_prefix, {1, packed}, triangle);
  QuantizedMatrix root = load_quantized(in, prefix + "root.", {order_, order_}, root_quant_);
  const at::Device device = root_.codes().device();
  staged.diagonal = diagonal.to(device).clone();
  staged.lower = staged.lower.to(device);
  if (has_error) staged.error = staged.error.to(device);
  factor_ = std::move(staged);
  root_ = root.to(device);
}

}  // namespace lowbit::precond
