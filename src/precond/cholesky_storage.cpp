#include "precond/cholesky_storage.h"

#include <ATen/ATen.h>

namespace lowbit::precond {
namespace {

at::Tensor strict_lower_indices(int64_t n, const at::Device& device) {
  return at::tril_indices(n, n, -1, at::TensorOptions().dtype(at::kLong).device(device));
}

}  // namespace

QuantOptions triangle_options(QuantOptions quant) {
  quant.keep_diagonal = false;
  return quant;
}

at::Tensor pack_strict_lower(const at::Tensor& m) {
  const int64_t n = m.size(0);
  const at::Tensor idx = strict_lower_indices(n, m.device());
  return m.index({idx[0], idx[1]}).unsqueeze(0).contiguous();
}

at::Tensor unpack_lower(const at::Tensor& packed, const at::Tensor& diagonal) {
  const int64_t n = diagonal.numel();
  at::Tensor out = at::diag(diagonal.to(packed.scalar_type()));
  const at::Tensor idx = strict_lower_indices(n, packed.device());
  out.index_put_({idx[0], idx[1]}, packed.reshape({-1}));
  return out;
}

int64_t QuantizedCholesky::nbytes() const {
  return diagonal.numel() * 4 + (lower.defined() ? lower.nbytes() : 0) + (error.defined() ? error.nbytes() : 0);
}

QuantizedCholesky store_cholesky(const at::Tensor& c, const QuantOptions& quant, bool error_feedback,
                                 double error_decay, const QuantizedCholesky* previous) {
  const QuantOptions options = triangle_options(quant);
  QuantizedCholesky q;
  q.diagonal = c.diagonal().to(at::kFloat).contiguous();
  TORCH_CHECK(c.dim() == 2 && c.size(0) == c.size(1) && c.size(0) >= 2,
              "store_cholesky: needs a square factor of order >= 2; got shape ", c.sizes());
  at::Tensor target = pack_strict_lower(c).to(at::kFloat);
  if (error_feedback && previous != nullptr && previous->error_feedback())
    target = target + previous->error.dequantize();
  q.lower = QuantizedMatrix::quantize(target, options);
  if (error_feedback) {
    const at::Tensor previous_error =
        previous != nullptr && previous->error_feedback() ? previous->error.dequantize() : at::zeros_like(target);
    // What this store lost (target - D(Q(target))), folded into the decayed error state.
    const at::Tensor residual = target - q.lower.dequantize();
    q.error = QuantizedMatrix::quantize(previous_error * error_decay + residual * (1 - error_decay), options);
  }
  return q;
}

at::Tensor reconstruct_factor(const QuantizedCholesky& q) { return unpack_lower(q.lower.dequantize(), q.diagonal); }

}  // namespace lowbit::precond
