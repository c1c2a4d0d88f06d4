#include "linalg/cholesky_qr.h"

#include <ATen/ATen.h>

#include <cfloat>

#include "linalg/matrix_functions.h"

namespace lowbit::linalg {
namespace {

// One batch (or one matrix) on its device; returns the failure mask.
at::Tensor cholesky_qr2_batch(const at::Tensor& q, const at::Tensor& x) {
  at::Tensor y = x.to(at::kDouble);
  // Unit columns; a zero column stays zero (its Gram is then singular and the matrix fails).
  y.div_(at::linalg_vector_norm(y, 2, {-2}, /*keepdim=*/true).clamp_min_(DBL_MIN));
  at::Tensor failed = at::zeros(x.sizes().slice(0, x.dim() - 2), x.options().dtype(at::kBool));
  for (int round = 0; round < 2; ++round) {
    const at::Tensor gram = at::matmul(y.mT(), y);
    if (round == 1) {
      // Y^T Y - I after the first round is about kappa(X D)^2 u64. The second round makes Y
      // orthonormal to working precision only when that is below 1/2 (kappa(X D) below about
      // 0.7 u64^(-1/2) = 5e7); beyond, a Cholesky can still succeed on a Gram that is singular
      // in all but rounding and leave Y far from orthonormal, so such a matrix is reported.
      const at::Tensor identity = at::eye(gram.size(-1), gram.options());
      failed.logical_or_((gram - identity).abs().amax({-2, -1}).gt(0.5));
    }
    const auto [r, info] = at::linalg_cholesky_ex(gram, /*upper=*/true);
    y = at::linalg_solve_triangular(r, y, /*upper=*/true, /*left=*/false);
    failed.logical_or_(info.ne(0));
  }
  failed.logical_or_(finite_matrices(y).logical_not_());
  q.copy_(y);
  return failed;
}

}  // namespace

at::Tensor cholesky_qr2_into(const at::Tensor& q, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-2) >= x.size(-1), "cholesky_qr2_into: x must be [..., n, k] with k <= n; got ",
              x.sizes());
  TORCH_CHECK(q.sizes() == x.sizes(), "cholesky_qr2_into: q ", q.sizes(), " and x ", x.sizes(), " differ in shape");
  if (x.dim() == 2 || !x.is_cpu()) return cholesky_qr2_batch(q, x);
  // A batched CPU Cholesky or solve splits its work over threads by batch position, which
  // would make a matrix's rounding depend on the others in its batch.
  at::Tensor failed = at::empty(x.sizes().slice(0, x.dim() - 2), x.options().dtype(at::kBool));
  for (int64_t i = 0; i < x.size(0); ++i) failed[i].copy_(cholesky_qr2_into(q[i], x[i]));
  return failed;
}

}  // namespace lowbit::linalg
