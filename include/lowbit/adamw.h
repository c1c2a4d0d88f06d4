// lowbit::AdamW: AdamW (Loshchilov & Hutter, decoupled weight decay) whose two moments are
// stored at 8 or 4 bits with lowbit's block-wise codec (bits = 32 gives plain fp32 AdamW,
// bit-identical to torch::optim::AdamW).
//
// Each step, for a parameter p with gradient g at step t (1-based):
//   m, v = decode(stored m), decode(stored v)            (fp32, flattened)
//   p *= 1 - lr wd
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   stored m, v = encode(m), encode(v)                  (nearest or stochastic rounding)
// with the operations of torch::optim::AdamW in its order. The update uses this step's fp32
// moments; their rounding enters from the next step on (as in bitsandbytes and torchao).
//
// Encoding (per parameter, flattened, in blocks of block_size elements, each with its fp32
// absmax as scale): code = nearest entry of a table of 2^bits values times the scale.
// - m (signed): `mapping`, "dynamic" (dynamic tree, Dettmers et al., 8-bit optimizers) or
//   "linear2" (signed square of a linear grid), or, at 4 bits, "kashin" (seed 004, docs/codec.md):
//   the flattened moment coded as one [1, numel] Kashin matrix, blocks of block_size with one
//   fp32 norm each and 16 2-D centroids fitted per moment and step (8 bits per moment and
//   parameter more; nearest rounding only).
// - v (>= 0): a table without zero (lowbit::positive_codebook), `second_moment_mapping`:
//   "linear" ((k + 1) / 2^bits; default at 4 bits, as in Li et al., "Memory Efficient
//   Optimizers with 4-bit States", NeurIPS 2023, and torchao's AdamW4bit) or "dynamic" (the
//   unsigned dynamic tree with its 0 replaced by a code a decade below the smallest; default
//   at 8 bits). A signed table would waste half the codes on v >= 0, and a table with 0 lets
//   a small positive v round to 0, after which m / (sqrt(v) + eps) explodes (Li et al.'s
//   zero-point problem): here a positive v never decodes below the smallest code times its
//   block's absmax. A block that is all zero keeps scale 0 and decodes to exactly 0. "kashin"
//   is refused here: its decoded values can be negative or 0.
// - block_size: 0 picks 256 at 8 bits (torchao's AdamW8bit, bitsandbytes' newer kernels) and
//   128 at 4 bits (Li et al., torchao's AdamW4bit).
// - Tensors with fewer than min_quant_numel elements keep fp32 moments (bitsandbytes' 4096).
// - rounding "nearest" (default) or "stochastic": unbiased rounding between the two codes
//   around a value, with random numbers that depend only on (seed, the parameter's position
//   over all groups, step, moment, element), so resumed runs are bit-identical. At 4 bits it
//   keeps the momentum from sticking to a code (docs/lowbit_adamw.md).
//
// State bytes of a quantized parameter of n elements:
//   2 (ceil(n bits / 8) + 4 ceil(n / block_size))   vs 8 n for fp32 moments
// (4 bits, blocks of 128: 1.0625 n, 13.3 % of fp32; 8 bits, blocks of 256: 2.03 n, 25.4 %).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <string>
#include <tuple>
#include <vector>

#include <lowbit/state_bytes.h>

namespace lowbit {

struct AdamWOptions : public torch::optim::OptimizerCloneableOptions<AdamWOptions> {
  AdamWOptions(double lr = 1e-3);
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;               // decoupled
  TORCH_ARG(int64_t, bits) = 8;                         // 32 (fp32 moments), 8 or 4
  TORCH_ARG(std::string, mapping) = "dynamic";          // m: "dynamic" | "linear2" | "kashin" (4 bits)
  TORCH_ARG(std::string, second_moment_mapping) = "auto";  // v: "auto" | "linear" | "dynamic" | "linear2"
  TORCH_ARG(int64_t, block_size) = 0;                   // 0: 256 at 8 bits, 128 at 4 bits
  TORCH_ARG(int64_t, min_quant_numel) = 4096;           // smaller tensors keep fp32 moments
  TORCH_ARG(std::string, rounding) = "nearest";         // "nearest" | "stochastic"
  TORCH_ARG(int64_t, seed) = 0;                         // stochastic rounding
  TORCH_ARG(bool, skip_nonfinite) = false;  // skip (and count) a step that would overflow instead of raising

 public:
  void validate() const;  // throws naming the option and what is allowed
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const AdamWOptions& lhs, const AdamWOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// fp32 moments: exp_avg and exp_avg_sq shaped like the parameter. Quantized: uint8 codes and
// fp32 block scales of the flattened moments, the maps they were stored with, and the
// parameter's shape (int64); with mapping "kashin", the first moment's fitted centroids (fp32
// [16, 2]; absent otherwise). bits, maps, block size and min_quant_numel are fixed by the
// first step (a change throws).
struct AdamWParamState : public torch::optim::OptimizerCloneableParamState<AdamWParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(std::string, mapping);                // "" for fp32 moments
  TORCH_ARG(std::string, second_moment_mapping);  // "" for fp32 moments
  TORCH_ARG(torch::Tensor, shape);
  TORCH_ARG(torch::Tensor, exp_avg);
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  TORCH_ARG(torch::Tensor, exp_avg_codes);
  TORCH_ARG(torch::Tensor, exp_avg_scales);
  TORCH_ARG(torch::Tensor, exp_avg_sq_codes);
  TORCH_ARG(torch::Tensor, exp_avg_sq_scales);
  TORCH_ARG(torch::Tensor, exp_avg_centroids);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class AdamW : public torch::optim::Optimizer {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamWOptions defaults = {});
  explicit AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own would give a group of a type it
  // does not know the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  // Gradients are checked (dense, floating, shaped like the parameter) and the overflow rule
  // applied (squared norm finite and at most 2^104; fp16 steps tried on copies first) before
  // anything changes: a step that breaks it raises naming the parameter, or is skipped.
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;  // validated; on error nothing changes
  // Moments count as first_order (preconditioner is 0).
  StateBytes state_bytes() const;
  // Steps skipped by skip_nonfinite: they would have overflowed (docs/lowbit_adamw.md).
  int64_t skipped_steps() const { return skipped_steps_; }

 private:
  int64_t skipped_steps_ = 0;
};

}  // namespace lowbit
