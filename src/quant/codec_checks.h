// Argument checks shared by every backend of the codec ops: shapes, dtypes, options.
// Each failure is a c10::Error that names the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>

namespace lowbit::checks {

// A 2-D, strided (dense) float32/bfloat16/float16/float64 tensor.
void matrix_input(const char* op, const char* name, const at::Tensor& t);
// A 1-D float32 table of 2^bits values sorted ascending.
void codebook(const char* op, const at::Tensor& table, int64_t bits);
// uint8 codes of a rows x cols matrix packed at `bits`.
void packed_codes(const char* op, const at::Tensor& codes, int64_t bits, int64_t rows, int64_t cols);
// One scale of `dtype` (float32, or uint8 codes under double quantization) per block.
void block_scales(const char* op, const at::Tensor& scales, at::ScalarType dtype, int64_t rows,
                  int64_t cols, int64_t block_size);
// float32 [rows] for a square matrix; an undefined or empty tensor means "no diagonal".
void diagonal(const char* op, const at::Tensor& diagonal, int64_t rows, int64_t cols);
// All three of the above for a float32-scaled matrix.
void packed_matrix(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& diagonal, int64_t bits, int64_t block_size,
                   int64_t rows, int64_t cols);
// Every defined tensor lives on `device`.
void same_device(const char* op, const at::Device& device,
                 std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors);

// All arguments of one op, checked in the order every backend's kernel (CPU, CUDA) checks
// them first, so that a bad call fails with the same message whatever the device.
void block_absmax_args(const at::Tensor& input, int64_t block_size, bool skip_diagonal);
void quantize_blockwise_args(const at::Tensor& input, const at::Tensor& codebook, int64_t bits,
                             int64_t block_size, bool keep_diagonal,
                             const c10::optional<at::Tensor>& scales);
// Checked before the output is allocated: codes must be those of a [codes.size(0), cols]
// matrix at `bits`, so that a bad `cols` cannot ask for a huge output; dtype a float type.
void dequantize_blockwise_args(const at::Tensor& codes, int64_t bits, int64_t cols, at::ScalarType dtype);
void dequantize_blockwise_out_args(const at::Tensor& codes, const at::Tensor& scales,
                                   const at::Tensor& codebook, const c10::optional<at::Tensor>& diagonal,
                                   int64_t bits, int64_t block_size, const at::Tensor& out);
void quantize_scales_args(const at::Tensor& scales, const at::Tensor& scale_codebook);
void dequantize_scales_args(const at::Tensor& codes, const at::Tensor& group_max,
                            const at::Tensor& scale_codebook);

// Failures found while a kernel runs over the data.
// A NaN/Inf (or beyond-float32) input value at row-major flat index first_bad (< 0: none).
void finite_input(const char* op, int64_t first_bad, int64_t cols);
// A block scale handed to double quantization must be finite and non-negative.
void finite_nonnegative_scale(const char* op, int64_t index, float value);

// Loaded state: a tensor named `name` (in messages) holds only finite values (and, for
// scales, none below 0). One pass over the tensor: for loading, not for every step.
void finite_values(const char* op, const char* name, const at::Tensor& t);
void finite_nonnegative_values(const char* op, const char* name, const at::Tensor& t);
// A dtype a dequantized matrix can be written in.
void output_dtype(const char* op, at::ScalarType dtype);

}  // namespace lowbit::checks
