// Quantizes a matrix at 4 bits through an installed lowbit and checks the round trip.
#include <ATen/ATen.h>

#include <cstdio>

#include <lowbit/lowbit.h>

int main() {
  const at::Tensor m = at::randn({300, 300});
  const lowbit::QuantizedMatrix q = lowbit::QuantizedMatrix::quantize(m);
  const float error = (q.dequantize() - m).abs().max().item<float>();
  const float bound = m.abs().max().item<float>() *
                      lowbit::max_rounding_error(lowbit::codebook_values(lowbit::Mapping::Linear2, 4));
  std::printf("lowbit consumer: %lld bytes for a %lld-byte matrix, max error %.4f (bound %.4f)\n",
              static_cast<long long>(q.nbytes()), static_cast<long long>(m.numel() * 4), error, bound);
  return error <= bound ? 0 : 1;
}
