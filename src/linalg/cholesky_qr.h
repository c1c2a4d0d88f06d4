// CholeskyQR2 (Yamamoto et al. 2015): the Q of a QR decomposition from two rounds of
// Gram product, Cholesky and triangular solve. Batched products and small factorizations
// instead of one Householder QR per matrix: meant for GPUs, where a batch of cuSOLVER QRs
// runs one matrix after another.
#pragma once

#include <ATen/core/Tensor.h>

namespace lowbit::linalg {

// Writes into q ([..., n, k], k <= n, q's dtype; may be a column-major view) the Q of the QR
// decomposition of each x ([..., n, k]), with R's diagonal positive. Works in fp64 on x with
// unit columns (QR(X D) has X's Q for a positive diagonal D, so scaling only removes the
// columns' spread from the condition number), which is exact to fp32 for condition numbers
// up to about 5e7 after that scaling (fp64's u^(-1/2) is 6.7e7). Returns a bool [...]: true
// where x is beyond that (a Gram not positive definite in fp64, or the first round's result
// further than 1/2 from orthonormal) or the result is not finite; q is then undefined there,
// for the caller to replace.
// On a CPU each matrix is worked alone, so its result does not depend on its batch.
at::Tensor cholesky_qr2_into(const at::Tensor& q, const at::Tensor& x);

}  // namespace lowbit::linalg
