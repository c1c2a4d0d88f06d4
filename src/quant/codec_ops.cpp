#include "quant/codec_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace lowbit::ops {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}

}  // namespace

at::Tensor block_absmax(const at::Tensor& input, int64_t block_size, bool skip_diagonal, bool check_finite) {
  static const auto op = handle<at::Tensor(const at::Tensor&, int64_t, bool, bool)>("lowbit::block_absmax");
  return op.call(input, block_size, skip_diagonal, check_finite);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_blockwise(
    const at::Tensor& input, const at::Tensor& codebook, int64_t bits, int64_t block_size,
    bool keep_diagonal, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& scales,
    bool check_finite) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, bool, int64_t,
      const c10::optional<at::Tensor>&, bool)>("lowbit::quantize_blockwise");
  return op.call(input, codebook, bits, block_size, keep_diagonal, stochastic, seed, scales, check_finite);
}

at::Tensor& dequantize_blockwise_out(const at::Tensor& codes, const at::Tensor& scales,
                                     const at::Tensor& codebook,
                                     const c10::optional<at::Tensor>& diagonal, int64_t bits,
                                     int64_t block_size, at::Tensor& out) {
  static const auto op = handle<at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const c10::optional<at::Tensor>&, int64_t, int64_t,
                                            at::Tensor&)>("lowbit::dequantize_blockwise", "out");
  return op.call(codes, scales, codebook, diagonal, bits, block_size, out);
}

std::tuple<at::Tensor, at::Tensor> quantize_scales(const at::Tensor& scales,
                                                   const at::Tensor& scale_codebook, bool check_finite) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool)>(
      "lowbit::quantize_scales");
  return op.call(scales, scale_codebook, check_finite);
}

at::Tensor dequantize_scales(const at::Tensor& codes, const at::Tensor& group_max,
                             const at::Tensor& scale_codebook) {
  static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "lowbit::dequantize_scales");
  return op.call(codes, group_max, scale_codebook);
}

}  // namespace lowbit::ops
