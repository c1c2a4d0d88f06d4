#include "quant/kashin_vector.h"

#include <ATen/ops/empty.h>

#include <lowbit/quantized_matrix.h>

#include "quant/kashin.h"

namespace lowbit::kashin {

QuantOptions vector_options(int bits, int64_t block_size) {
  QuantOptions o;
  o.bits = bits;
  o.mapping = Mapping::Kashin;
  o.block_size = block_size;
  return o;
}

void encode_vector_into(const at::Tensor& values, int bits, int64_t block_size, const VectorCode& into) {
  const QuantizedMatrix q = QuantizedMatrix::quantize(values.reshape({1, -1}), vector_options(bits, block_size));
  into.codes.copy_(q.codes().view(into.codes.sizes()));
  into.scales.copy_(q.scales().view(into.scales.sizes()));
  into.centroids.copy_(q.centroids());
}

// Decoded straight from the state's tensors, which the optimizer validated when they were made
// or loaded: no per-step QuantizedMatrix::from_state (its value checks are host reads).
at::Tensor decode_vector(const VectorCode& code, int bits, int64_t block_size, int64_t numel) {
  at::Tensor out = at::empty({1, numel}, code.scales.options());
  decode_into(unpack_rows(code.codes.view({1, -1}), bits, numel), code.scales.view({1, -1}), code.centroids,
              block_size, out);
  return out.view({numel});
}

}  // namespace lowbit::kashin
