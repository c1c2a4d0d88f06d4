// lowbit::MFAC (Frantar et al., arXiv 2107.03356): SGD with momentum on the inverse
// empirical Fisher times the gradient, matrix-free, from a sliding window of the last m
// gradients of each parameter (M-FAC's block variant, one block per parameter):
//   F = lambda I + (1/n) sum_i g_i g_i^T   (n = gradients in the window, at most m)
//   F^-1 v = (1/lambda) (v - G^T (n lambda I + G G^T)^-1 G v)      (Woodbury; G is n x d)
// G G^T is kept up to date one row per step, so a step costs O(d m) plus an m x m solve.
// The window can be stored at 8 or 4 bits with lowbit's block-wise codec (bits = 8 | 4);
// the Fisher is then that of the stored (dequantized) gradients, exactly, and the gradient
// it preconditions is the new one as stored (its rounding residual lies outside the
// window's span, where F^-1 would multiply it by 1/lambda).
// Each step: push g into the window, then d = F^-1 g, then
//   d += wd p;  buf = momentum buf + d;  p -= lr buf.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <string>
#include <vector>

#include <lowbit/state_bytes.h>

namespace lowbit {

struct MFACOptions : public torch::optim::OptimizerCloneableOptions<MFACOptions> {
  MFACOptions(double lr = 1e-3);
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, momentum) = 0.0;
  TORCH_ARG(double, weight_decay) = 0.0;      // coupled (added to the preconditioned direction)
  TORCH_ARG(int64_t, window) = 32;            // m
  TORCH_ARG(double, damping) = 1e-3;          // lambda
  TORCH_ARG(int64_t, bits) = 32;              // 32 (fp32 window), 8 or 4
  TORCH_ARG(std::string, mapping) = "dynamic";// code map of a quantized window; "kashin" needs bits 4
  TORCH_ARG(int64_t, quant_block_size) = 64;
  TORCH_ARG(bool, skip_nonfinite) = false;  // skip (and count) a step that would overflow instead of raising

 public:
  void validate() const;
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const MFACOptions& lhs, const MFACOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// The window of one parameter: rows are flattened gradients. fp32: `rows` (m x d);
// quantized: `codes` (m x packed bytes) and `scales` (m x blocks). `gram` is G G^T (m x m,
// float64) over the stored rows; `count` is the number of gradients pushed so far (the
// next goes to row count % m). Window size, bits, block size and mapping are fixed by the
// first step (a change throws).
struct MFACParamState : public torch::optim::OptimizerCloneableParamState<MFACParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(int64_t, count) = 0;
  TORCH_ARG(std::string, mapping);  // the code map the window was stored with
  TORCH_ARG(torch::Tensor, shape);  // the parameter's sizes (int64): the window holds flattened gradients
  TORCH_ARG(torch::Tensor, rows);
  TORCH_ARG(torch::Tensor, codes);
  TORCH_ARG(torch::Tensor, scales);
  TORCH_ARG(torch::Tensor, centroids);  // mapping "kashin": fp32 [window, 16, 2], each row's fitted centroids
  TORCH_ARG(torch::Tensor, gram);
  TORCH_ARG(torch::Tensor, momentum_buffer);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class MFAC : public torch::optim::Optimizer {
 public:
  explicit MFAC(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MFACOptions defaults = {});
  explicit MFAC(std::vector<torch::Tensor> params, MFACOptions defaults = {});

  // Validates the group's options and keeps them (LibTorch's own would give a group of a type it
  // does not know the defaults).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  StateBytes state_bytes() const;
  // Steps skipped by skip_nonfinite: they would have overflowed (docs/second_order.md,
  // "Steps that would overflow").
  int64_t skipped_steps() const { return skipped_steps_; }

 private:
  int64_t skipped_steps_ = 0;
};

}  // namespace lowbit
