// Kashin codes for flat vectors: AdamW's first moment and the rows of M-FAC's gradient
// window. A vector of n elements is coded as the one-row QuantizedMatrix [1, n] with mapping
// "kashin", so its codes and scales keep the flat layout that the table-coded states already
// store (the block ops on [1, n]), and its fitted centroids are one more state tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <lowbit/quant_options.h>

#include <cstdint>

namespace lowbit::kashin {

// Handles into a state's tensors; encode_vector_into writes them in place.
struct VectorCode {
  at::Tensor codes;      // uint8 [ceil(n bits / 8)]
  at::Tensor scales;     // float32 [ceil(n / block_size)]: block norms ||x||_2 / sqrt(len)
  at::Tensor centroids;  // float32 [2^bits, 2]
};

// The codec options of a Kashin-coded vector (bits 3 or 4, nearest rounding).
QuantOptions vector_options(int bits, int64_t block_size);
// Number of 2-D centroids at `bits`: the first dimension of VectorCode::centroids.
inline int64_t centroid_count(int bits) { return int64_t{1} << bits; }

// Codes `values` (n elements, any floating dtype and shape) into `into`.
void encode_vector_into(const at::Tensor& values, int bits, int64_t block_size, const VectorCode& into);
// The decoded vector, float32 [numel]. All-zero codes, scales and centroids decode to 0.
at::Tensor decode_vector(const VectorCode& code, int bits, int64_t block_size, int64_t numel);

}  // namespace lowbit::kashin
