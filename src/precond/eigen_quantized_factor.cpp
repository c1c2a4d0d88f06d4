#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

QuantOptions with_diagonal(QuantOptions q, bool keep) {
  q.keep_diagonal = keep;
  return q;
}

bool finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

}  // namespace

EigenQuantizedFactor::EigenQuantizedFactor(int64_t order, const at::TensorOptions& device,
                                           const FactorConfig& config)
    : KroneckerFactor(order),
      config_(config),
      vector_quant_(with_diagonal(config.quant, false)),
      root_quant_(with_diagonal(config.quant, true)) {
  const at::Tensor identity = at::eye(order, device.dtype(at::kFloat));
  // Initial state as in the paper: U = I, lambda = eps (so L = eps * I), inverse root = I.
  eigenvectors_t_ = QuantizedMatrix::quantize(identity, vector_quant_);
  eigenvalues_ = at::full({order}, config.epsilon, device.dtype(at::kFloat));
  if (!config.eigenbasis) root_ = QuantizedMatrix::quantize(identity, root_quant_);
}

at::Tensor EigenQuantizedFactor::eigenvectors(int bjorck_steps) const {
  // Stored transposed (rows are eigenvectors); Björck repairs the orthogonality that
  // quantization broke.
  return linalg::bjorck_orthonormalize(eigenvectors_t_.dequantize().t(), bjorck_steps);
}

void EigenQuantizedFactor::update_statistic(const at::Tensor& outer) {
  const at::Tensor v = eigenvectors(config_.bjorck_stat_steps);  // t1 in the paper
  const at::Tensor a = at::matmul(v * eigenvalues_.unsqueeze(0), v.t()).mul_(config_.stat_decay)
                           .add_(outer, 1.0 - config_.stat_decay);
  // The paper replaces a full eigendecomposition by one warm-started subspace step.
  // SOAP (eigenbasis): the first refresh, from the initial state, is a full eigh (see
  // DenseFactor::update_eigenbasis). 4-bit Shampoo keeps the paper's QR step from U = I.
  const bool first_basis = config_.eigenbasis && eigenvalues_.eq(static_cast<float>(config_.epsilon)).all().item<bool>();
  std::optional<linalg::Eigen> e;
  if (config_.eigen_update == EigenUpdate::QrStep && !first_basis) {
    e = linalg::qr_subspace_step(a, v);
  } else {
    e = linalg::eigh_with_fallback(a, config_.eigh);
  }
  if (!e || !finite(e->values) || !finite(e->vectors)) {
    ++failures_;
    return;
  }
  eigenvectors_t_ = QuantizedMatrix::quantize(e->vectors.t().contiguous(), vector_quant_);
  eigenvalues_ = e->values.contiguous();
}

bool EigenQuantizedFactor::update_inverse_root() {
  if (config_.eigenbasis) return true;  // SOAP reads U itself
  const at::Tensor v = eigenvectors(config_.bjorck_root_steps);  // t2 in the paper
  const at::Tensor root = linalg::inverse_root_from_eigen({eigenvalues_, v}, config_.root_exponent,
                                                          config_.epsilon);
  if (!finite(root)) {
    ++failures_;
    return false;
  }
  root_ = QuantizedMatrix::quantize(root, root_quant_);
  return true;
}

at::Tensor EigenQuantizedFactor::inverse_root() const {
  return config_.eigenbasis ? eigenvectors(config_.bjorck_root_steps) : root_.dequantize();
}

at::Tensor EigenQuantizedFactor::statistic() const {
  const at::Tensor v = eigenvectors(0);
  return at::matmul(v * eigenvalues_.unsqueeze(0), v.t());
}

int64_t EigenQuantizedFactor::state_bytes() const {
  return eigenvectors_t_.nbytes() + eigenvalues_.numel() * 4 + (root_.defined() ? root_.nbytes() : 0);
}

void EigenQuantizedFactor::save(TensorMap& out, const std::string& prefix) const {
  save_quantized(out, prefix + "eigenvectors_t.", eigenvectors_t_);
  out[prefix + "eigenvalues"] = eigenvalues_;
  if (root_.defined()) save_quantized(out, prefix + "root.", root_);
}

void EigenQuantizedFactor::load(const TensorMap& in, const std::string& prefix) {
  QuantizedMatrix vectors = load_quantized(in, prefix + "eigenvectors_t.", {order_, order_}, vector_quant_);
  const at::Tensor values = read_entry(in, prefix + "eigenvalues", at::kFloat, {order_});
  QuantizedMatrix root;
  if (!config_.eigenbasis) root = load_quantized(in, prefix + "root.", {order_, order_}, root_quant_);
  const at::Device device = eigenvalues_.device();
  eigenvectors_t_ = vectors.to(device);
  eigenvalues_ = values.to(device).clone();
  if (root.defined()) root_ = root.to(device);
}

}  // namespace lowbit::precond
