// Low-bit training arithmetic (issue: LUQ 4-bit training, 1-bit FQT and randomized-matmul backprop):
// drop-in functions for the linear and convolution layers of a model, simulated exactly on
// the CPU (values restricted to the format's grid, accumulation in fp32).
//
//   luq4: LUQ (Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications at
//         Standard Formats", arXiv 2112.10769). Forward: weights and activations on a 4-bit
//         uniform grid (per-tensor absmax scale, nearest; non-negative tensors use all 16
//         levels). Backward: the neural gradient (dL/d output) quantized with logarithmic
//         unbiased quantization (luq_quantize) before both backward products. The
//         activation kept for backward is the 4-bit one, stored packed (2 codes a byte).
//   fqt1: 1-bit fully quantized training (Gao et al., "1-Bit FQT: Pushing the Limit of Fully
//         Quantized Training to 1-bit", arXiv 2408.14267). Forward: 1-bit weights (alpha_o
//         sign(W_o), alpha_o = mean |W_o| per output channel) and 1-bit activations (binarize:
//         one scale per sample), kept packed 8 codes a byte. Backward: the neural gradient
//         quantized twice (Sample-Channel joint Quantization): per sample for dX = g W (the
//         scales stay outside the sum over channels), per output channel for dW = g^T x (outside
//         the sum over samples); each with Activation Gradient Pruning (agp_quantize): only the
//         1/b of the groups with the largest range survive, at b bits, so the budget stays 1 bit
//         a value. The model's first and last layers (LayerPlace::Edge) keep an fp32 forward,
//         as binary networks do; their gradients are quantized the same way.
//   rmm:  randomized matrix multiplication for the weight gradient of linear layers
//         (Bershatsky et al., "Memory-efficient backpropagation through large linear
//         layers"): keep S^T X (k x d_in, S a B x k Gaussian sketch with entries N(0, 1/k),
//         regenerated from its seed) instead of X (B x d_in); dW = (S^T dY)^T (S^T X), an
//         unbiased estimate of dY^T X. Input gradients stay exact. Conv layers keep fp32.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace lowbit::arith {

enum class Mode { Fp32, Luq4, Fqt1, Rmm };
Mode parse_mode(const std::string& name);  // "fp32" | "luq4" | "fqt1" | "rmm"; throws naming the choices
std::string to_string(Mode mode);

struct ArithOptions {
  Mode mode = Mode::Fp32;
  double rmm_keep = 0.25;  // rmm: sketch size k = ceil(keep * batch)
  bool luq_clip = true;    // luq4: MSE-optimal clipping of the forward grid (false: absmax)
  int fqt_bits = 4;        // fqt1: AGP keeps ceil(groups / b) gradient groups at b bits (1: no pruning)
  bool fqt_scq = true;     // fqt1: per-channel groups for dW (false: per-sample for both, the paper's baseline)
  uint64_t seed = 0;       // stochastic rounding and sketches
};
std::string describe(const ArithOptions& options);  // e.g. "fqt1 (AGP keeps 1/4 of the groups at 4 bits, SCQ)"

// LUQ of a gradient at `bits` (1 sign bit + bits - 1 exponent bits): magnitudes
// {0} u {alpha 2^j : j = 0 .. 2^(bits-1) - 2}, alpha = max|x| / 2^(2^(bits-1) - 2).
// |x| >= alpha rounds stochastically between its two neighbouring levels with the
// probabilities that make it unbiased; |x| < alpha becomes alpha with probability |x| / alpha
// and 0 otherwise (unbiased underflow). So E[luq(x)] = x elementwise.
at::Tensor luq_quantize(const at::Tensor& x, int bits, at::Generator generator);

// The forward quantizer: a per-tensor uniform grid of 2^bits levels: symmetric
// (-(2^(bits-1) - 1) .. 2^(bits-1) - 1) x scale, or for a tensor with no negative value
// 0 .. 2^bits - 1 x scale; nearest rounding, values beyond the grid clamped to its ends.
// scale = absmax / top level, or with `clip` the clipping that minimizes the squared error
// among absmax x r / top level, r in (0.01, 1] (a geometric sweep refined around its best,
// measured on every (numel / 16384)-th value): SAWB's aim (LUQ clips with SAWB) found by
// search, not by its fitted coefficients. One outlier no longer stretches the grid over a
// tensor's whole range.
struct UniformCodes {
  at::Tensor packed;  // uint8, two codes a byte (4 bits) in ceil(numel / 2) bytes
  double scale = 0;   // value = (code - offset) * scale
  int64_t offset = 0; // 0 unsigned, 2^(bits-1) - 1 signed
  int64_t numel = 0;
  int64_t bytes() const;  // packed bytes + 8 (scale and offset)
};
UniformCodes uniform_quantize(const at::Tensor& x, int bits = 4, bool clip = false);
at::Tensor uniform_dequantize(const UniformCodes& codes, at::IntArrayRef shape);

// The 1-bit forward quantizer of an activation: per sample (row of x.reshape(x.size(0), -1),
// a 0-d or 1-d tensor is one sample) one bit a value and one fp32 scale s. A tensor with a
// negative value: s sign(x) (0 -> +), s = mean |x| (the L2-optimal scale for sign codes). A
// non-negative tensor (ReLU outputs, where sign would be constant): {0, s} with threshold s / 2,
// s the mean of the values above it (Lloyd's 1-bit quantizer, a few iterations from the mean).
struct BinaryCodes {
  at::Tensor packed;          // uint8, 8 codes a byte (code i in bit i % 8 of byte i / 8)
  at::Tensor scales;          // float32, one per sample
  bool non_negative = false;  // codes {0, 1} mean {0, s}; otherwise {-s, +s}
  int64_t numel = 0;
  int64_t bytes() const;      // packed bytes + 4 per scale + 1
};
BinaryCodes binarize(const at::Tensor& x);
at::Tensor debinarize(const BinaryCodes& codes, at::IntArrayRef shape);

// A weight on its 1-bit grid: alpha_o sign(W_o) (0 -> +), alpha_o = mean |W_o| over output
// channel o (dim 0). Values, not codes: backward recomputes it from the fp32 weight.
at::Tensor binarize_weight(const at::Tensor& w);

// Activation Gradient Pruning with per-group stochastic quantization. Groups are the slices of
// `g` along `group_dim`. The ceil(groups / bits) groups with the largest range max - min are
// kept, each quantized to `bits` bits on its own grid min + i (max - min) / (2^bits - 1) by
// stochastic rounding (unbiased within the group); the others become 0. So the kept groups
// are unbiased, the pruned ones are the (deliberate) bias. bits = 1 prunes nothing (every
// value becomes its group's min or max: per-group 1-bit quantization).
at::Tensor agp_quantize(const at::Tensor& g, int64_t group_dim, int bits, at::Generator generator);

// Bytes the layers of this thread kept for backward since the last reset (and what fp32
// activations would have taken), for reporting "activation memory kept for backward".
struct SavedBytes {
  int64_t kept = 0;
  int64_t fp32 = 0;
};
SavedBytes saved_bytes();
void reset_saved_bytes();

// Where a layer sits in its model: fqt1 keeps the forward of the first and last layer in fp32.
enum class LayerPlace { Inner, Edge };

// y = x W^T + b and its convolution counterpart under `options` (Fp32: at::linear /
// at::conv2d). `generator` drives the stochastic rounding and RMM's sketches.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const ArithOptions& options, at::Generator generator, LayerPlace place = LayerPlace::Inner);
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, const ArithOptions& options, at::Generator generator,
                  LayerPlace place = LayerPlace::Inner);

}  // namespace lowbit::arith
