// Matrix functions of symmetric positive semi-definite statistics: orthonormalization,
// eigendecomposition (exact, or one warm-started subspace step) and inverse p-th roots.
// Inputs are dense fp32 or fp64 matrices, or batches of them ([..., n, n]); results keep the
// input dtype. The batched forms take their temporaries from a Workspace and make no host
// synchronisation, so they can run inside a GPU step without waiting for it.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <tuple>

#include "linalg/workspace.h"

namespace lowbit::linalg {

// out = beta out + alpha a b for batches ([B, n, k] x [B, k, m], or single matrices), with
// beta 0 meaning out = alpha a b whatever out held. One batched call on a GPU. On the CPU each
// matrix of the batch is multiplied alone, by the BLAS call a single product makes: a batched
// CPU BLAS call splits its work over threads by batch position, which changes the rounding,
// and a factor's result must not depend on which others share its batch (distributed ranks
// batch different factors and reproduce one process bit for bit).
void matmul_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0,
                 double beta = 0.0);

// A bool [...] for x [..., n, m]: whether every value of each matrix is finite, read on the
// device. Finite exactly when the largest and the smallest value are (max and min propagate
// NaN, and an infinity is one of the two): two reductions that allocate nothing the size of
// x, where isfinite() would make full-size passes, a bool copy and, for a column-major x, a
// flattening copy (6 ms against 0.5 ms for two order-1024 matrices on a 2-core CPU).
at::Tensor finite_matrices(const at::Tensor& x);

// Björck orthonormalization: `steps` times V <- 1.5 V - 0.5 V V^T V. Each step pulls the
// singular values of V towards 1 (quadratically once they are close).
at::Tensor bjorck_orthonormalize(const at::Tensor& v, int steps);
// The same in place on x ([..., n, m], may be a transposed view), with the two products in
// workspace slots `slot` and `slot + 1`.
void bjorck_orthonormalize_(const at::Tensor& x, int steps, Workspace& workspace, int slot);

// A = vectors * diag(values) * vectors^T, eigenvectors as columns.
struct Eigen {
  at::Tensor values;
  at::Tensor vectors;
};

// How the subspace step orthonormalizes A V: LAPACK's / cuSOLVER's Householder QR, one matrix
// at a time, or CholeskyQR2 in fp64 (linalg/cholesky_qr.h: batched products and Choleskys),
// with the Householder QR for the matrices it cannot take (one host read per call to find
// them). Both give the same Q up to rounding and the signs of its columns.
enum class Orthonormalization { Householder, CholeskyQr2 };

// One warm-started subspace iteration instead of a full eigendecomposition (4-bit Shampoo):
// P = QR(A V).Q ; values = diag(P^T A P).
Eigen qr_subspace_step(const at::Tensor& a, const at::Tensor& v);
// The same, batched, into given tensors: P into `vectors` ([..., n, n]), diag(P^T A P) into
// `values` ([..., n]); A V and A P use workspace slot `slot` (Q is formed without R). Fastest
// with a column-major `vectors` (vectors.mT() contiguous), which LAPACK writes in place.
void qr_subspace_step_out(const at::Tensor& a, const at::Tensor& v, const at::Tensor& vectors,
                          const at::Tensor& values, Workspace& workspace, int slot,
                          Orthonormalization method = Orthonormalization::Householder);

// The solver used by eigh_with_fallback; replaceable so failures can be injected in tests.
using EighSolver = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>;
EighSolver default_eigh_solver();

// Symmetric eigendecomposition in the input dtype, retried in fp64 when that throws or
// yields non-finite values; nullopt when both fail (the caller keeps its last good result).
std::optional<Eigen> eigh_with_fallback(const at::Tensor& a, const EighSolver& solver = default_eigh_solver());

// Batched ([..., n, n]) symmetric eigendecomposition that never synchronises on its own
// account: in the input dtype, then in fp64 when the solver throws, then each matrix alone;
// a matrix that fails every try comes back as NaN, for the caller to mask. Results keep the
// input dtype.
Eigen eigh_batched(const at::Tensor& a, const EighSolver& solver = default_eigh_solver());

// Largest eigenvalue of a symmetric PSD matrix by power iteration.
double max_eigenvalue_power_iteration(const at::Tensor& a, int max_iterations = 100,
                                      double tolerance = 1e-6);

// (values + epsilon * max(values))^(-1/p) in the eigenbasis: V diag(.) V^T. Negative
// eigenvalues (round-off of a PSD matrix) are clamped to zero first. Batched: each matrix
// takes its own lambda_max (epsilon itself when lambda_max is 0), on the device.
at::Tensor inverse_root_from_eigen(const Eigen& e, double p, double epsilon, double damping = 0);
// The diagonal of that root in the eigenbasis: (max(values, 0) + ridge)^(-1/p), [..., n];
// `damping` (K-FAC's absolute Tikhonov term) is added to the ridge.
at::Tensor inverse_root_spectrum(const at::Tensor& values, double p, double epsilon, double damping = 0);
// out = V diag(d) V^T ([..., n, n]), V * d in workspace slot `slot`.
void recompose_out(const at::Tensor& out, const at::Tensor& vectors, const at::Tensor& d, Workspace& workspace,
                   int slot);

// A^(-1/p) regularized as (A + epsilon * lambda_max * I)^(-1/p), by eigendecomposition
// (nullopt when it fails) or by the coupled Newton iteration with a power-iteration lambda_max.
// `damping` is an absolute term added to the ridge (K-FAC's lambda).
std::optional<at::Tensor> inverse_root_eigen(const at::Tensor& a, double p, double epsilon,
                                             const EighSolver& solver = default_eigh_solver(), double damping = 0);
at::Tensor inverse_root_newton(const at::Tensor& a, int p, double epsilon, int max_iterations = 100,
                               double tolerance = 1e-6, double damping = 0);

}  // namespace lowbit::linalg
