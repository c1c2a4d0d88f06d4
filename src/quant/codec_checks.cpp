#include "quant/codec_checks.h"

#include <lowbit/codebook.h>
#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>

#include <c10/util/Exception.h>

#include <cfloat>
#include <sstream>
#include <string>

namespace lowbit::checks {

void matrix_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name,
              " must be a dense (strided) tensor; got layout ", t.layout());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D matrix; got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                  dtype == at::kDouble,
              op, ": ", name, " must be float32, bfloat16, float16 or float64; got ", dtype);
}

void codebook(const char* op, const at::Tensor& table, int64_t bits) {
  check_bits(bits, (std::string(op) + ": bits").c_str());
  TORCH_CHECK(table.defined() && table.dim() == 1 && table.scalar_type() == at::kFloat &&
                  table.numel() == (int64_t{1} << bits),
              op, ": codebook must be a 1-D float32 tensor of 2^bits = ", int64_t{1} << bits,
              " values; got ", table.defined() ? table.toString() : "undefined", " of shape ",
              table.defined() ? table.sizes() : at::IntArrayRef{});
  if (is_cached_codebook(table)) return;  // made sorted by lowbit; reading a device copy would synchronise
  const at::Tensor host = table.cpu().contiguous();
  const float* v = host.data_ptr<float>();
  for (int64_t k = 0; k + 1 < host.numel(); ++k)
    TORCH_CHECK(v[k] < v[k + 1], op, ": codebook must be strictly ascending; entry ", k + 1,
                " (", v[k + 1], ") does not exceed entry ", k, " (", v[k], ")");
}

namespace {
std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::ostringstream out;
  out << c10::toString(t.scalar_type()) << " of shape " << t.sizes();
  return out.str();
}
}  // namespace

void packed_codes(const char* op, const at::Tensor& codes, int64_t bits, int64_t rows, int64_t cols) {
  check_bits(bits, (std::string(op) + ": bits").c_str());
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": matrix shape must be non-negative; got ", rows,
              " x ", cols);
  const int64_t row_bytes = packed_row_bytes(cols, bits);
  TORCH_CHECK(codes.defined() && codes.scalar_type() == at::kByte && codes.dim() == 2 &&
                  codes.size(0) == rows && codes.size(1) == row_bytes,
              op, ": codes must be uint8 of shape [", rows, ", ", row_bytes, "] for a ", rows,
              " x ", cols, " matrix at ", bits, " bits; got ", describe(codes));
}

void block_scales(const char* op, const at::Tensor& scales, at::ScalarType dtype, int64_t rows,
                  int64_t cols, int64_t block_size) {
  check_block_size(block_size, (std::string(op) + ": block_size").c_str());
  const int64_t blocks = blocks_per_row(cols, block_size);
  TORCH_CHECK(scales.defined() && scales.scalar_type() == dtype && scales.dim() == 2 &&
                  scales.size(0) == rows && scales.size(1) == blocks,
              op, ": scales must be ", c10::toString(dtype), " of shape [", rows, ", ", blocks,
              "] (block_size ", block_size, "); got ", describe(scales));
}

void diagonal(const char* op, const at::Tensor& diagonal, int64_t rows, int64_t cols) {
  if (!diagonal.defined() || diagonal.numel() == 0) return;
  TORCH_CHECK(rows == cols, op, ": a diagonal is only allowed for a square matrix; got ", rows,
              " x ", cols);
  TORCH_CHECK(diagonal.scalar_type() == at::kFloat && diagonal.dim() == 1 && diagonal.size(0) == rows,
              op, ": diagonal must be float32 of shape [", rows, "]; got ", describe(diagonal));
}

void packed_matrix(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& diag, int64_t bits, int64_t block_size,
                   int64_t rows, int64_t cols) {
  packed_codes(op, codes, bits, rows, cols);
  block_scales(op, scales, at::kFloat, rows, cols, block_size);
  if (diag.has_value()) diagonal(op, *diag, rows, cols);
}

void same_device(const char* op, const at::Device& device,
                 std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    if (t->defined())
      TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
                  " but the operation runs on ", device);
}

void block_absmax_args(const at::Tensor& input, int64_t block_size, bool skip_diagonal) {
  constexpr const char* op = "lowbit::block_absmax";
  matrix_input(op, "input", input);
  check_block_size(block_size, "lowbit::block_absmax: block_size");
  TORCH_CHECK(!skip_diagonal || input.size(0) == input.size(1), op,
              ": skip_diagonal needs a square matrix; got ", input.sizes());
}

