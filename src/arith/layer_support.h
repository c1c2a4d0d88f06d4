// What the autograd functions of src/arith share: the per-thread count of bytes kept for
// backward (lowbit::arith::saved_bytes) and the bias added outside the functions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lowbit::arith::detail {

// Records that a layer kept `kept` bytes for backward where fp32 would have kept `fp32`.
void count_kept(int64_t kept, int64_t fp32);

// y + bias along `channel_dim` (bias undefined: y). The bias gradient, the summed dL/dy, stays
// exact; and LibTorch's custom functions take no undefined tensor arguments.
at::Tensor with_bias(const at::Tensor& y, const at::Tensor& bias, int64_t channel_dim);

}  // namespace lowbit::arith::detail
