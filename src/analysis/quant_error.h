// The error analysis of the 4-bit Shampoo paper (Table 1): how far a low-bit approximation
// g(A) of f(A) = (A + epsilon * lambda_max * I)^(-1/4) lands from the fp64 reference, when
// A itself is quantized (the naive method) or only its eigenvectors are (with and without
// Björck rectification). docs/quant_error.md describes the matrices and the results.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lowbit::analysis {

// Synthetic SPD test matrices A = Q diag(lambda) Q^T, Q orthogonal from the QR of a seeded
// Gaussian matrix (fp64). Spectra, i = 0..n-1, largest first:
//   geometric-1e2, -1e4, -1e6  lambda_i = cond^(-i/(n-1)): log-spaced from 1 down to 1/cond
//   fast-decay                 lambda_i = (i+1)^-4
//   two-clusters               lambda_i = 1 for i < n/2, 1e-3 otherwise (the paper's A2)
const std::vector<std::string>& synthetic_matrix_names();
// The eigenvalues of the named matrix (fp64, descending); throws c10::Error for an unknown
// name or order < 1.
at::Tensor synthetic_spectrum(const std::string& name, int64_t order);
at::Tensor synthetic_spd_matrix(const std::string& name, int64_t order, uint64_t seed);

// f(A) = (A + epsilon * lambda_max * I)^(-1/4) in fp64 by eigendecomposition.
at::Tensor reference_inverse_fourth_root(const at::Tensor& a, double epsilon);

// ||f - g||_F / ||f||_F.
double normalized_relative_error(const at::Tensor& f, const at::Tensor& g);
// arccos(<f, g> / (||f||_F ||g||_F)) in degrees.
double angle_error_deg(const at::Tensor& f, const at::Tensor& g);

struct QuantErrorRow {
  std::string matrix;
  std::string mapping;    // "linear2" | "dynamic"
  int bits = 4;
  // "matrix" (A itself, naive) | "eigenvectors" | "eigenvectors+root" (the root made from them,
  // rectified, then quantized itself: what the paper's 4-bit Shampoo stores) | "cholesky"
  std::string quantized;
  bool rectified = false; // Björck (4 steps) applied to the dequantized eigenvectors
  double nre = 0;
  double angle_deg = 0;
  // cholesky: how many stores the factor went through (1, or a chain of EMA updates towards
  // A, where errors compound), and whether error feedback was on.
  int updates = 1;
  bool error_feedback = false;
};

// The chain length of the Cholesky rows with updates (stat_decay 0.95: about three time
// constants, so an error that compounds has time to show).
constexpr int kCholeskyChainUpdates = 60;

struct QuantErrorOptions {
  int64_t order = 1200;
  int64_t block_size = 64;
  double epsilon = 1e-4;  // the paper's error analysis (its training default is 1e-6)
  uint64_t seed = 0;
  std::vector<std::string> matrices = synthetic_matrix_names();
};

// Rows for one SPD matrix: mappings {linear2, dynamic} x bits {8, 4, 3} x methods
// {matrix, eigenvectors, eigenvectors + Björck, eigenvectors + Björck + quantized root,
// cholesky (one store), cholesky after
// kCholeskyChainUpdates updates without and with error feedback}, in that nesting order;
// then mapping kashin x bits {4, 3} x the four non-Cholesky methods.
std::vector<QuantErrorRow> quant_error_rows(const std::string& label, const at::Tensor& a,
                                            int64_t block_size, double epsilon);
// quant_error_rows of every synthetic matrix in options.matrices.
std::vector<QuantErrorRow> quant_error_table(const QuantErrorOptions& options);

}  // namespace lowbit::analysis
