// The codec as torch ops (torch.ops.lowbit.* from Python). Backends register kernels for
// the tensor ops with TORCH_LIBRARY_IMPL: codec_cpu.cpp here, CUDA in src/cuda. The
// functional dequantize_blockwise is defined once here, over each backend's .out kernel.
//
// check_finite=False (block_absmax, quantize_blockwise, quantize_scales) is the caller's word
// that the input is finite (lowbit's factor refresh sanitizes what it codes). The CUDA kernels
// then skip reading back the flag that reports a NaN/Inf, a host synchronisation per call;
// a non-finite value still yields valid codes (of no meaning), never a fault. The CPU kernels
// check anyway: there the check is part of the pass over the data and costs no round trip.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <lowbit/codebook.h>

#include "quant/codec_checks.h"
#include "quant/codec_ops.h"

namespace {

at::Tensor codebook_op(c10::string_view mapping, int64_t bits) {
  lowbit::check_bits(bits, "lowbit::codebook: bits");
  return lowbit::codebook(lowbit::parse_mapping(std::string_view(mapping.data(), mapping.size())),
                          static_cast<int>(bits))
      .clone();
}

// The functional dequantize of every backend: allocate, then the backend's .out kernel.
at::Tensor dequantize_blockwise_op(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& codebook,
                                   const c10::optional<at::Tensor>& diagonal, int64_t bits, int64_t block_size,
                                   int64_t cols, at::ScalarType dtype) {
  lowbit::checks::dequantize_blockwise_args(codes, bits, cols, dtype);
  at::Tensor out = at::empty({codes.size(0), cols}, codes.options().dtype(dtype));
  return lowbit::ops::dequantize_blockwise_out(codes, scales, codebook, diagonal, bits, block_size, out);
}

}  // namespace

TORCH_LIBRARY(lowbit, m) {
  // Tables take no tensor input, so one backend-independent kernel serves every device.
  m.def("codebook(str mapping, int bits) -> Tensor", &codebook_op);
  m.def("block_absmax(Tensor input, int block_size, bool skip_diagonal=False, bool check_finite=True) -> Tensor");
  m.def(
      "quantize_blockwise(Tensor input, Tensor codebook, int bits, int block_size, "
      "bool keep_diagonal=False, bool stochastic=False, int seed=0, Tensor? scales=None, "
      "bool check_finite=True) -> (Tensor codes, Tensor scales, Tensor diagonal)");
  m.def(
      "dequantize_blockwise(Tensor codes, Tensor scales, Tensor codebook, Tensor? diagonal, "
      "int bits, int block_size, int cols, ScalarType dtype=float) -> Tensor");
  m.def(
      "dequantize_blockwise.out(Tensor codes, Tensor scales, Tensor codebook, Tensor? diagonal, "
      "int bits, int block_size, *, Tensor(a!) out) -> Tensor(a!)");
  m.def(
      "quantize_scales(Tensor scales, Tensor scale_codebook, bool check_finite=True) "
      "-> (Tensor codes, Tensor group_max)");
  m.def("dequantize_scales(Tensor codes, Tensor group_max, Tensor scale_codebook) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) {
  m.impl("dequantize_blockwise", &dequantize_blockwise_op);
}
