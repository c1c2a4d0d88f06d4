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

// Code tables for non-negative values without a zero (Adam's second moment): 2^bits values
// in (0, 1], sorted ascending, ending at 1. The smallest code is the floor a positive value
// of a block can round to, so a small v never becomes 0 (and m / (sqrt(v) + eps) never
// explodes); a block that is all zero still decodes to exactly 0 (its scale is 0).
//   Linear:      (k + 1) / 2^bits
//   Linear2:     ((k + 1) / 2^bits)^2
//   DynamicTree: the unsigned dynamic tree (as scale_codebook_values at 8 bits) with its 0
//                replaced by 0.55 * 10^-(bits - 1), one decade below its smallest code.
std::vector<float> positive_codebook_values(Mapping mapping, int bits);
const at::Tensor& positive_codebook(Mapping mapping, int bits);  // cached 1-D float32 CPU tensor

// `table` (one of the cached tables above) on `device`: copied once per device and kept, so
// that code running on a GPU does not copy the table (a host synchronisation) at every call.
at::Tensor codebook_on(const at::Tensor& table, const at::Device& device);

// Whether `table` is one of the tables above (a host table or a codebook_on copy) and unchanged
// since it was made: its values are then known to be a valid code table, and the codec's
// argument check need not read them (on a GPU, a host synchronisation).
bool is_cached_codebook(const at::Tensor& table);

// The largest distance from any point of [-1, 1] to its nearest code: the worst
// nearest-rounding error of a normalized value (half the widest gap, or the distance
// from an end of [-1, 1] to the outermost code).
double max_rounding_error(const std::vector<float>& codes);

}  // namespace lowbit
