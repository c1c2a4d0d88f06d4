// Code tables of the codec: sorted fp32 values in [-1, 1] (signed) or [0, 1] (scales).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include <lowbit/quant_options.h>

namespace lowbit {

// The 2^bits signed code values of `mapping`, sorted ascending, each containing 0 and 1.
std::vector<float> codebook_values(Mapping mapping, int bits);

// The same values as a 1-D float32 CPU tensor; cached, so cheap to call per step.
const at::Tensor& codebook(Mapping mapping, int bits);

// The unsigned 8-bit dynamic-tree table used for double-quantized block scales
// (256 values from 0 to 1, sorted ascending).
std::vector<float> scale_codebook_values();
const at::Tensor& scale_codebook();

// The largest distance from any point of [-1, 1] to its nearest code: the worst
// nearest-rounding error of a normalized value (half the widest gap, or the distance
// from an end of [-1, 1] to the outermost code).
double max_rounding_error(const std::vector<float>& codes);

}  // namespace lowbit
