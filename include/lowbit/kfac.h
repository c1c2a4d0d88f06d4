// lowbit::KFAC (Martens & Grosse 2015; KFC for convolutions) and lowbit::AdaBK (Yong, Sun &
// Zhang, CVPR 2023) over the layer statistics of lowbit/layer_statistics.h, with the factors
// stored as any of lowbit's Kronecker factor kinds (fp32, 4-bit eigenvector-quantized, naive
// 4-bit). For each layer with homogeneous gradient matrix D = [dW, db] (out x in+1):
//   every stat_interval steps (T1): A = b A + (1 - b) A_batch, G = b G + (1 - b) G_batch
//   every root_interval steps (T2): the factors' inverse roots
//   K-FAC:  D' = (G + lambda I)^-1 D (A + lambda I)^-1               (root_exponent 1)
//           or, damping_mode "pi": (G + lambda / pi I)^-1 D (A + pi lambda I)^-1
//   AdaBK:  D' = (G + e_G g_max I)^-1/2 D (A + e_A a_max I)^-1/2,  D' *= ||D|| / (||D'|| + 1e-12)
// then the first-order rule ("sgdm": coupled weight decay, momentum; "adamw": decoupled weight
// decay) on D' for layer weights and on the plain gradient for every other parameter.
// docs/kfac.md maps every symbol to an option.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <lowbit/layer_statistics.h>
#include <lowbit/state_bytes.h>

namespace lowbit {
namespace precond {
class KroneckerFactor;
}

struct KfacOptions : public torch::optim::OptimizerCloneableOptions<KfacOptions> {
  KfacOptions(double lr = 0.01);
  TORCH_ARG(double, lr) = 0.01;
  TORCH_ARG(std::string, rule) = "sgdm";  // first-order rule: "sgdm" | "adamw"
  TORCH_ARG(double, momentum) = 0.9;      // sgdm
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);  // adamw
  TORCH_ARG(double, eps) = 1e-8;                            // adamw
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(double, stat_decay) = 0.9;       // beta of the factors' EMA
  TORCH_ARG(int64_t, stat_interval) = 200;   // T1: steps between statistics captures
  TORCH_ARG(int64_t, root_interval) = 2000;  // T2: steps between inverse-root refreshes
  // K-FAC: lambda, absolute Tikhonov damping of each factor. The product's damping is about
  // lambda^2: 0.03 matches the 1e-3 that K-FAC codes add to G (x) A's eigenvalues (docs/kfac.md).
  TORCH_ARG(double, damping) = 0.03;
  // K-FAC: how lambda is shared between the factors. "tikhonov": A + lambda I and G + lambda I;
  // "pi": factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3), A + pi lambda I and
  // G + (lambda / pi) I with pi = sqrt((tr(A) / dim A) / (tr(G) / dim G)), recomputed at each
  // inverse-root refresh (T2). AdaBK's dampening is relative and takes only "tikhonov".
  TORCH_ARG(std::string, damping_mode) = "tikhonov";
  // AdaBK: e_A, e_G, relative to A's / G's largest eigenvalue. 1e-3, not the public code's
  // nominal 1e-5: its roots (10 Newton-Schulz steps from F / tr F) cap the amplification at
  // 1.5^10 ~ 58 / sqrt(tr F), a dampening of ~ 3e-4 tr F >= 3e-4 lambda_max; with exact roots
  // 1e-5 lets unseen directions dominate the step (docs/kfac.md, "Dampening").
  TORCH_ARG(double, damping_input) = 1e-3;
  TORCH_ARG(double, damping_output) = 1e-3;
  TORCH_ARG(double, kl_clip) = 0;            // K-FAC: KL clipping kappa (0: off)
  TORCH_ARG(std::string, factor) = "dense";  // "dense" (fp32) | "eigen4" | "naive4"
  TORCH_ARG(int64_t, bjorck_steps) = 0;      // eigen4: Björck rectification steps (t1 = t2)
  // eigen4: how a statistics update refreshes the stored eigenvectors: "qr" (the 4-bit Shampoo
  // paper's warm-started subspace step) | "cholesky_qr" (that step with its QR by CholeskyQR2,
  // for GPUs) | "eigh" (a full decomposition, exact but O(n^3) per T1).
  TORCH_ARG(std::string, eigen_update) = "qr";
  TORCH_ARG(bool, skip_nonfinite) = false;   // skip (and count) a step with a non-finite gradient instead of raising

 public:
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

// What K-FAC and AdaBK share; construct one of the two below.
class KroneckerLayerOptimizer : public torch::optim::Optimizer {
 public:
  ~KroneckerLayerOptimizer() override;
  // The forward / backward recording the optimizer reads at step(); give it to the model.
  const std::shared_ptr<LayerStatistics>& statistics() const { return statistics_; }
  torch::Tensor step(LossClosure closure = nullptr) override;
  // Every piece of state as named plain tensors (options are the constructor's).
  std::map<std::string, torch::Tensor> state_dict() const;
  // Validated first; on any error the optimizer is left unchanged.
  void load_state_dict(const std::map<std::string, torch::Tensor>& state);
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  StateBytes state_bytes() const;
  int64_t steps() const { return steps_; }
  int64_t skipped_steps() const { return skipped_steps_; }
  // The layer's current inverse roots (G side, A side) as fp32 matrices, for tests.
  std::pair<torch::Tensor, torch::Tensor> roots(size_t layer) const;
  const KfacOptions& options() const;

 protected:
  KroneckerLayerOptimizer(std::shared_ptr<LayerStatistics> statistics, std::vector<torch::Tensor> params,
                          KfacOptions options, bool adabk);

 private:
  struct LayerState;
  std::vector<LayerState> make_layers() const;
  std::string who() const;
  bool adabk_;
  std::shared_ptr<LayerStatistics> statistics_;
  std::vector<LayerState> layers_;
  std::vector<std::vector<torch::Tensor>> buffers_;  // per parameter: momentum, or adamw's m and v
  int64_t steps_ = 0;
  int64_t skipped_steps_ = 0;
};

class KFAC : public KroneckerLayerOptimizer {
 public:
  KFAC(std::shared_ptr<LayerStatistics> statistics, std::vector<torch::Tensor> params, KfacOptions options = {});
};

// SGDM_BK (rule "sgdm") and AdamW_BK (rule "adamw").
class AdaBK : public KroneckerLayerOptimizer {
 public:
  AdaBK(std::shared_ptr<LayerStatistics> statistics, std::vector<torch::Tensor> params, KfacOptions options = {});
};

}  // namespace lowbit
