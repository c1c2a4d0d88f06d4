// A 2-D matrix stored block-wise at 3, 4 or 8 bits: a plain value made of tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/ArrayRef.h>

#include <map>
#include <string>
#include <vector>

#include <lowbit/quant_options.h>

namespace lowbit {

// Storage, all tensors on one device:
//   codes           uint8 [rows, ceil(cols * bits / 8)]; each row packed on its own
//                   (8 bits: one code a byte; 4 bits: element 2j in the low nibble of
//                   byte j; 3 bits: element k in bits 3k..3k+2 of the row's bit stream).
//   scales          float32 [rows, ceil(cols / block_size)], the absmax of each block;
//                   uint8 codes of the scale codebook under double quantization.
//   scale_group_max float32 [ceil(rows * blocks / 256)] (double quantization only).
//   diagonal        float32 [rows] (keep_diagonal only).
//   centroids       float32 [2^bits, 2] (mapping kashin only): the 2-D centroids (u_i, v_i) / scale
//                   that the codes index; scales are then block norms ||x||_2 / sqrt(len)
//                   (src/quant/kashin.h, docs/codec.md).
// Whether quantize checks its input for NaN/Inf (Checked: raises, nothing written) or takes
// the caller's word that it is finite (Assumed: a non-finite value gives valid codes of no
// meaning). The check is part of the pass over the data, free on a CPU, which checks anyway;
// on a GPU it is a host read per call, which Assumed skips (callers that sanitize first).
enum class FiniteInput { Checked, Assumed };

class QuantizedMatrix {
 public:
  QuantizedMatrix() = default;

  // Quantizes a 2-D floating matrix (float32, bfloat16, float16 or float64).
  // Throws c10::Error for invalid options, a non-2-D or non-floating input, a
  // non-square input with keep_diagonal, or (FiniteInput::Checked) non-finite values.
  static QuantizedMatrix quantize(const at::Tensor& matrix, const QuantOptions& options = {},
                                  FiniteInput input = FiniteInput::Checked);

  // A stack of B matrices, [B, rows, cols], quantized with one codec call: rows are coded
  // independently, so the stack is coded as one [B * rows, cols] matrix, and each result
  // holds views into that call's storage. The codes and scales equal those of B separate
  // calls, except that stochastic rounding numbers the elements over the whole stack.
  // keep_diagonal needs square matrices (their diagonals are set aside around the call);
  // double-quantized scales, whose groups of 256 could straddle two matrices, are coded
  // matrix by matrix. Throws like quantize.
  static std::vector<QuantizedMatrix> quantize_stack(const at::Tensor& stack, const QuantOptions& options = {},
                                                     FiniteInput input = FiniteInput::Checked);
  // Decodes B matrices of one shape and options into out, a contiguous [B, rows, cols]
  // floating tensor on their device, with one codec call.
  static void dequantize_stack(c10::ArrayRef<const QuantizedMatrix*> matrices, const at::Tensor& out);
  // Per stored tensor, `keep ? a : b`, chosen on the device (keep: a bool scalar tensor on
  // the storage device), so no host synchronisation; a and b must share shape and options.
  static QuantizedMatrix select(const at::Tensor& keep, const QuantizedMatrix& a, const QuantizedMatrix& b);

  // A new [rows, cols] tensor of `dtype` on the storage device.
  at::Tensor dequantize(at::ScalarType dtype = at::kFloat) const;
  // Writes into an existing contiguous [rows, cols] floating tensor on the same device;
  // on any mismatch it throws before writing.
  void dequantize_into(const at::Tensor& out) const;

  // The fp32 block scales actually used (dequantized under double quantization).
  at::Tensor effective_scales() const;

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  bool defined() const { return codes_.defined(); }
  const QuantOptions& options() const { return options_; }
  const at::Tensor& codes() const { return codes_; }
  const at::Tensor& scales() const { return scales_; }
  const at::Tensor& scale_group_max() const { return scale_group_max_; }
  const at::Tensor& diagonal() const { return diagonal_; }
  const at::Tensor& centroids() const { return centroids_; }

  // Bytes held by the tensors above, and the same figure from the layout formula.
  int64_t nbytes() const;
  static int64_t storage_bytes(int64_t rows, int64_t cols, const QuantOptions& options);

  QuantizedMatrix to(const at::Device& device) const;

  // Named tensors (plus an int64 "meta" tensor holding shape and options) for
  // checkpoints; from_state validates every shape and value and names what is wrong.
  std::map<std::string, at::Tensor> state() const;
  static QuantizedMatrix from_state(const std::map<std::string, at::Tensor>& state);

 private:
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  QuantOptions options_;
  at::Tensor codes_;
  at::Tensor scales_;
  at::Tensor scale_group_max_;
  at::Tensor diagonal_;
  at::Tensor centroids_;

  static QuantizedMatrix quantize_kashin(const at::Tensor& matrix, const QuantOptions& options, FiniteInput input);
  void dequantize_kashin_into(const at::Tensor& out) const;
};

// Bytes of one packed row of `cols` codes at `bits` bits (bits <= 8), ceil(cols * bits / 8),
// and blocks of a row, ceil(cols / block_size); for any cols >= 0 (sizes read from a
// checkpoint included) without overflowing int64.
inline int64_t packed_row_bytes(int64_t cols, int64_t bits) { return cols / 8 * bits + (cols % 8 * bits + 7) / 8; }
inline int64_t blocks_per_row(int64_t cols, int64_t block_size) {
  return cols / block_size + (cols % block_size != 0 ? 1 : 0);
}

}  // namespace lowbit
