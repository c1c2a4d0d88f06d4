// The layer statistics K-FAC and AdaBK precondition with: for each Linear or Conv2d layer,
// A = E[a a^T] of its inputs a (Conv2d: unfolded patches) and G = E[g g^T] of the loss
// derivatives g at its outputs, following Martens & Grosse 2015 (K-FAC) and Grosse & Martens
// 2016 (KFC) for convolutions; docs/kfac.md has the formulas.
//
// Memory bound: a batch's contribution is reduced to the n x n products while the batch passes
// (in the forward for A, in the backward for G), only on steps that capture; no activation or
// gradient is kept beyond the call that records it.
#pragma once

#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace lowbit {

// A layer whose weight K-FAC / AdaBK precondition: Linear (2-D weight) or Conv2d (4-D weight).
struct KfacLayer {
  torch::Tensor weight;  // [out, in] or [out, in, kh, kw]
  torch::Tensor bias;    // [out], or undefined
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};  // Conv2d only

  static KfacLayer linear(const torch::nn::Linear& layer);
  static KfacLayer conv2d(const torch::nn::Conv2d& layer);  // zero padding only
  bool is_conv() const { return weight.dim() == 4; }
  // Order of A: in (x kh x kw), + 1 for the bias's homogeneous coordinate; of G: out.
  int64_t input_order() const;
  int64_t output_order() const { return weight.size(0); }
  // [dW, db] as one out x input_order() matrix (K-FAC's homogeneous weight).
  torch::Tensor gradient_matrix() const;
};

// The Linear and Conv2d layers of `module` (in the order of Module::modules()).
std::vector<KfacLayer> kfac_layers(torch::nn::Module& module);

class LayerStatistics {
 public:
  explicit LayerStatistics(std::vector<KfacLayer> layers);
  const std::vector<KfacLayer>& layers() const { return layers_; }

  // Whether the coming forward / backward passes are recorded (the optimizer sets it: every
  // stat_interval steps). Recording functions do nothing while it is false.
  bool capturing() const { return capturing_; }
  void set_capturing(bool on) { capturing_ = on; }

  // Layer `index`'s input: Linear [B, in] (leading dims flattened), Conv2d [B, C, H, W].
  // Adds (1/B) sum_i sum_t a_it a_it^T (a with a trailing 1 when the layer has a bias).
  void record_input(size_t index, const torch::Tensor& input);
  // The gradient of a batch-mean loss at layer `index`'s output (Linear [B, out], Conv2d
  // [B, out, H', W']): adds (1/(B |T|)) sum_i sum_t (B g_it)(B g_it)^T, |T| = H' W' (1 for Linear).
  void record_output_grad(size_t index, const torch::Tensor& grad_output);
  // For models: when `weight` is a layer's weight and capturing() is on, records `input` now
  // and registers a hook on `output` that records its gradient in the backward pass.
  void observe(const torch::Tensor& weight, const torch::Tensor& input, const torch::Tensor& output);

  // Whether layer `index` has both statistics recorded since the last take().
  bool recorded(size_t index) const;
  // The recorded A and G of layer `index` (mean over the batches recorded), and forgets them.
  std::pair<torch::Tensor, torch::Tensor> take(size_t index);
  // Forgets everything recorded.
  void clear();

 private:
  struct Pending {
    torch::Tensor input_sum, output_sum;  // sums of the per-batch products
    int64_t inputs = 0, outputs = 0;      // batches recorded
  };
  size_t index_of(const torch::Tensor& weight) const;
  std::vector<KfacLayer> layers_;
  std::vector<Pending> pending_;
  bool capturing_ = true;
};

}  // namespace lowbit
