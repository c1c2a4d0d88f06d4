// lowbit::Shampoo: Shampoo (32-bit, 4-bit, or the paper's naive 4-bit baseline) as a
// LibTorch optimizer. The preconditioned gradient is grafted to the gradient's norm and
// handed to a first-order rule (SGD with momentum or AdamW).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <lowbit/distributed_options.h>
#include <lowbit/state_bytes.h>

namespace c10d {
class ProcessGroup;
}

namespace lowbit {

namespace precond {
class ParameterPreconditioner;
}
class ShampooEngine;
namespace distributed {
class Communicator;
}

// Every option, its paper symbol and default, is in docs/shampoo.md.
struct ShampooOptions : public torch::optim::OptimizerCloneableOptions<ShampooOptions> {
  ShampooOptions(double lr = 1e-3);
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(std::string, graft) = "adamw";           // "sgdm" | "adamw"
  TORCH_ARG(double, momentum) = 0.9;                 // sgdm
  TORCH_ARG(bool, nesterov) = false;                 // sgdm
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);  // adamw
  TORCH_ARG(double, eps) = 1e-8;                     // adamw
  TORCH_ARG(double, weight_decay) = 0.0;             // coupled (sgdm) / decoupled (adamw)
  TORCH_ARG(int64_t, bits) = 4;                      // 32 (fp32 Shampoo), 8, 4, 3
  TORCH_ARG(std::string, quantize) = "eigenvectors"; // "eigenvectors" (4-bit Shampoo) | "matrix" (naive)
                                                     // | "cholesky" (Li et al. 2024, docs/shampoo.md)
  TORCH_ARG(bool, error_feedback) = true;            // cholesky: keep the error-feedback state
  TORCH_ARG(double, error_feedback_decay) = 0.0;     // cholesky: its decay b_e (0: E = the last residual)
  TORCH_ARG(std::string, mapping) = "linear2";       // "linear2" | "dynamic" | "linear"
  TORCH_ARG(int64_t, quant_block_size) = 64;
  TORCH_ARG(bool, double_quant_scales) = false;      // 8-bit block scales (below 4.5 bits)
  TORCH_ARG(int64_t, min_quant_numel) = 4096;        // smaller factors stay fp32
  TORCH_ARG(int64_t, max_preconditioner_dim) = 1200;
  TORCH_ARG(double, stat_decay) = 0.95;              // beta
  TORCH_ARG(double, epsilon) = 1e-6;                 // relative to lambda_max
  TORCH_ARG(int64_t, stat_interval) = 100;           // T1
  TORCH_ARG(int64_t, root_interval) = 500;           // T2
  TORCH_ARG(int64_t, start_preconditioning_step) = 1;
  typedef std::tuple<int64_t, int64_t> rectify_t;
  TORCH_ARG(rectify_t, rectify_steps) = std::make_tuple(1, 4);  // t1, t2 (Björck steps)
  TORCH_ARG(std::string, root_method) = "eigen";     // "eigen" | "newton" (fp32 Shampoo)
  TORCH_ARG(std::string, eigen_update) = "qr";       // 4-bit: "qr" (paper: one subspace step) | "cholesky_qr" (that
                                                      // step's QR by CholeskyQR2: for GPUs) | "eigh" (full)
  // Low-bit "eigenvectors": "quantized" (paper: the inverse root stored at `bits`, refreshed
  // every T2) | "eigen" (no root stored: U diag(lambda^(-1/4)) U^T from the stored eigenvectors
  // at every step; with bits=8 the same bytes as the paper's 4-bit U + 4-bit root; docs/shampoo.md).
  TORCH_ARG(std::string, root_storage) = "quantized";
  TORCH_ARG(bool, skip_nonfinite) = false;           // skip (and count) a step that would overflow instead of raising
  // "shampoo": L^(-1/4) G R^(-1/4); "caspr" (Duvvuri et al. 2024): with L~ = L^(-1/2),
  // R~ = R^(-1/2), J = L~ G + G R~ and U = L~ J + J R~. Same factors and state layout; the
  // stored roots are L^(-1/4) for one and L^(-1/2) for the other, so a checkpoint must agree.
  // "soap" (Vyas et al. 2024): AdamW run in the eigenbases of L and R (rotated moments, no
  // root, no grafting); bits=4 keeps those eigenbases as 4-bit eigenvectors (4-bit SOAP).
  TORCH_ARG(std::string, preconditioner) = "shampoo";
  // Bits of the AdamW moments (graft, or SOAP's Adam): 32, or 8 / 4 (lowbit::AdamW's block-wise
  // storage; tensors under min_quant_numel stay fp32). With bits=4 every state is low-bit.
  TORCH_ARG(int64_t, graft_bits) = 32;
  // Engine-wide settings, read from the optimizer's defaults (docs/shampoo.md, "Execution"):
  // the most MiB of temporaries one batched refresh or preconditioning pass may take (0: 64
  // on a CPU, 1024 on a GPU, where they go back to the caching allocator after each step).
  TORCH_ARG(double, workspace_mb) = 0;
  // When gradients are checked against the overflow rule: "immediate" (before the step
  // writes anything: one host read per step), "deferred" (plain steps on the device, their
  // writes committed under the verdict, which the next refresh, save or state dict reads:
  // no host read in a plain step; see optim/deferred_check.h), or "auto" (deferred when
  // every parameter is on a GPU, immediate otherwise).
  TORCH_ARG(std::string, gradient_check) = "auto";

