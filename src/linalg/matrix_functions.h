// Matrix functions of symmetric positive semi-definite statistics: orthonormalization,
// eigendecomposition (exact, or one warm-started subspace step) and inverse p-th roots.
// Inputs are dense fp32 or fp64 matrices; results keep the input dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <tuple>

namespace lowbit::linalg {

// Björck orthonormalization: `steps` times V <- 1.5 V - 0.5 V V^T V. Each step pulls the
// singular values of V towards 1 (quadratically once they are close).
at::Tensor bjorck_orthonormalize(const at::Tensor& v, int steps);

// A = vectors * diag(values) * vectors^T, eigenvectors as columns.
struct Eigen {
  at::Tensor values;
  at::Tensor vectors;
};

// One warm-started subspace iteration instead of a full eigendecomposition (4-bit Shampoo):
// P = QR(A V).Q ; values = diag(P^T A P).
Eigen qr_subspace_step(const at::Tensor& a, const at::Tensor& v);

// The solver used by eigh_with_fallback; replaceable so failures can be injected in tests.
using EighSolver = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>;
EighSolver default_eigh_solver();

// Symmetric eigendecomposition in the input dtype, retried in fp64 when that throws or
// yields non-finite values; nullopt when both fail (the caller keeps its last good result).
std::optional<Eigen> eigh_with_fallback(const at::Tensor& a, const EighSolver& solver = default_eigh_solver());

// Largest eigenvalue of a symmetric PSD matrix by power iteration.
double max_eigenvalue_power_iteration(const at::Tensor& a, int max_iterations = 100,
                                      double tolerance = 1e-6);

// (values + epsilon * max(values))^(-1/p) in the eigenbasis: V diag(.) V^T. Negative
// eigenvalues (round-off of a PSD matrix) are clamped to zero first.
at::Tensor inverse_root_from_eigen(const Eigen& e, double p, double epsilon);

// A^(-1/p) regularized as (A + epsilon * lambda_max * I)^(-1/p), by eigendecomposition
// (nullopt when it fails) or by the coupled Newton iteration with a power-iteration lambda_max.
std::optional<at::Tensor> inverse_root_eigen(const at::Tensor& a, double p, double epsilon,
                                             const EighSolver& solver = default_eigh_solver());
at::Tensor inverse_root_newton(const at::Tensor& a, int p, double epsilon, int max_iterations = 100,
                               double tolerance = 1e-6);

}  // namespace lowbit::linalg
