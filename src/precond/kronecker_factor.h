// One Kronecker factor of a Shampoo block: the statistic of one side (L = sum G G^T, or
// R = sum G^T G) and its inverse root. One interface, four ways to store it.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>

#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>

#include "linalg/matrix_functions.h"

namespace lowbit::precond {

using TensorMap = std::map<std::string, at::Tensor>;

enum class FactorKind {
  Dense,           // fp32 statistic and fp32 inverse root
  EigenQuantized,  // 4-bit Shampoo: quantized eigenvectors + fp32 eigenvalues
  NaiveQuantized,  // the paper's baseline: statistic itself quantized (fp32 diagonal)
  CholeskyQuantized,  // Li et al. 2024: Cholesky factor, fp32 diagonal, low-bit triangle (+ error feedback)
};
std::string to_string(FactorKind kind);

enum class RootMethod { Eigen, Newton };

// How 4-bit Shampoo refreshes its eigenbasis after a statistics update.
enum class EigenUpdate {
  QrStep,          // the paper: one warm-started subspace iteration (cheap, tracks slowly)
  QrStepCholesky,  // the same step, its QR by CholeskyQR2 (batched products: for GPUs)
  Eigh,            // a full symmetric eigendecomposition of the updated statistic
};

// Whether the refresh is the paper's subspace step, and how that step orthonormalizes.
inline bool is_qr_step(EigenUpdate u) { return u != EigenUpdate::Eigh; }
inline linalg::Orthonormalization orthonormalization(EigenUpdate u) {
  return u == EigenUpdate::QrStepCholesky ? linalg::Orthonormalization::CholeskyQr2
                                          : linalg::Orthonormalization::Householder;
}
// The option's value ("qr", "cholesky_qr", "eigh"), already validated.
inline EigenUpdate parse_eigen_update(const std::string& name) {
  return name == "eigh" ? EigenUpdate::Eigh : name == "cholesky_qr" ? EigenUpdate::QrStepCholesky : EigenUpdate::QrStep;
}

struct FactorConfig {
  double stat_decay = 0.95;   // beta
  double epsilon = 1e-6;      // relative to lambda_max
  double root_exponent = 4;   // p in A^(-1/p): 4 for a Shampoo block, 2 for CASPR
  RootMethod root_method = RootMethod::Eigen;
  QuantOptions quant;         // bits, mapping, block size of quantized factors
  int bjorck_stat_steps = 1;  // t1
  int bjorck_root_steps = 4;  // t2
  EigenUpdate eigen_update = EigenUpdate::QrStep;
  linalg::EighSolver eigh = linalg::default_eigh_solver();
  bool error_feedback = true;        // CholeskyQuantized: keep the error-feedback state
  double error_feedback_decay = 0.0; // its b_e (0: classic error feedback, measured best)
  // SOAP: the factor serves its eigenbasis (columns, fp32) instead of an inverse root;
  // update_inverse_root then does nothing (the basis follows the statistics updates).
  bool eigenbasis = false;
  // EigenQuantized: keep no inverse root, and serve U diag((lambda + eps)^(-1/p)) U^T from the
  // stored eigenvectors (t1 Björck steps) and eigenvalues whenever the root is read. One
  // rounding instead of two (the root is not quantized a second time) and no root state, for
  // one more n^3 product per step; the root follows every statistics update (T2 unused).
  bool eigen_form_root = false;
  // K-FAC / AdaBK: update_statistic receives the n x n statistic itself (E[a a^T] of a layer's
  // inputs, accumulated as the batch passes) instead of a side whose product it is.
  bool gram_statistics = false;
  // An absolute Tikhonov term added to the relative ridge epsilon * lambda_max: roots are of
  // (A + (epsilon lambda_max + damping) I). K-FAC's lambda; Shampoo keeps 0.
  double damping = 0;
};

class KroneckerFactor {
 public:
  virtual ~KroneckerFactor() = default;
  virtual FactorKind kind() const = 0;
  int64_t order() const { return order_; }
  const FactorConfig& config() const { return config_; }
  const at::Device& device() const { return device_; }

  // One factor's refresh, as a batch of one (factor_refresh.h batches many):
  // statistic <- beta * statistic + (1 - beta) * side side^T, with side the n x k fp32 block
  // of the gradient on this factor's side (G for a left factor, G^T for a right one); with
  // config.gram_statistics, side is the n x n product itself.
  void update_statistic(const at::Tensor& side);
  // Recomputes the inverse root. A failed refresh (a decomposition that throws, or a result
  // that is not finite) keeps the last good state and is counted in failures().
  void update_inverse_root();
  // The current inverse root as a dense fp32 n x n matrix (identity before the first update).
  virtual at::Tensor inverse_root() const = 0;
  // The statistic as a dense fp32 matrix (for inspection and tests).
  virtual at::Tensor statistic() const = 0;
  // tr(statistic) as an fp32 scalar on the device, from the fp32 part of the stored state where
  // the kind has one (K-FAC's pi-damping reads it): the diagonal's sum by default (exact for
  // dense, and for naive 4-bit whose diagonal is fp32); the eigenvalues' sum for eigen-quantized.
  virtual at::Tensor trace() const { return statistic().diagonal().sum(); }
  // Replaces the absolute damping (FactorConfig::damping) used by the next inverse-root refresh:
  // K-FAC's factored pi-damping gives each factor its own lambda, recomputed at every refresh.
  void set_damping(double damping);
  // The inverse root as stored at low bits, or nullptr (dense roots, SOAP's bases): lets the
  // roots of many factors be decoded with one codec call.
  virtual const QuantizedMatrix* quantized_root() const { return nullptr; }

  virtual int64_t state_bytes() const = 0;
  // Named tensors under `prefix`; load validates shapes and leaves the factor unchanged on error.
  virtual void save(TensorMap& out, const std::string& prefix) const = 0;
  virtual void load(const TensorMap& in, const std::string& prefix) = 0;

  // Refreshes that failed and kept the last good state. The count lives on the factor's
  // device (refreshes never wait for the host), so reading it synchronises with a GPU.
  int64_t failures() const;
  // Adds `failed` (a bool scalar on the device) to the count.
  void count_failure(const at::Tensor& failed);

 protected:
  KroneckerFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  int64_t order_;
  FactorConfig config_;
  at::Device device_;
  at::Tensor failures_;  // int64 scalar on device_
};

std::unique_ptr<KroneckerFactor> make_factor(FactorKind kind, int64_t order, const at::TensorOptions& device,
                                             const FactorConfig& config);

// Reads `prefix + name` from a saved map, checking dtype and shape; names the entry on error.
at::Tensor read_entry(const TensorMap& in, const std::string& key, at::ScalarType dtype,
                      at::IntArrayRef shape);
// Save / load a quantized matrix under `prefix` (one entry per tensor of its state()).
void save_quantized(TensorMap& out, const std::string& prefix, const QuantizedMatrix& q);
QuantizedMatrix load_quantized(const TensorMap& in, const std::string& prefix, at::IntArrayRef shape,
                               const QuantOptions& expected);

}  // namespace lowbit::precond