void quantize_blockwise_args(const at::Tensor& input, const at::Tensor& table, int64_t bits,
                             int64_t block_size, bool keep_diagonal,
                             const c10::optional<at::Tensor>& scales) {
  constexpr const char* op = "lowbit::quantize_blockwise";
  matrix_input(op, "input", input);
  codebook(op, table, bits);
  check_block_size(block_size, "lowbit::quantize_blockwise: block_size");
  TORCH_CHECK(!keep_diagonal || input.size(0) == input.size(1), op,
              ": keep_diagonal needs a square matrix; got shape ", input.sizes());
  if (scales.has_value() && scales->defined()) {
    const int64_t rows = input.size(0), blocks = blocks_per_row(input.size(1), block_size);
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 2 &&
                    scales->size(0) == rows && scales->size(1) == blocks,
                op, ": scales must be float32 of shape [", rows, ", ", blocks, "]; got ",
                scales->toString(), " of shape ", scales->sizes());
    same_device(op, input.device(), {{"scales", &*scales}});
    // A NaN/Inf or negative scale would be handed back and decode to NaN/Inf (or to the
    // mirror image of the block): refused, like quantize_scales refuses such input.
    TORCH_CHECK(scales->numel() == 0 || (scales->isfinite().all().item<bool>() && scales->ge(0).all().item<bool>()),
                op, ": scales must be finite and non-negative");
  }
}

void dequantize_blockwise_args(const at::Tensor& codes, int64_t bits, int64_t cols, at::ScalarType dtype) {
  constexpr const char* op = "lowbit::dequantize_blockwise";
  TORCH_CHECK(codes.defined() && codes.dim() == 2, op, ": codes must be 2-D; got ", describe(codes));
  TORCH_CHECK(cols >= 0, op, ": cols must be non-negative; got ", cols);
  packed_codes(op, codes, bits, codes.size(0), cols);
  output_dtype(op, dtype);
}

void output_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
              ": dtype must be float32, bfloat16, float16 or float64; got ", dtype);
}

void dequantize_blockwise_out_args(const at::Tensor& codes, const at::Tensor& scales,
                                   const at::Tensor& table, const c10::optional<at::Tensor>& diag,
                                   int64_t bits, int64_t block_size, const at::Tensor& out) {
  constexpr const char* op = "lowbit::dequantize_blockwise.out";
  matrix_input(op, "out", out);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  codebook(op, table, bits);
  packed_matrix(op, codes, scales, diag, bits, block_size, out.size(0), out.size(1));
  const at::Tensor diag_t = diag.has_value() ? *diag : at::Tensor();
  same_device(op, out.device(), {{"codes", &codes}, {"scales", &scales}, {"diagonal", &diag_t}});
}

void quantize_scales_args(const at::Tensor& scales, const at::Tensor& scale_codebook) {
  constexpr const char* op = "lowbit::quantize_scales";
  TORCH_CHECK(scales.defined() && scales.scalar_type() == at::kFloat, op,
              ": scales must be a float32 tensor");
  TORCH_CHECK(scale_codebook.defined() && scale_codebook.scalar_type() == at::kFloat &&
                  scale_codebook.dim() == 1 && scale_codebook.numel() == 256,
              op, ": scale_codebook must be 256 float32 values");
  const at::Tensor host = scale_codebook.cpu().contiguous();
  const float* table = host.data_ptr<float>();
  TORCH_CHECK(table[0] == 0.f && table[255] == 1.f, op, ": scale_codebook must run from 0 to 1");
}

void dequantize_scales_args(const at::Tensor& codes, const at::Tensor& group_max,
                            const at::Tensor& scale_codebook) {
  constexpr const char* op = "lowbit::dequantize_scales";
  TORCH_CHECK(codes.defined() && codes.scalar_type() == at::kByte, op, ": codes must be uint8");
  const int64_t n = codes.numel();
  const int64_t groups = (n + kScaleGroupSize - 1) / kScaleGroupSize;
  TORCH_CHECK(group_max.defined() && group_max.scalar_type() == at::kFloat && group_max.dim() == 1 &&
                  group_max.numel() == groups,
              op, ": group_max must be float32 of shape [", groups, "] for ", n, " scales; got ",
              group_max.defined() ? group_max.sizes() : at::IntArrayRef{});
  TORCH_CHECK(scale_codebook.defined() && scale_codebook.scalar_type() == at::kFloat &&
                  scale_codebook.numel() == 256,
              op, ": scale_codebook must be 256 float32 values");
  same_device(op, codes.device(), {{"group_max", &group_max}});
}

void finite_input(const char* op, int64_t first_bad, int64_t cols) {
  TORCH_CHECK(first_bad < 0, op, ": input contains NaN or Inf (or a value beyond float32 range), "
              "first at [", first_bad / cols, ", ", first_bad % cols, "]; nothing was written");
}

void finite_values(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  TORCH_CHECK(t.isfinite().all().item<bool>(), op, ": \"", name, "\" holds NaN or Inf");
}

void finite_nonnegative_values(const char* op, const char* name, const at::Tensor& t) {
  finite_values(op, name, t);
  if (t.numel() == 0) return;
  TORCH_CHECK(!t.lt(0).any().item<bool>(), op, ": \"", name, "\" holds a negative value; scales are >= 0");
}

void finite_nonnegative_scale(const char* op, int64_t index, float value) {
  TORCH_CHECK(value >= 0.f && value <= FLT_MAX, op,
              ": scales must be finite and non-negative; entry ", index, " is ", value);
}

}  // namespace lowbit::checks
