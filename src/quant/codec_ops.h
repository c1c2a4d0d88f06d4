// C++ entry points to the torch.ops.lowbit codec ops, dispatched to the backend of
// their tensors (CPU kernel, or CUDA when built). Library code calls these, never a
// backend kernel directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lowbit::ops {

// check_finite = false: the caller vouches that the input is finite, and the CUDA kernels skip
// the host read that would report a NaN/Inf (ops_schema.cpp).
at::Tensor block_absmax(const at::Tensor& input, int64_t block_size, bool skip_diagonal, bool check_finite = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_blockwise(
    const at::Tensor& input, const at::Tensor& codebook, int64_t bits, int64_t block_size,
    bool keep_diagonal, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& scales,
    bool check_finite = true);
at::Tensor& dequantize_blockwise_out(const at::Tensor& codes, const at::Tensor& scales,
                                     const at::Tensor& codebook,
                                     const c10::optional<at::Tensor>& diagonal, int64_t bits,
                                     int64_t block_size, at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> quantize_scales(const at::Tensor& scales,
                                                   const at::Tensor& scale_codebook, bool check_finite = true);
at::Tensor dequantize_scales(const at::Tensor& codes, const at::Tensor& group_max,
                             const at::Tensor& scale_codebook);

}  // namespace lowbit::ops
