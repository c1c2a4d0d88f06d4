// CUDA backend of the codec ops: the same argument checks as the CPU kernels
// (quant/codec_checks.h), outputs allocated on the input's device, and the kernels of
// codec_kernels.cu enqueued on the current stream. Built only against a CUDA LibTorch.
//
// Host synchronization: quantize_blockwise / block_absmax / quantize_scales read back one
// 8-byte flag after their kernel to report NaN/Inf inputs as the CPU does (a nothing-written
// error naming the first bad element), unless the caller passes check_finite=False (lowbit's
// factor refresh, which codes sanitized candidates). The codebook check reads a device table
// only if it is not one of lowbit's cached tables (codebook_on), whose values were checked on
// the host. With cached tables and check_finite=False, no op here waits for the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>

#include "cuda/codec_kernels.cuh"
#include "quant/codec_checks.h"

namespace lowbit {
namespace {

cuda::FloatType float_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::FloatType::kFloat32;
    case at::kDouble: return cuda::FloatType::kFloat64;
    case at::kHalf: return cuda::FloatType::kFloat16;
    case at::kBFloat16: return cuda::FloatType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "lowbit: no CUDA codec kernel for dtype ", dtype);  // the checks rule it out
}

// The CUDA kernel is chosen when any tensor argument is on a CUDA device; the tensor that
// decides where the op runs (input, out, codes) must then be one.
void runs_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(),
              " while another argument is on a CUDA device; move them to one device");
}

// The kernels read a codebook on their own device; CPU codebooks (the cached tables) move.
at::Tensor on_device(const at::Tensor& table, const at::Device& device) {
  return table.to(device, at::kFloat).contiguous();
}

cuda::BlockGrid block_grid(int64_t rows, int64_t cols, int64_t block_size) {
  return {rows, cols, block_size};
}

// One int64 on the device that the kernels lower to the first bad flat index.
at::Tensor first_bad_flag(const at::Device& device) {
  return at::empty({1}, at::TensorOptions().dtype(at::kLong).device(device));
}

// Reads the flag back (an 8-byte copy that synchronizes with the stream). kNoBadValue has
// every bit set, so it reads as -1: "none".
int64_t read_first_bad(const at::Tensor& flag) {
  static_assert(static_cast<int64_t>(cuda::kNoBadValue) == -1, "kNoBadValue must read as -1");
  return flag.item<int64_t>();
}

at::Tensor block_absmax_cuda(const at::Tensor& input_arg, int64_t block_size, bool skip_diagonal, bool check_finite) {
  constexpr const char* op = "lowbit::block_absmax";
  checks::block_absmax_args(input_arg, block_size, skip_diagonal);
  runs_on_cuda(op, "input", input_arg);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const int64_t rows = input.size(0), cols = input.size(1);
  at::Tensor scales = at::empty({rows, blocks_per_row(cols, block_size)}, input.options().dtype(at::kFloat));
  at::Tensor flag = first_bad_flag(input.device());
  C10_CUDA_CHECK(cuda::launch_block_absmax(
      input.const_data_ptr(), float_type(input.scalar_type()), block_grid(rows, cols, block_size),
      skip_diagonal, scales.mutable_data_ptr<float>(),
      reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>()),
      c10::cuda::getCurrentCUDAStream()));
  if (check_finite) checks::finite_input(op, read_first_bad(flag), cols);
  return scales;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_blockwise_cuda(
    const at::Tensor& input_arg, const at::Tensor& codebook, int64_t bits, int64_t block_size,
    bool keep_diagonal, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& given_scales,
    bool check_finite) {
  constexpr const char* op = "lowbit::quantize_blockwise";
  checks::quantize_blockwise_args(input_arg, codebook, bits, block_size, keep_diagonal, given_scales);
  runs_on_cuda(op, "input", input_arg);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous();
  const int64_t rows = input.size(0), cols = input.size(1);
  const bool use_given = given_scales.has_value() && given_scales->defined();
  const at::Tensor table = on_device(codebook, input.device());
  at::Tensor codes = at::empty({rows, packed_row_bytes(cols, bits)}, input.options().dtype(at::kByte));
  at::Tensor scales = use_given ? given_scales->contiguous().clone()
                                : at::empty({rows, blocks_per_row(cols, block_size)},
                                            input.options().dtype(at::kFloat));
  at::Tensor diagonal = at::empty({keep_diagonal ? rows : 0}, input.options().dtype(at::kFloat));
  at::Tensor flag = first_bad_flag(input.device());

  cuda::QuantizeArgs args{};
  args.input = input.const_data_ptr();
  args.type = float_type(input.scalar_type());
  args.grid = block_grid(rows, cols, block_size);
  args.codebook = table.const_data_ptr<float>();
  args.bits = static_cast<int>(bits);
  args.keep_diagonal = keep_diagonal;
  args.stochastic = stochastic;
  args.seed = static_cast<uint64_t>(seed);
  args.given_scales = use_given;
  args.scales = scales.mutable_data_ptr<float>();
  args.codes = codes.mutable_data_ptr<uint8_t>();
  args.diagonal = keep_diagonal ? diagonal.mutable_data_ptr<float>() : nullptr;
  args.first_bad = reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>());
  C10_CUDA_CHECK(cuda::launch_quantize_blockwise(args, c10::cuda::getCurrentCUDAStream()));
  if (check_finite) checks::finite_input(op, read_first_bad(flag), cols);
  return {codes, scales, diagonal};
}

