#include <lowbit/quantized_matrix.h>

#include <lowbit/codebook.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>

#include "quant/codec_checks.h"
#include "quant/codec_ops.h"
#include "quant/kashin.h"

namespace lowbit {
namespace {

// Layout of the int64 "meta" tensor in state(): shape and the options needed to decode.
enum MetaField { kRows, kCols, kBits, kMapping, kBlockSize, kKeepDiagonal, kDoubleQuant, kMetaSize };

at::Tensor on_device(const at::Tensor& table, const at::Device& device) { return codebook_on(table, device); }

}  // namespace

QuantizedMatrix QuantizedMatrix::quantize(const at::Tensor& matrix, const QuantOptions& options, FiniteInput input) {
  options.validate();
  checks::matrix_input("lowbit::QuantizedMatrix::quantize", "matrix", matrix);
  TORCH_CHECK(!options.keep_diagonal || matrix.size(0) == matrix.size(1),
              "lowbit::QuantizedMatrix::quantize: keep_diagonal needs a square matrix; got shape ",
              matrix.sizes());
  if (options.mapping == Mapping::Kashin) return quantize_kashin(matrix, options, input);
  const at::Device device = matrix.device();
  const at::Tensor table = on_device(codebook(options.mapping, options.bits), device);
  const bool stochastic = options.rounding == Rounding::Stochastic;
  const auto seed = static_cast<int64_t>(options.seed);
  const bool check_finite = input == FiniteInput::Checked;

  QuantizedMatrix q;
  q.rows_ = matrix.size(0);
  q.cols_ = matrix.size(1);
  q.options_ = options;
  if (!options.double_quant_scales) {
    std::tie(q.codes_, q.scales_, q.diagonal_) = ops::quantize_blockwise(
        matrix, table, options.bits, options.block_size, options.keep_diagonal, stochastic, seed,
        c10::nullopt, check_finite);
  } else {
    // Scales are quantized first (rounded up), and the codes are then taken against the
    // dequantized scales, so the stored scale is exactly the one the codes were made for.
    const at::Tensor absmax = ops::block_absmax(matrix, options.block_size, options.keep_diagonal, check_finite);
    const at::Tensor scale_table = on_device(scale_codebook(), device);
    std::tie(q.scales_, q.scale_group_max_) = ops::quantize_scales(absmax, scale_table, check_finite);
    const at::Tensor effective = ops::dequantize_scales(q.scales_, q.scale_group_max_, scale_table);
    at::Tensor unused_scales;
    std::tie(q.codes_, unused_scales, q.diagonal_) = ops::quantize_blockwise(
        matrix, table, options.bits, options.block_size, options.keep_diagonal, stochastic, seed,
        effective, check_finite);
  }
  if (!options.keep_diagonal) q.diagonal_ = at::Tensor();
  return q;
}

QuantizedMatrix QuantizedMatrix::quantize_kashin(const at::Tensor& matrix, const QuantOptions& options,
                                                 FiniteInput input) {
  at::Tensor x = matrix.to(at::kFloat, /*non_blocking=*/false, /*copy=*/options.keep_diagonal);
  if (input == FiniteInput::Checked) {  // as the table codec: a double beyond float32 range counts
    const at::Tensor bad = x.isfinite().logical_not_().flatten();
    if (bad.any().item<bool>())
      checks::finite_input("lowbit::QuantizedMatrix::quantize", bad.to(at::kByte).argmax().item<int64_t>(), x.size(1));
  }
  QuantizedMatrix q;
  q.rows_ = matrix.size(0);
  q.cols_ = matrix.size(1);
  q.options_ = options;
  if (options.keep_diagonal) {
    // As in the table codec: the diagonal is kept in fp32 and coded as 0.
    q.diagonal_ = x.diagonal().clone();
    x.diagonal().zero_();
  }
  kashin::Code code = kashin::encode(x, options.bits, options.block_size);
  q.codes_ = kashin::pack_rows(code.indices, options.bits);
  q.scales_ = code.scales;
  q.centroids_ = code.centroids;
  return q;
}

void QuantizedMatrix::dequantize_kashin_into(const at::Tensor& out) const {
  kashin::decode_into(kashin::unpack_rows(codes_, options_.bits, cols_), scales_, centroids_, options_.block_size, out);
  if (diagonal_.defined()) out.diagonal().copy_(diagonal_);
}

std::vector<QuantizedMatrix> QuantizedMatrix::quantize_stack(const at::Tensor& stack, const QuantOptions& options,
                                                             FiniteInput input) {
  constexpr const char* op = "lowbit::QuantizedMatrix::quantize_stack";
  TORCH_CHECK(stack.defined() && stack.dim() == 3, op, ": stack must be a 3-D tensor [B, rows, cols]; got ",
              stack.defined() ? stack.sizes() : at::IntArrayRef{});
  const int64_t count = stack.size(0), rows = stack.size(1), cols = stack.size(2);
  std::vector<QuantizedMatrix> out;
  out.reserve(static_cast<size_t>(count));
  // Kashin centroids are fitted per matrix, so a stack is coded matrix by matrix.
  if (options.double_quant_scales || options.mapping == Mapping::Kashin || count <= 1) {
    for (int64_t i = 0; i < count; ++i) out.push_back(quantize(stack[i], options, input));
    return out;
  }
  options.validate();
  TORCH_CHECK(!options.keep_diagonal || rows == cols, op, ": keep_diagonal needs square matrices; got ", rows,
              " x ", cols);
  // One [B * rows, cols] matrix. A kept diagonal is taken out and zeroed, which is what the
  // codec does with it inside one square matrix (excluded from the scale, coded as 0).
  at::Tensor flat = stack.contiguous();
  at::Tensor diagonals;
  const bool aliased = flat.is_same(stack) || flat.data_ptr() == stack.data_ptr();
  if (options.keep_diagonal) {
    diagonals = flat.diagonal(0, -2, -1).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    flat.diagonal(0, -2, -1).zero_();
  }
  QuantOptions plain = options;
  plain.keep_diagonal = false;
  QuantizedMatrix all;
  try {
    all = quantize(flat.view({count * rows, cols}), plain, input);
  } catch (...) {
    if (options.keep_diagonal && aliased) flat.diagonal(0, -2, -1).copy_(diagonals);
    throw;
  }
  if (options.keep_diagonal && aliased) flat.diagonal(0, -2, -1).copy_(diagonals);  // the caller's stack as it was
  for (int64_t i = 0; i < count; ++i) {
    QuantizedMatrix q;
    q.rows_ = rows;
    q.cols_ = cols;
    q.options_ = options;
    q.codes_ = all.codes_.narrow(0, i * rows, rows);
    q.scales_ = all.scales_.narrow(0, i * rows, rows);
    if (options.keep_diagonal) q.diagonal_ = diagonals[i];
    out.push_back(std::move(q));
  }
  return out;
}

void QuantizedMatrix::dequantize_stack(c10::ArrayRef<const QuantizedMatrix*> matrices, const at::Tensor& out) {
  constexpr const char* op = "lowbit::QuantizedMatrix::dequantize_stack";
  const int64_t count = static_cast<int64_t>(matrices.size());
  TORCH_CHECK(count > 0, op, ": no matrices");
  const QuantizedMatrix& first = *matrices[0];
  TORCH_CHECK(first.defined(), op, ": matrix 0 is empty (default-constructed)");
  TORCH_CHECK(out.defined() && out.dim() == 3 && out.size(0) == count && out.size(1) == first.rows_ &&
                  out.size(2) == first.cols_ && out.is_contiguous(),
              op, ": out must be a contiguous [", count, ", ", first.rows_, ", ", first.cols_, "] tensor; got ",
              out.defined() ? out.sizes() : at::IntArrayRef{});
  for (int64_t i = 1; i < count; ++i) {
    const QuantizedMatrix& m = *matrices[i];
    TORCH_CHECK(m.defined() && m.rows_ == first.rows_ && m.cols_ == first.cols_ && m.options_ == first.options_,
                op, ": matrix ", i, " differs from matrix 0 in shape or options");
  }
  if (count == 1 || first.options_.mapping == Mapping::Kashin) {
    for (int64_t i = 0; i < count; ++i) matrices[i]->dequantize_into(out[i]);
    return;
  }
  std::vector<at::Tensor> codes, scales, diagonals;
  for (const QuantizedMatrix* m : matrices) {
    codes.push_back(m->codes_);
    scales.push_back(m->effective_scales());
    if (m->diagonal_.defined()) diagonals.push_back(m->diagonal_);
  }
  at::Tensor flat = out.view({count * first.rows_, first.cols_});
  ops::dequantize_blockwise_out(at::cat(codes), at::cat(scales),
                                on_device(codebook(first.options_.mapping, first.options_.bits), out.device()),
                                c10::nullopt, first.options_.bits, first.options_.block_size, flat);
  if (!diagonals.empty()) out.diagonal(0, -2, -1).copy_(at::stack(diagonals));
}

QuantizedMatrix QuantizedMatrix::select(const at::Tensor& keep, const QuantizedMatrix& a, const QuantizedMatrix& b) {
  TORCH_CHECK(a.defined() && b.defined() && a.rows_ == b.rows_ && a.cols_ == b.cols_ && a.options_ == b.options_,
              "lowbit::QuantizedMatrix::select: both matrices must share shape and options");
  QuantizedMatrix q = a;
  for (auto [into, other] : {std::pair{&q.codes_, &b.codes_}, std::pair{&q.scales_, &b.scales_},
                             std::pair{&q.scale_group_max_, &b.scale_group_max_}, std::pair{&q.diagonal_, &b.diagonal_},
                             std::pair{&q.centroids_, &b.centroids_}})
    if (into->defined()) *into = at::where(keep, *into, *other);
  return q;
}

at::Tensor QuantizedMatrix::effective_scales() const {
  TORCH_CHECK(defined(), "lowbit::QuantizedMatrix: the matrix is empty (default-constructed)");
  if (!options_.double_quant_scales) return scales_;
  return ops::dequantize_scales(scales_, scale_group_max_, on_device(scale_codebook(), codes_.device()));
}

at::Tensor QuantizedMatrix::dequantize(at::ScalarType dtype) const {
  TORCH_CHECK(defined(), "lowbit::QuantizedMatrix: the matrix is empty (default-constructed)");
  at::Tensor out = at::empty({rows_, cols_}, codes_.options().dtype(dtype));
  dequantize_into(out);
  return out;
}

void QuantizedMatrix::dequantize_into(const at::Tensor& out) const {
  TORCH_CHECK(defined(), "lowbit::QuantizedMatrix: the matrix is empty (default-constructed)");
  TORCH_CHECK(out.defined() && out.dim() == 2 && out.size(0) == rows_ && out.size(1) == cols_,
              "lowbit::QuantizedMatrix::dequantize_into: out must have shape [", rows_, ", ", cols_,
              "]; got ", out.defined() ? out.sizes() : at::IntArrayRef{});
  if (options_.mapping == Mapping::Kashin) {
    dequantize_kashin_into(out);
    return;
  }
  at::Tensor target = out;
  const c10::optional<at::Tensor> diagonal =
      diagonal_.defined() ? c10::optional<at::Tensor>(diagonal_) : c10::nullopt;
  ops::dequantize_blockwise_out(codes_, effective_scales(),
                                on_device(codebook(options_.mapping, options_.bits), codes_.device()),
                                diagonal, options_.bits, options_.block_size, target);
}

int64_t QuantizedMatrix::nbytes() const {
  int64_t total = 0;
  for (const at::Tensor* t : {&codes_, &scales_, &scale_group_max_, &diagonal_, &centroids_})
    if (t->defined()) total += t->numel() * static_cast<int64_t>(t->element_size());
  return total;
}

int64_t QuantizedMatrix::storage_bytes(int64_t rows, int64_t cols, const QuantOptions& options) {
  const int64_t blocks = rows * blocks_per_row(cols, options.block_size);
  int64_t bytes = rows * packed_row_bytes(cols, options.bits);
  if (options.double_quant_scales)
    bytes += blocks + 4 * ((blocks + kScaleGroupSize - 1) / kScaleGroupSize);
  else
    bytes += 4 * blocks;
  if (options.keep_diagonal) bytes += 4 * rows;
  if (options.mapping == Mapping::Kashin) bytes += 4 * 2 * (int64_t{1} << options.bits);  // fp32 centroids
  return bytes;
}

QuantizedMatrix QuantizedMatrix::to(const at::Device& device) const {
  QuantizedMatrix q = *this;
  for (at::Tensor* t : {&q.codes_, &q.scales_, &q.scale_group_max_, &q.diagonal_, &q.centroids_})
    if (t->defined()) *t = t->to(device);
  return q;
}

std::map<std::string, at::Tensor> QuantizedMatrix::state() const {
  TORCH_CHECK(defined(), "lowbit::QuantizedMatrix::state: the matrix is empty");
  std::vector<int64_t> meta(kMetaSize);
  meta[kRows] = rows_;
  meta[kCols] = cols_;
  meta[kBits] = options_.bits;
  meta[kMapping] = static_cast<int64_t>(options_.mapping);
  meta[kBlockSize] = options_.block_size;
  meta[kKeepDiagonal] = options_.keep_diagonal;
  meta[kDoubleQuant] = options_.double_quant_scales;
  std::map<std::string, at::Tensor> state{{"meta", at::tensor(meta, at::kLong)},
                                          {"codes", codes_},
                                          {"scales", scales_}};
  if (scale_group_max_.defined()) state["scale_group_max"] = scale_group_max_;
  if (diagonal_.defined()) state["diagonal"] = diagonal_;
  if (centroids_.defined()) state["centroids"] = centroids_;
  return state;
}

QuantizedMatrix QuantizedMatrix::from_state(const std::map<std::string, at::Tensor>& state) {
  constexpr const char* op = "lowbit::QuantizedMatrix::from_state";
  auto get = [&](const char* key, bool required) -> at::Tensor {
    auto it = state.find(key);
    TORCH_CHECK(!required || it != state.end(), op, ": the state has no \"", key, "\" entry");
    return it == state.end() ? at::Tensor() : it->second;
  };
  const at::Tensor meta_t = get("meta", true);
  TORCH_CHECK(meta_t.scalar_type() == at::kLong && meta_t.dim() == 1 && meta_t.numel() == kMetaSize,
              op, ": \"meta\" must be int64 of shape [", static_cast<int64_t>(kMetaSize), "]; got ",
              meta_t.toString(), " of shape ", meta_t.sizes());
  const at::Tensor meta_host = meta_t.cpu().contiguous();
  const int64_t* meta = meta_host.data_ptr<int64_t>();
  TORCH_CHECK(meta[kMapping] >= 0 && meta[kMapping] <= static_cast<int64_t>(Mapping::Kashin), op, ": \"meta\" holds an unknown mapping id ",
              meta[kMapping]);
  TORCH_CHECK(meta[kKeepDiagonal] == 0 || meta[kKeepDiagonal] == 1, op,
              ": \"meta\" holds a bad keep_diagonal flag ", meta[kKeepDiagonal], " (expected 0 or 1)");
  TORCH_CHECK(meta[kDoubleQuant] == 0 || meta[kDoubleQuant] == 1, op,
              ": \"meta\" holds a bad double_quant flag ", meta[kDoubleQuant], " (expected 0 or 1)");
  TORCH_CHECK(meta[kRows] >= 0 && meta[kCols] >= 0, op, ": \"meta\" holds a negative shape ", meta[kRows], " x ",
              meta[kCols]);
  // Checked as int64, before the narrowing to QuantOptions.bits.
  check_bits(meta[kBits], (std::string(op) + ": \"meta\" bits").c_str());
  check_block_size(meta[kBlockSize], (std::string(op) + ": \"meta\" block_size").c_str());
  // Orders beyond 2^40 are no real matrix; the bound keeps cols * bits (packed_row_bytes) from overflowing.
  constexpr int64_t kMaxOrder = int64_t{1} << 40;
  TORCH_CHECK(meta[kRows] <= kMaxOrder && meta[kCols] <= kMaxOrder, op, ": \"meta\" holds a matrix shape of ",
              meta[kRows], " x ", meta[kCols], "; expected orders in [0, 2^40]");

  QuantizedMatrix q;
  q.rows_ = meta[kRows];
  q.cols_ = meta[kCols];
  q.options_.bits = static_cast<int>(meta[kBits]);
  q.options_.mapping = static_cast<Mapping>(meta[kMapping]);
  q.options_.block_size = meta[kBlockSize];
  q.options_.keep_diagonal = meta[kKeepDiagonal] == 1;
  q.options_.double_quant_scales = meta[kDoubleQuant] == 1;
  q.codes_ = get("codes", true);
  q.scales_ = get("scales", true);
  q.scale_group_max_ = get("scale_group_max", q.options_.double_quant_scales);
  q.diagonal_ = get("diagonal", q.options_.keep_diagonal);
  const bool kashin = q.options_.mapping == Mapping::Kashin;
  q.centroids_ = get("centroids", kashin);
  TORCH_CHECK(kashin || !q.centroids_.defined(), op,
              ": the state has a \"centroids\" entry but \"meta\" says its mapping is not kashin");
  if (kashin) {
    TORCH_CHECK(q.options_.bits == 3 || q.options_.bits == 4, op, ": \"meta\" holds bits ", q.options_.bits,
                " with mapping kashin; expected 3 or 4");
    TORCH_CHECK(!q.options_.double_quant_scales, op,
                ": \"meta\" sets double-quantized scales with mapping kashin, which has none");
    const int64_t count = int64_t{1} << q.options_.bits;
    TORCH_CHECK(q.centroids_.scalar_type() == at::kFloat && q.centroids_.dim() == 2 && q.centroids_.size(0) == count &&
                    q.centroids_.size(1) == 2,
                op, ": \"centroids\" must be float32 of shape [", count, ", 2]; got ", q.centroids_.toString(),
                " of shape ", q.centroids_.sizes());
  }
  // An entry the options do not use would be ignored (or, a diagonal, written over the
  // decoded one): the state is not what it claims to be.
  TORCH_CHECK(q.options_.double_quant_scales || !q.scale_group_max_.defined(), op,
              ": the state has a \"scale_group_max\" entry but \"meta\" says its scales are not double-quantized");
  TORCH_CHECK(q.options_.keep_diagonal || !q.diagonal_.defined(), op,
              ": the state has a \"diagonal\" entry but \"meta\" says keep_diagonal is off");
  TORCH_CHECK(!q.options_.keep_diagonal || q.rows_ == q.cols_, op,
              ": \"meta\" sets keep_diagonal for a ", q.rows_, " x ", q.cols_, " matrix; it needs a square one");

  checks::packed_codes(op, q.codes_, q.options_.bits, q.rows_, q.cols_);
  checks::block_scales(op, q.scales_, q.options_.double_quant_scales ? at::kByte : at::kFloat,
                       q.rows_, q.cols_, q.options_.block_size);
  checks::diagonal(op, q.diagonal_, q.rows_, q.cols_);
  TORCH_CHECK(!q.options_.keep_diagonal || q.diagonal_.numel() == q.rows_, op,
              ": keep_diagonal is set, so \"diagonal\" must hold ", q.rows_, " values; it holds ",
              q.diagonal_.numel());
  if (q.options_.double_quant_scales) {
    const int64_t blocks = blocks_per_row(q.cols_, q.options_.block_size);
    const int64_t groups = (q.rows_ * blocks + kScaleGroupSize - 1) / kScaleGroupSize;
    TORCH_CHECK(q.scale_group_max_.scalar_type() == at::kFloat && q.scale_group_max_.dim() == 1 &&
                    q.scale_group_max_.numel() == groups,
                op, ": \"scale_group_max\" must be float32 of shape [", groups, "]; got ",
                q.scale_group_max_.sizes());
  }
  const at::Device device = q.codes_.device();
  checks::same_device(op, device, {{"scales", &q.scales_}, {"scale_group_max", &q.scale_group_max_},
                                   {"diagonal", &q.diagonal_}, {"centroids", &q.centroids_}});
  // Values: scales are block absmaxes (and group maxima of them), finite and >= 0; the kept
  // diagonal was checked finite when it was quantized. A NaN or a negative scale would
  // decode silently to NaN or to flipped signs.
  if (!q.options_.double_quant_scales) checks::finite_nonnegative_values(op, "scales", q.scales_);
  if (q.scale_group_max_.defined()) checks::finite_nonnegative_values(op, "scale_group_max", q.scale_group_max_);
  if (q.diagonal_.defined()) checks::finite_values(op, "diagonal", q.diagonal_);
  if (q.centroids_.defined()) checks::finite_values(op, "centroids", q.centroids_);
  return q;
}

}  // namespace lowbit
