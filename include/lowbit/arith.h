// Low-bit training arithmetic (issue: LUQ 4-bit training and randomized-matmul backprop):
// drop-in functions for the linear and convolution layers of a model, simulated exactly on
// the CPU (values restricted to the format's grid, accumulation in fp32).
//
//   luq4: LUQ (Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications at
//         Standard Formats", arXiv 2112.10769). Forward: weights and activations on a 4-bit
//         uniform grid (per-tensor absmax scale, nearest; non-negative tensors use all 16
//         levels). Backward: the neural gradient (dL/d output) quantized with logarithmic
//         unbiased quantization (luq_quantize) before both backward products. The
//         activation kept for backward is the 4-bit one, stored packed (2 codes a byte).
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

enum class Mode { Fp32, Luq4, Rmm };
Mode parse_mode(const std::string& name);  // "fp32" | "luq4" | "rmm"; throws naming the choices
std::string to_string(Mode mode);

struct ArithOptions {
  Mode mode = Mode::Fp32;
  double rmm_keep = 0.25;  // rmm: sketch size k = ceil(keep * batch)
  uint64_t seed = 0;       // stochastic rounding and sketches
};

// LUQ of a gradient at `bits` (1 sign bit + bits - 1 exponent bits): magnitudes
// {0} u {alpha 2^j : j = 0 .. 2^(bits-1) - 2}, alpha = max|x| / 2^(2^(bits-1) - 2).
// |x| >= alpha rounds stochastically between its two neighbouring levels with the
// probabilities that make it unbiased; |x| < alpha becomes alpha with probability |x| / alpha
// and 0 otherwise (unbiased underflow). So E[luq(x)] = x elementwise.
at::Tensor luq_quantize(const at::Tensor& x, int bits, at::Generator generator);

// The forward quantizer: a per-tensor uniform grid of 2^bits levels: symmetric
// (-(2^(bits-1) - 1) .. 2^(bits-1) - 1) x absmax / (2^(bits-1) - 1), or for a tensor with no
// negative value 0 .. 2^bits - 1 x max / (2^bits - 1); nearest rounding.
struct UniformCodes {
  at::Tensor packed;  // uint8, two codes a byte (4 bits) in ceil(numel / 2) bytes
  double scale = 0;   // value = (code - offset) * scale
  int64_t offset = 0; // 0 unsigned, 2^(bits-1) - 1 signed
  int64_t numel = 0;
  int64_t bytes() const;  // packed bytes + 8 (scale and offset)
};
UniformCodes uniform_quantize(const at::Tensor& x, int bits = 4);
at::Tensor uniform_dequantize(const UniformCodes& codes, at::IntArrayRef shape);

// Bytes the layers of this thread kept for backward since the last reset (and what fp32
// activations would have taken), for reporting "activation memory kept for backward".
struct SavedBytes {
  int64_t kept = 0;
  int64_t fp32 = 0;
};
SavedBytes saved_bytes();
void reset_saved_bytes();

// y = x W^T + b and its convolution counterpart under `options` (Fp32: at::linear /
// at::conv2d). `generator` drives LUQ's rounding and RMM's sketches.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const ArithOptions& options, at::Generator generator);
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, const ArithOptions& options, at::Generator generator);

}  // namespace lowbit::arith
