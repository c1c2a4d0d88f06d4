// The four KroneckerFactor implementations (constructed through make_factor). Each kind's
// static refresh() runs a batch of its factors (factor_refresh.h); the per-factor
// update_statistic / update_inverse_root of the base class are batches of one.
#pragma once

#include <c10/util/ArrayRef.h>

#include "precond/cholesky_storage.h"
#include "precond/factor_refresh.h"
#include "precond/kronecker_factor.h"

namespace lowbit::precond {

class DenseFactor final : public KroneckerFactor {
 public:
  DenseFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::Dense; }
  static void refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context);
  at::Tensor inverse_root() const override { return root_; }
  at::Tensor statistic() const override { return statistic_; }
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  static void update_statistics(c10::ArrayRef<DenseFactor*> batch, c10::ArrayRef<at::Tensor> sides,
                                RefreshContext& context);
  static void update_eigenbases(c10::ArrayRef<DenseFactor*> batch, RefreshContext& context);
  static void update_roots(c10::ArrayRef<DenseFactor*> batch, RefreshContext& context);
  at::Tensor statistic_;
  at::Tensor root_;         // the inverse root, or (config.eigenbasis) the eigenbasis
  bool has_basis_ = false;  // eigenbasis: refreshed at least once (the first refresh is a full eigh)
};

// 4-bit Shampoo (Wang et al. 2024): the statistic is kept as eigenvalues (fp32) and its
// eigenvector matrix U, quantized as U^T so every block lies inside one eigenvector; the
// inverse root as an fp32 diagonal plus a quantized off-diagonal. With config.eigenbasis
// (4-bit SOAP) no root is kept: inverse_root() serves U, Björck-rectified (t2 steps); with
// config.eigen_form_root neither: inverse_root() serves U diag(lambda^(-1/p)) U^T.
class EigenQuantizedFactor final : public KroneckerFactor {
 public:
  EigenQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::EigenQuantized; }
  static void refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context);
  at::Tensor inverse_root() const override;
  at::Tensor statistic() const override;
  // The eigenvalues are the fp32 part: their sum, not the trace of the dequantized U diag U^T.
  at::Tensor trace() const override { return eigenvalues_.sum(); }
  const QuantizedMatrix* quantized_root() const override { return root_.defined() ? &root_ : nullptr; }
  // With config.eigen_form_root: the roots of a batch (one order) into out [B, n, n] (batched
  // dequantization, Björck and recomposition; workspace slots slot .. slot + 2).
  static void eigen_form_roots_into(c10::ArrayRef<const EigenQuantizedFactor*> batch, const at::Tensor& out,
                                    linalg::Workspace& workspace, int slot);
  bool keeps_root() const { return !config_.eigenbasis && !config_.eigen_form_root; }
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  // The fp32 result of a batch's statistics update, before it is stored at low bits.
  struct Refreshed {
    at::Tensor vectors;  // [B, n, n], eigenvectors as columns (in the workspace)
    at::Tensor values;   // [B, n]
    at::Tensor keep;     // [B] bool: the update was stored
  };
  static Refreshed update_statistics(c10::ArrayRef<EigenQuantizedFactor*> batch, c10::ArrayRef<at::Tensor> sides,
                                     RefreshContext& context);
  // Roots from eigenvectors `vectors` ([B, n, n], columns) and eigenvalues `values`; factors
  // where `usable` (when defined) is false keep their root.
  static void update_roots(c10::ArrayRef<EigenQuantizedFactor*> batch, const at::Tensor& vectors,
                           const at::Tensor& values, const at::Tensor& usable, RefreshContext& context);
  // The dequantized eigenvectors of every factor as columns, [B, n, n] in workspace slot
  // `slot` (+1, +2 for Björck's products), rectified by `bjorck_steps` Björck steps.
  static at::Tensor eigenvectors(c10::ArrayRef<const EigenQuantizedFactor*> batch, int bjorck_steps,
                                 linalg::Workspace& workspace, int slot);
  at::Tensor eigenvectors(int bjorck_steps) const;  // one factor's, freshly allocated
  QuantOptions vector_quant_;  // for U^T
  QuantOptions root_quant_;    // for the inverse root (diagonal kept)
  QuantizedMatrix eigenvectors_t_;
  at::Tensor eigenvalues_;
  QuantizedMatrix root_;    // undefined unless keeps_root()
  bool has_basis_ = false;  // eigenbasis: refreshed at least once (the first refresh is a full eigh)
};

// The paper's naive 4-bit Shampoo: the statistic itself stored as fp32 diagonal +
// quantized off-diagonal; inverse root by power iteration + coupled Newton. Its statistics
// are refreshed in batches; its roots one factor at a time (the Newton iteration decides its
// stopping point on the host).
class NaiveQuantizedFactor final : public KroneckerFactor {
 public:
  NaiveQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::NaiveQuantized; }
  static void refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context);
  at::Tensor inverse_root() const override { return root_.dequantize(); }
  at::Tensor statistic() const override { return statistic_.dequantize(); }
  const QuantizedMatrix* quantized_root() const override { return &root_; }
  int64_t state_bytes() const override { return statistic_.nbytes() + root_.nbytes(); }
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  void update_root();
  QuantOptions quant_;
  QuantizedMatrix statistic_;
  QuantizedMatrix root_;
};

// Cholesky-quantized Shampoo (Li et al. 2024): the statistic as its Cholesky factor (fp32
// diagonal, low-bit strictly lower triangle, optional error feedback; cholesky_storage.h),
// updated as chol(b C~ C~^T + (1 - b)(G G^T + delta I)) in fp64; the reconstruction C~ C~^T is
// positive definite by construction. Inverse root: fp32 diagonal + low-bit off-diagonal.
// Refreshed one factor at a time (the jitter ladder of its fp64 Cholesky decides on the host).
class CholeskyQuantizedFactor final : public KroneckerFactor {
 public:
  CholeskyQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::CholeskyQuantized; }
  static void refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context);
  at::Tensor inverse_root() const override { return root_.dequantize(); }
  at::Tensor statistic() const override;
  const QuantizedMatrix* quantized_root() const override { return &root_; }
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;
  const QuantizedCholesky& stored_factor() const { return factor_; }

 private:
  void update_statistic_of(const at::Tensor& side);
  void update_root();
  QuantOptions root_quant_;
  QuantizedCholesky factor_;
  QuantizedMatrix root_;
};

// The factors of a batch as their kind (every item's factor must be of kind F).
template <typename F>
std::vector<F*> factors_as(c10::ArrayRef<RefreshItem> batch) {
  std::vector<F*> out;
  for (const RefreshItem& item : batch) out.push_back(static_cast<F*>(item.factor));
  return out;
}

}  // namespace lowbit::precond
