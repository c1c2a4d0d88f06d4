// The Shampoo preconditioner of one parameter: its partition into blocks and, for each
// block, a left and a right KroneckerFactor.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "precond/factor_refresh.h"
#include "precond/kronecker_factor.h"
#include "precond/partition.h"

namespace lowbit::precond {

// How a block's two inverse roots are applied to its gradient block G.
enum class Combine {
  Shampoo,  // L^(-1/4) G R^(-1/4) (factor roots with exponent 4)
  Caspr,    // CASPR (Duvvuri et al. 2024), roots L~ = L^(-1/2), R~ = R^(-1/2) (exponent 2):
            // J = L~ G + G R~, U = L~ J + J R~ = (L~ (+) R~)^2 applied to G
  Soap,     // SOAP (Vyas et al. 2024): no root; Adam runs in the factors' eigenbases
            // (factor.eigenbasis), through eigenbases() and rotate() instead of precondition()
};

struct PreconditionerConfig {
  FactorConfig factor;  // root_exponent 4 for Combine::Shampoo, 2 for Combine::Caspr
  Combine combine = Combine::Shampoo;
  FactorKind kind = FactorKind::EigenQuantized;  // for factors of at least min_quant_numel
  int64_t min_quant_numel = 4096;                // smaller factors stay Dense (fp32)
  int64_t max_dim = 1200;
};

class ParameterPreconditioner {
 public:
  ParameterPreconditioner(at::IntArrayRef shape, const at::TensorOptions& device,
                          const PreconditionerConfig& config);

  bool active() const { return partition_.preconditioned(); }
  const Partition& partition() const { return partition_; }

  // Factors are numbered block by block: block b has left 2b and right 2b + 1.
  int64_t factor_count() const { return static_cast<int64_t>(2 * blocks_.size()); }
  KroneckerFactor& factor(int64_t index);
  // Which factors a call works on (one flag per factor); empty: all of them. Distributed
  // runs give each process its share.
  using FactorMask = std::vector<bool>;

  // This step's work on the factors `mask` selects (all when empty), appended to `items` for
  // factor_refresh.h's batched run: statistics L += G G^T, R += G^T G per block (with the
  // exponential decay of the config; the sides are fp32 views of grad's blocks), then, with
  // `roots`, the inverse roots.
  void plan_refresh(const at::Tensor& grad, bool statistics, bool roots, const FactorMask& mask,
                    std::vector<RefreshItem>& items);
  // The same work run at once, on this parameter alone (for tests and tools). A failed root
  // keeps the last good one and is counted in failures().
  void update_statistics(const at::Tensor& grad, const FactorMask& mask = {});
  void update_inverse_roots(const FactorMask& mask = {});
  // L^(-1/4) G R^(-1/4) per block (or CASPR's L~ J + J R~, see Combine), each block
  // rescaled to the Frobenius norm of its gradient block ("grafting by norm"). Same shape
  // and dtype as grad.
  at::Tensor precondition(const at::Tensor& grad) const;

  // SOAP: the eigenbases (Q_L, Q_R) of every block, read once per step.
  using Bases = std::vector<std::pair<at::Tensor, at::Tensor>>;
  Bases eigenbases() const;
  // m (the gradient's shape) taken block by block into the bases, Q_L^T M Q_R (`into`), or
  // back out of them, Q_L M Q_R^T. fp32, shaped like m.
  at::Tensor rotate(const at::Tensor& m, const Bases& bases, bool into) const;
  // A second moment v (diagonal, in the parameter's coordinates) moved into the bases:
  // (Q_L o Q_L)^T V (Q_R o Q_R) per block, the diagonal of Q^T diag(v) Q.
  at::Tensor rotate_second_moment(const at::Tensor& v, const Bases& bases) const;

  int64_t state_bytes() const;
  int64_t failures() const;
  std::vector<const KroneckerFactor*> factors() const;

  // The blocks with their factors, and the gradient as this partition's fp32 matrix (for the
  // batched work of many parameters, batched_precondition.h).
  struct BlockView {
    BlockSlice slice;
    const KroneckerFactor* left;
    const KroneckerFactor* right;
  };
  std::vector<BlockView> block_views() const;
  at::Tensor as_matrix(const at::Tensor& grad) const;
  const PreconditionerConfig& config() const { return config_; }

  void save(TensorMap& out) const;
  // Validates every entry first; on error the preconditioner is unchanged.
  void load(const TensorMap& in);

 private:
  struct Block {
    BlockSlice slice;
    std::unique_ptr<KroneckerFactor> left, right;
  };
  void check_mask(const FactorMask& mask) const;
  Partition partition_;
  std::vector<Block> blocks_;
  PreconditionerConfig config_;
  at::TensorOptions device_;  // where the factors live (the parameter's device)
};

}  // namespace lowbit::precond
