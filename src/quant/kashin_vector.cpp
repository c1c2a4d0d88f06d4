#include "quant/kashin_vector.h"

#include <lowbit/quantized_matrix.h>

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

at::Tensor decode_vector(const VectorCode& code, int bits, int64_t block_size, int64_t numel) {
  const QuantizedMatrix q = QuantizedMatrix::from_tensors(1, numel, vector_options(bits, block_size),
                                                          code.codes.view({1, -1}), code.scales.view({1, -1}),
                                                          code.centroids);
  return q.dequantize().view({numel});
}

}  // namespace lowbit::kashin
