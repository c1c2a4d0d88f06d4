// Uses an installed lowbit: quantizes a matrix at 4 bits and takes 4-bit Shampoo steps.
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

  // Minimize ||W||^2 with 4-bit Shampoo: the loss must fall.
  at::Tensor w = at::randn({128, 96}).requires_grad_(true);
  lowbit::Shampoo opt({w}, lowbit::ShampooOptions(0.05).bits(4).stat_interval(1).root_interval(2));
  const float before = w.detach().pow(2).sum().item<float>();
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    w.pow(2).sum().backward();
    opt.step();
  }
  const float after = w.detach().pow(2).sum().item<float>();
  std::printf("lowbit consumer: 4-bit Shampoo took ||W||^2 from %.1f to %.1f, preconditioner %lld bytes\n", before,
              after, static_cast<long long>(opt.state_bytes().preconditioner));
  return error <= bound && after < 0.5f * before ? 0 : 1;
}
