// Builds the optimizers `lowbit train` offers, by name, and measures their state.
#pragma once

#include <torch/optim/optimizer.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <lowbit/shampoo.h>

#include "models/models.h"

namespace lowbit::train {

// "sgdm" and "adamw" are LibTorch's own optimizers (the baselines); "adamw8" and "adamw4"
// are lowbit::AdamW with 8- / 4-bit moments (default maps and blocks; min_quant_numel from
// `shampoo`); "shampoo" (32-bit),
// "shampoo4" and "shampoo4-naive" are lowbit::Shampoo with `shampoo` as the base options
// (its bits/quantize are overridden by the name); "caspr" (32-bit) and "caspr4" (4-bit
// eigenvectors) are the same with preconditioner "caspr"; "soap" / "soap4" with preconditioner
// "soap" (AdamW in the eigenbases, 4-bit eigenvectors for soap4); "shampoo4-cholesky" and
// "shampoo4-cholesky-noef" quantize the Cholesky factor (with / without error feedback);
// "shampoo4-adamw4" is shampoo4 with 4-bit AdamW moments as its graft; "sophia" (Gauss-Newton-Bartlett),
// "sophia-h" (Hutchinson), "adahessian", "mfac" (fp32 window), "mfac8", "mfac4" and
// "nag-gs" are lowbit's other second-order optimizers; "kfac" / "kfac4" (K-FAC, fp32 / 4-bit
// eigenvector-quantized factors), "sgdm-bk" / "sgdm-bk4" and "adamw-bk" / "adamw-bk4" (AdaBK)
// precondition the model's linear and convolution layers and need `model`. lr, momentum, betas, eps and weight
// decay come from `shampoo` for every optimizer that has them.
extern const std::vector<std::string> kOptimizerNames;
// The names built on lowbit::Shampoo (they take the Shampoo options and --nproc).
extern const std::vector<std::string> kShampooFamily;
bool is_shampoo_family(const std::string& name);

// The options of the non-Shampoo second-order optimizers; a negative value keeps the
// optimizer's own default (which differ: Sophia refreshes its Hessian every 10 steps,
// AdaHessian every step).
struct SecondOrderSettings {
  int64_t hessian_interval = -1;  // Sophia k / AdaHessian
  double rho = -1;                // Sophia
  int64_t window = -1;            // M-FAC m
  double damping = -1;            // M-FAC lambda
  double mu = -1;                 // NAG-GS
  double kl_clip = -1;            // K-FAC
  std::string damping_mode;       // K-FAC: "tikhonov" | "pi" (empty: the optimizer's default)
  // adamw8 / adamw4's first moment and mfac8 / mfac4's window: the code map that --mapping
  // names (empty: the optimizer's own default, "dynamic" for both).
  std::string mapping;
};

// The K-FAC / AdaBK names.
bool is_kfac_family(const std::string& name);

// The learning rate an optimizer uses when none is given: tuned on Fashion-MNIST (docs/training.md).
double default_lr(const std::string& name, const std::string& graft);

// Whether step() needs a closure that calls loss.backward(create_graph=true).
bool needs_hessian_closure(const std::string& name);
// Whether the trainer must feed Sophia's Gauss-Newton-Bartlett estimator (sampled labels).
bool needs_sampled_labels(const std::string& name);

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> params,
                                                        const ShampooOptions& shampoo,
                                                        const SecondOrderSettings& second_order = {},
                                                        models::Classifier* model = nullptr);

// Optimizer state in bytes, split as lowbit::Shampoo reports it.
StateBytes optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

}  // namespace lowbit::train
