// The three KroneckerFactor implementations (constructed through make_factor).
#pragma once

#include "precond/cholesky_storage.h"
#include "precond/kronecker_factor.h"

namespace lowbit::precond {

class DenseFactor final : public KroneckerFactor {
 public:
  DenseFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::Dense; }
  void update_statistic(const at::Tensor& outer) override;
  bool update_inverse_root() override;
  at::Tensor inverse_root() const override { return root_; }
  at::Tensor statistic() const override { return statistic_; }
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  void update_eigenbasis();
  FactorConfig config_;
  at::Tensor statistic_;
  at::Tensor root_;  // the inverse root, or (config.eigenbasis) the eigenbasis
};

// 4-bit Shampoo (Wang et al. 2024): the statistic is kept as eigenvalues (fp32) and its
// eigenvector matrix U, quantized as U^T so every block lies inside one eigenvector; the
// inverse root as an fp32 diagonal plus a quantized off-diagonal. With config.eigenbasis
// (4-bit SOAP) no root is kept: inverse_root() serves U, Björck-rectified (t2 steps).
class EigenQuantizedFactor final : public KroneckerFactor {
 public:
  EigenQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::EigenQuantized; }
  void update_statistic(const at::Tensor& outer) override;
  bool update_inverse_root() override;
  at::Tensor inverse_root() const override;
  at::Tensor statistic() const override;
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  at::Tensor eigenvectors(int bjorck_steps) const;  // dequantized U, rectified
  FactorConfig config_;
  QuantOptions vector_quant_;  // for U^T
  QuantOptions root_quant_;    // for the inverse root (diagonal kept)
  QuantizedMatrix eigenvectors_t_;
  at::Tensor eigenvalues_;
  QuantizedMatrix root_;  // undefined with config.eigenbasis
};

// The paper's naive 4-bit Shampoo: the statistic itself stored as fp32 diagonal +
// quantized off-diagonal; inverse root by power iteration + coupled Newton.
class NaiveQuantizedFactor final : public KroneckerFactor {
 public:
  NaiveQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::NaiveQuantized; }
  void update_statistic(const at::Tensor& outer) override;
  bool update_inverse_root() override;
  at::Tensor inverse_root() const override { return root_.dequantize(); }
  at::Tensor statistic() const override { return statistic_.dequantize(); }
  int64_t state_bytes() const override { return statistic_.nbytes() + root_.nbytes(); }
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;

 private:
  FactorConfig config_;
  QuantOptions quant_;
  QuantizedMatrix statistic_;
  QuantizedMatrix root_;
};

// Cholesky-quantized Shampoo (Li et al. 2024): the statistic as its Cholesky factor (fp32
// diagonal, low-bit strictly lower triangle, optional error feedback; cholesky_storage.h),
// updated as chol(b C~ C~^T + (1 - b)(G G^T + delta I)) in fp64; the reconstruction C~ C~^T is
// positive definite by construction. Inverse root: fp32 diagonal + low-bit off-diagonal.
class CholeskyQuantizedFactor final : public KroneckerFactor {
 public:
  CholeskyQuantizedFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config);
  FactorKind kind() const override { return FactorKind::CholeskyQuantized; }
  void update_statistic(const at::Tensor& outer) override;
  bool update_inverse_root() override;
  at::Tensor inverse_root() const override { return root_.dequantize(); }
  at::Tensor statistic() const override;
  int64_t state_bytes() const override;
  void save(TensorMap& out, const std::string& prefix) const override;
  void load(const TensorMap& in, const std::string& prefix) override;
  const QuantizedCholesky& stored_factor() const { return factor_; }

 private:
  FactorConfig config_;
  QuantOptions root_quant_;
  QuantizedCholesky factor_;
  QuantizedMatrix root_;
};

}  // namespace lowbit::precond
