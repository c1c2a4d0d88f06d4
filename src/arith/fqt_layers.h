// 1-bit FQT's linear and convolution layers (lowbit/arith.h), for the dispatch in layers.cpp.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <lowbit/arith.h>

namespace lowbit::arith::detail {

// An activation's value on its 1-bit forward grid (binarize, then debinarize).
at::Tensor on_1bit_grid(const at::Tensor& x);

// x W^T (no bias) and the convolution without bias under fqt1, recorded for backward; an edge
// layer keeps its fp32 forward (and input) but quantizes its gradients like the others.
at::Tensor fqt1_linear(const at::Tensor& x, const at::Tensor& weight, const ArithOptions& options,
                       at::Generator generator, bool edge);
at::Tensor fqt1_conv2d(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       const ArithOptions& options, at::Generator generator, bool edge);

}  // namespace lowbit::arith::detail
