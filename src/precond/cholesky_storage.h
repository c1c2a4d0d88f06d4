// The storage of Cholesky-quantized Shampoo (Li et al., "Memory-Efficient 4-bit Preconditioned
// Stochastic Optimization", arXiv 2412.10663): a statistic S = C C^T kept as its lower
// triangular Cholesky factor C, with
//   - the diagonal of C in fp32 (always positive, so the reconstruction C~ C~^T is positive
//     definite whatever the off-diagonal rounding does: det C~ = prod diag != 0);
//   - the strictly lower triangle at low bits;
//   - optionally the error-feedback state E (strictly lower too) at low bits, in the triangle
//     C does not use: E_k = b_e E_{k-1} + (1 - b_e) (C_k + E_{k-1} - D(Q(C_k + E_{k-1}))), and
//     what is stored for C_k is Q(C_k + E_{k-1}).
// Each triangle is packed row by row into one 1 x n(n-1)/2 code row with its own block
// scales (a block never mixes factor and error values, whose magnitudes differ by orders);
// the two triangles together take the bytes of one n x n low-bit matrix.
#pragma once

#include <ATen/core/Tensor.h>

#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>

namespace lowbit::precond {

// The strictly lower triangle of a square matrix, row by row, as a [1, n(n-1)/2] row.
at::Tensor pack_strict_lower(const at::Tensor& m);
// The n x n matrix with that strictly lower triangle, `diagonal` on the diagonal, zero above.
at::Tensor unpack_lower(const at::Tensor& packed, const at::Tensor& diagonal);

struct QuantizedCholesky {
  at::Tensor diagonal;      // fp32 [n], > 0
  QuantizedMatrix lower;    // [1, n(n-1)/2]: the stored Q(C + E)
  QuantizedMatrix error;    // [1, n(n-1)/2]: E; undefined without error feedback
  int64_t order() const { return diagonal.numel(); }
  bool error_feedback() const { return error.defined(); }
  int64_t nbytes() const;
};

// Stores the lower triangular factor c (fp32 or fp64, positive diagonal). With
// `error_feedback`, `previous` supplies E_{k-1} (nullptr or a state without error: E = 0) and
// the result carries E_k, with decay `error_decay` (b_e). quant.keep_diagonal is ignored.
QuantizedCholesky store_cholesky(const at::Tensor& c, const QuantOptions& quant, bool error_feedback,
                                 double error_decay, const QuantizedCholesky* previous);

// C~: the stored factor as a lower triangular fp32 matrix.
at::Tensor reconstruct_factor(const QuantizedCholesky& q);

// The quantization options of the packed triangles: `quant` without a kept diagonal.
QuantOptions triangle_options(QuantOptions quant);

}  // namespace lowbit::precond