at::Tensor& dequantize_blockwise_out_cuda(const at::Tensor& codes_arg, const at::Tensor& scales_arg,
                                          const at::Tensor& codebook,
                                          const c10::optional<at::Tensor>& diagonal, int64_t bits,
                                          int64_t block_size, at::Tensor& out) {
  constexpr const char* op = "lowbit::dequantize_blockwise.out";
  checks::dequantize_blockwise_out_args(codes_arg, scales_arg, codebook, diagonal, bits, block_size, out);
  runs_on_cuda(op, "out", out);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor codes = codes_arg.contiguous(), scales = scales_arg.contiguous();
  const at::Tensor table = on_device(codebook, out.device());
  const bool has_diag = diagonal.has_value() && diagonal->defined() && diagonal->numel() > 0;
  const at::Tensor diag = has_diag ? diagonal->contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_dequantize_blockwise(
      codes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), table.const_data_ptr<float>(),
      has_diag ? diag.const_data_ptr<float>() : nullptr, static_cast<int>(bits),
      block_grid(out.size(0), out.size(1), block_size), out.mutable_data_ptr(),
      float_type(out.scalar_type()), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_scales_cuda(const at::Tensor& scales_arg,
                                                        const at::Tensor& scale_codebook, bool check_finite) {
  constexpr const char* op = "lowbit::quantize_scales";
  checks::quantize_scales_args(scales_arg, scale_codebook);
  runs_on_cuda(op, "scales", scales_arg);
  const c10::cuda::CUDAGuard guard(scales_arg.device());
  const at::Tensor scales = scales_arg.contiguous();
  const at::Tensor table = on_device(scale_codebook, scales.device());
  const int64_t n = scales.numel();
  const int64_t groups = (n + kScaleGroupSize - 1) / kScaleGroupSize;
  at::Tensor codes = at::empty(scales.sizes(), scales.options().dtype(at::kByte));
  at::Tensor group_max = at::empty({groups}, scales.options());
  at::Tensor flag = first_bad_flag(scales.device());
  C10_CUDA_CHECK(cuda::launch_quantize_scales(
      scales.const_data_ptr<float>(), n, table.const_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(),
      group_max.mutable_data_ptr<float>(),
      reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>()),
      c10::cuda::getCurrentCUDAStream()));
  if (!check_finite) return {codes, group_max};
  const int64_t bad = read_first_bad(flag);
  if (bad >= 0) checks::finite_nonnegative_scale(op, bad, scales.reshape({-1})[bad].item<float>());
  return {codes, group_max};
}

at::Tensor dequantize_scales_cuda(const at::Tensor& codes_arg, const at::Tensor& group_max_arg,
                                  const at::Tensor& scale_codebook) {
  constexpr const char* op = "lowbit::dequantize_scales";
  checks::dequantize_scales_args(codes_arg, group_max_arg, scale_codebook);
  runs_on_cuda(op, "codes", codes_arg);
  const c10::cuda::CUDAGuard guard(codes_arg.device());
  const at::Tensor codes = codes_arg.contiguous(), group_max = group_max_arg.contiguous();
  const at::Tensor table = on_device(scale_codebook, codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_dequantize_scales(
      codes.const_data_ptr<uint8_t>(), codes.numel(), group_max.const_data_ptr<float>(),
      table.const_data_ptr<float>(), out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("block_absmax", &block_absmax_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cuda);
  m.impl("quantize_scales", &quantize_scales_cuda);
  m.impl("dequantize_scales", &dequantize_scales_cuda);
}

}  // namespace lowbit