 public:
  // Throws c10::Error naming the option, its value and what is allowed.
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const ShampooOptions& lhs, const ShampooOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

struct ShampooParamState : public torch::optim::OptimizerCloneableParamState<ShampooParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(int64_t, root_updates) = 0;   // inverse-root refreshes applied so far
  TORCH_ARG(int64_t, soap_v_start) = 0;   // SOAP: the step whose v began in the eigenbases (0: not yet)
  TORCH_ARG(torch::Tensor, momentum_buffer);  // sgdm
  TORCH_ARG(torch::Tensor, exp_avg);          // adamw
  TORCH_ARG(torch::Tensor, exp_avg_sq);       // adamw
  // adamw with graft_bits 8 / 4: the moments' codes and block scales (lowbit/adamw.h layout)
  TORCH_ARG(torch::Tensor, exp_avg_codes);
  TORCH_ARG(torch::Tensor, exp_avg_scales);
  TORCH_ARG(torch::Tensor, exp_avg_sq_codes);
  TORCH_ARG(torch::Tensor, exp_avg_sq_scales);

 public:
  std::shared_ptr<precond::ParameterPreconditioner> preconditioner;  // null for 1-D / scalars
  // Preconditioner entries read from a checkpoint, installed once validated against the parameter.
  std::map<std::string, torch::Tensor> loaded_preconditioner;
  // SOAP, within one step: the bases (left, right per block) in use before this step's
  // statistics update moved them; empty otherwise. Not saved.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> soap_previous_bases;

  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class Shampoo : public torch::optim::Optimizer {
 public:
  explicit Shampoo(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                   ShampooOptions defaults = {});
  explicit Shampoo(std::vector<torch::Tensor> params, ShampooOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own add_param_group would
  // replace the options of an optimizer type it does not know by the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  // Loads into a staging copy, validates shapes and structural options against this
  // optimizer's parameters, and only then replaces the state: on error nothing changes.
  void load(torch::serialize::InputArchive& archive) override;

  StateBytes state_bytes() const;
  // Reads the verdict of the steps checked on the device (gradient_check "deferred", or
  // "auto" on a GPU) and throws, naming the parameter, if one had a gradient beyond the
  // overflow rule; parameters and state are then as they were before it. The next step
  // that refreshes factors, and save(), call it too.
  void settle();
  int64_t skipped_steps() const { return skipped_steps_; }  // by skip_nonfinite
  int64_t root_failures() const;  // failed decompositions that kept the last good root
  int64_t root_updates() const;   // largest number of root refreshes of any parameter

  // Replaces the symmetric eigensolver (for fault injection and experiments).
  using EighSolver = std::function<std::tuple<torch::Tensor, torch::Tensor>(const torch::Tensor&)>;
  void set_eigh_solver(EighSolver solver);

  // Distributed mode (include lowbit/distributed.h): the ranks of `group` share the matrix
  // work and exchange the updated preconditioner state, quantized as it is stored. Every
  // rank builds the optimizer over the same parameters and calls this before stepping;
  // gradients must then be equal on every rank (DDP, or options.average_gradients).
  void distribute(const c10::intrusive_ptr<c10d::ProcessGroup>& group, DistributedOptions options = {});
  bool distributed() const { return communicator_ != nullptr; }
  // This rank's traffic; all zero when not distributed.
  CommunicationStats communication() const;

 private:
  ShampooParamState& state_for(const torch::Tensor& p, const ShampooOptions& options);
  void check_gradients() const;
  // The overflow rule (docs/shampoo.md, Robustness): true when the step may go on, false
  // when it is to be skipped (skip_nonfinite); throws naming the parameter otherwise.
  bool accepts_step() const;
  // A plain step checked on the device (ShampooEngine::can_defer); false: check it now.
  bool step_deferred(const std::string& gradient_check);
  void distributed_step();
  int64_t skipped_steps_ = 0;
  EighSolver eigh_;
  std::shared_ptr<distributed::Communicator> communicator_;
  std::shared_ptr<ShampooEngine> engine_;  // batched execution and its reused workspace
};

}  // namespace lowbit
