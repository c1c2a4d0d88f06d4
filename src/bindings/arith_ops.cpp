// Low-bit training arithmetic for Python (python/lowbit/arith.py): the quantizers of
// lowbit/arith.h as torch ops; the Python layers build their autograd functions on them.
//
//   luq_quantize(x, bits, seed)             LUQ, stochastic rounding drawn from `seed`
//   uniform_quantize4(x, clip) -> (packed, scale, offset)  the forward's 4-bit grid, packed
//   uniform_dequantize4(packed, scale, offset, shape)  and back (float32)
//   binarize(x) -> (packed, scales, non_negative)      fqt1's 1-bit activation grid, packed
//   debinarize(packed, scales, non_negative, shape)    and back (float32)
//   binarize_weight(w)                      fqt1's 1-bit weight: alpha_o sign(W_o)
//   agp_quantize(g, group_dim, bits, seed)  Activation Gradient Pruning + per-group rounding
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <lowbit/arith.h>

#include <tuple>

namespace lowbit::bindings {
namespace {

at::Tensor luq_quantize(const at::Tensor& x, int64_t bits, int64_t seed) {
  TORCH_CHECK(seed >= 0, "lowbit.luq_quantize: seed must be >= 0; got ", seed);
  return arith::luq_quantize(x, static_cast<int>(bits), at::detail::createCPUGenerator(static_cast<uint64_t>(seed)));
}

std::tuple<at::Tensor, double, int64_t> uniform_quantize4(const at::Tensor& x, bool clip) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lowbit.uniform_quantize4: expected a floating tensor; got ",
              x.scalar_type());
  const arith::UniformCodes c = arith::uniform_quantize(x, 4, clip);
  return {c.packed, c.scale, c.offset};
}

at::Tensor uniform_dequantize4(const at::Tensor& packed, double scale, int64_t offset, at::IntArrayRef shape) {
  arith::UniformCodes c;
  c.packed = packed;
  c.scale = scale;
  c.offset = offset;
  c.numel = c10::multiply_integers(shape);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (c.numel + 1) / 2,
              "lowbit.uniform_dequantize4: expected ", (c.numel + 1) / 2, " uint8 codes for shape ", shape, "; got ",
              packed.numel(), " of ", packed.scalar_type());
  return arith::uniform_dequantize(c, shape);
}

std::tuple<at::Tensor, at::Tensor, bool> binarize(const at::Tensor& x) {
  const arith::BinaryCodes c = arith::binarize(x);
  return {c.packed, c.scales, c.non_negative};
}

at::Tensor debinarize(const at::Tensor& packed, const at::Tensor& scales, bool non_negative, at::IntArrayRef shape) {
  arith::BinaryCodes c;
  c.packed = packed;
  c.scales = scales;
  c.non_negative = non_negative;
  c.numel = c10::multiply_integers(shape);
  const int64_t samples = shape.empty() ? 1 : shape[0];
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (c.numel + 7) / 8,
              "lowbit.debinarize: expected ", (c.numel + 7) / 8, " uint8 bytes for shape ", shape, "; got ",
              packed.numel(), " of ", packed.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == samples,
              "lowbit.debinarize: expected ", samples, " float32 scales (one a sample); got ", scales.numel(), " of ",
              scales.scalar_type());
  return arith::debinarize(c, shape);
}

at::Tensor agp_quantize(const at::Tensor& g, int64_t group_dim, int64_t bits, int64_t seed) {
  TORCH_CHECK(seed >= 0, "lowbit.agp_quantize: seed must be >= 0; got ", seed);
  return arith::agp_quantize(g, group_dim, static_cast<int>(bits),
                             at::detail::createCPUGenerator(static_cast<uint64_t>(seed)));
}

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("luq_quantize(Tensor x, int bits=4, int seed=0) -> Tensor", &lowbit::bindings::luq_quantize);
  m.def("uniform_quantize4(Tensor x, bool clip=False) -> (Tensor, float, int)", &lowbit::bindings::uniform_quantize4);
  m.def("uniform_dequantize4(Tensor packed, float scale, int offset, int[] shape) -> Tensor",
        &lowbit::bindings::uniform_dequantize4);
  m.def("binarize(Tensor x) -> (Tensor, Tensor, bool)", &lowbit::bindings::binarize);
  m.def("debinarize(Tensor packed, Tensor scales, bool non_negative, int[] shape) -> Tensor",
        &lowbit::bindings::debinarize);
  m.def("binarize_weight(Tensor w) -> Tensor", &lowbit::arith::binarize_weight);
  m.def("agp_quantize(Tensor g, int group_dim, int bits=4, int seed=0) -> Tensor", &lowbit::bindings::agp_quantize);
}
