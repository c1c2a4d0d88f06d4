// CPU kernels of the codec ops. Work is split over blocks (at::parallel_for); a block is
// loaded once into a float buffer, its scale taken, its codes found and packed, so each
// element is read from memory once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>

#include <lowbit/quant_options.h>
#include <lowbit/quantized_matrix.h>

#include "quant/codec_checks.h"
#include "quant/counter_rng.h"
#include "quant/packing.h"

// The hot loops get an AVX2 clone next to the baseline x86-64 one; the loader picks
// the clone the running CPU supports (GCC/Clang function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define LOWBIT_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define LOWBIT_MULTIVERSION
#endif

namespace lowbit {
namespace {

constexpr int64_t kElementsPerTask = 32768;  // parallel_for grain, in elements

struct BlockGrid {
  int64_t rows, cols, block_size, blocks_per_row;
  int64_t total() const { return rows * blocks_per_row; }
  int64_t row(int64_t b) const { return b / blocks_per_row; }
  int64_t first_col(int64_t b) const { return (b % blocks_per_row) * block_size; }
  int64_t length(int64_t b) const { return std::min(block_size, cols - first_col(b)); }
  int64_t grain() const { return std::max<int64_t>(1, kElementsPerTask / block_size); }
};

// Column of the diagonal element inside block b, or -1 when the block holds none.
int64_t diagonal_offset(const BlockGrid& g, int64_t b) {
  const int64_t r = g.row(b), c0 = g.first_col(b);
  return (r >= c0 && r < c0 + g.length(b)) ? r - c0 : -1;
}

// Copies a block to float and reports whether any value is NaN/Inf (or beyond float range).
template <typename T>
bool load_block(const T* __restrict__ src, int64_t n, float* __restrict__ buf) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(src[i]);
    buf[i] = v;
    bad |= !(std::fabs(v) <= FLT_MAX);
  }
  return bad != 0;
}

LOWBIT_MULTIVERSION float absmax(const float* __restrict__ buf, int64_t n) {
  // Eight independent lanes so the compiler can vectorize the reduction.
  std::array<float, 8> lanes{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = std::max(lanes[l], std::fabs(buf[i + l]));
  float m = 0.f;
  for (; i < n; ++i) m = std::max(m, std::fabs(buf[i]));
  for (float l : lanes) m = std::max(m, l);
  return m;
}

// The codebook in the forms the kernels use: values, decision thresholds between
// neighbours (midpoints), and the index of the exact zero.
struct CodeTable {
  std::array<float, 256> values{};
  std::array<float, 255> midpoints{};
  int size = 0;
  uint8_t zero_index = 0;

  explicit CodeTable(const at::Tensor& codebook) {
    const at::Tensor host = codebook.cpu().contiguous();
    size = static_cast<int>(host.numel());
    const float* v = host.data_ptr<float>();
    for (int k = 0; k < size; ++k) {
      values[k] = v[k];
      if (v[k] == 0.f) zero_index = static_cast<uint8_t>(k);
    }
    for (int k = 0; k + 1 < size; ++k) midpoints[k] = (values[k] + values[k + 1]) * 0.5f;
  }
};

// Nearest code: index = #{k : x > midpoint_k * scale}. Comparing x with the scaled
// midpoint (one exact fp32 product) keeps CPU and CUDA bit-identical.
// (idx is uint8_t, which may alias anything: __restrict__ lets the loops vectorize.)
template <int Bits>
inline __attribute__((always_inline)) void nearest_indices(const float* __restrict__ buf, int64_t n, float scale, const CodeTable& table,
                     uint8_t* __restrict__ idx) {
  constexpr int kCodes = 1 << Bits;
  float t[kCodes - 1];
  for (int k = 0; k < kCodes - 1; ++k) t[k] = table.midpoints[k] * scale;
  if constexpr (Bits <= 4) {
    for (int64_t i = 0; i < n; ++i) {
      const float x = buf[i];
      int count = 0;
      for (int k = 0; k < kCodes - 1; ++k) count += x > t[k] ? 1 : 0;
      idx[i] = static_cast<uint8_t>(count);
    }
  } else {
    // Binary search over the sorted thresholds, eight elements at a time so that their
    // independent lookups overlap instead of waiting on each other.
    constexpr int kLanes = 8;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      int count[kLanes] = {};
      for (int step = kCodes / 2; step > 0; step >>= 1)
        for (int l = 0; l < kLanes; ++l)
          count[l] += (buf[i + l] > t[count[l] + step - 1]) ? step : 0;
      for (int l = 0; l < kLanes; ++l) idx[i + l] = static_cast<uint8_t>(count[l]);
    }
    for (; i < n; ++i) {
      int count = 0;
      for (int step = kCodes / 2; step > 0; step >>= 1) count += (buf[i] > t[count + step - 1]) ? step : 0;
      idx[i] = static_cast<uint8_t>(count);
    }
  }
}

// Stochastic rounding between the two codes around x / scale, with probabilities that
// make the expected code value equal x / scale. Values outside the code range clamp.
void stochastic_indices(const float* buf, int64_t n, float scale, const CodeTable& table,
                        uint64_t seed, uint64_t first_index, uint8_t* idx) {
  const float* v = table.values.data();
  for (int64_t i = 0; i < n; ++i) {
    const float x = buf[i] / scale;
    const int upper = static_cast<int>(std::upper_bound(v, v + table.size, x) - v);
    if (upper == 0) { idx[i] = 0; continue; }
    const int lo = upper - 1;
    if (lo == table.size - 1 || x == v[lo]) { idx[i] = static_cast<uint8_t>(lo); continue; }
    const float p = (x - v[lo]) / (v[lo + 1] - v[lo]);
    idx[i] = static_cast<uint8_t>(lo + (uniform01(seed, first_index + i) < p ? 1 : 0));
  }
}

void pack_bits(int bits, const uint8_t* idx, int64_t n, uint8_t* out) {
  switch (bits) {
    case 3: return packing::pack<3>(idx, n, out);
    case 4: return packing::pack<4>(idx, n, out);
    default: return packing::pack<8>(idx, n, out);
  }
}

LOWBIT_MULTIVERSION void nearest_bits(int bits, const float* buf, int64_t n, float scale, const CodeTable& table,
                  uint8_t* idx) {
  switch (bits) {
    case 3: return nearest_indices<3>(buf, n, scale, table, idx);
    case 4: return nearest_indices<4>(buf, n, scale, table, idx);
    default: return nearest_indices<8>(buf, n, scale, table, idx);
  }
}

// Remembers the smallest flat index of a non-finite input value seen by any thread.
class NonFiniteTracker {
 public:
  void note(const float* buf, int64_t n, int64_t first_index) {
    for (int64_t i = 0; i < n; ++i)
      if (!(std::fabs(buf[i]) <= FLT_MAX)) {
        int64_t seen = first_.load();
        const int64_t mine = first_index + i;
        while (mine < seen && !first_.compare_exchange_weak(seen, mine)) {}
        return;
      }
  }
  void throw_if_any(const char* op, int64_t cols) const {
    const int64_t at = first_.load();
    checks::finite_input(op, at == kNone ? -1 : at, cols);
  }

 private:
  static constexpr int64_t kNone = INT64_MAX;
  std::atomic<int64_t> first_{kNone};
};

// check_finite is not read by the CPU kernels: they always check, as the check rides on the
// pass that loads each block and needs no round trip (ops_schema.cpp).
at::Tensor block_absmax_cpu(const at::Tensor& input_arg, int64_t block_size, bool skip_diagonal,
                            bool /*check_finite*/) {
  constexpr const char* op = "lowbit::block_absmax";
  checks::block_absmax_args(input_arg, block_size, skip_diagonal);
  const at::Tensor input = input_arg.contiguous();
  const BlockGrid g{input.size(0), input.size(1), block_size, blocks_per_row(input.size(1), block_size)};
  at::Tensor scales = at::empty({g.rows, g.blocks_per_row}, input.options().dtype(at::kFloat));
  float* out = scales.data_ptr<float>();
  NonFiniteTracker non_finite;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "block_absmax", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    at::parallel_for(0, g.total(), g.grain(), [&](int64_t begin, int64_t end) {
      std::array<float, kMaxBlockSize> buf;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = g.length(b);
        const int64_t first = g.row(b) * g.cols + g.first_col(b);
        if (load_block(x + first, n, buf.data())) non_finite.note(buf.data(), n, first);
        const int64_t d = skip_diagonal ? diagonal_offset(g, b) : -1;
        if (d >= 0) buf[d] = 0.f;
        out[b] = absmax(buf.data(), n);
      }
    });
  });
  non_finite.throw_if_any(op, g.cols);
  return scales;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_blockwise_cpu(
    const at::Tensor& input_arg, const at::Tensor& codebook, int64_t bits, int64_t block_size,
    bool keep_diagonal, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& given_scales,
    bool /*check_finite*/) {
  constexpr const char* op = "lowbit::quantize_blockwise";
  checks::quantize_blockwise_args(input_arg, codebook, bits, block_size, keep_diagonal, given_scales);
  const at::Tensor input = input_arg.contiguous();
  const BlockGrid g{input.size(0), input.size(1), block_size, blocks_per_row(input.size(1), block_size)};
  const bool use_given = given_scales.has_value() && given_scales->defined();
  const CodeTable table(codebook);
  const int64_t row_bytes = packed_row_bytes(g.cols, bits);
  at::Tensor codes = at::empty({g.rows, row_bytes}, input.options().dtype(at::kByte));
  at::Tensor scales = use_given ? given_scales->contiguous().clone()
                                : at::empty({g.rows, g.blocks_per_row}, input.options().dtype(at::kFloat));
  at::Tensor diagonal = at::empty({keep_diagonal ? g.rows : 0}, input.options().dtype(at::kFloat));
  uint8_t* code_out = codes.data_ptr<uint8_t>();
  float* scale_data = scales.data_ptr<float>();
  float* diag_out = diagonal.data_ptr<float>();
  NonFiniteTracker non_finite;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "quantize_blockwise", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    at::parallel_for(0, g.total(), g.grain(), [&](int64_t begin, int64_t end) {
      std::array<float, kMaxBlockSize> buf;
      std::array<uint8_t, kMaxBlockSize> idx;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r = g.row(b), c0 = g.first_col(b), n = g.length(b);
        if (load_block(x + r * g.cols + c0, n, buf.data())) non_finite.note(buf.data(), n, r * g.cols + c0);
        const int64_t d = keep_diagonal ? diagonal_offset(g, b) : -1;
        if (d >= 0) {  // the diagonal is kept exactly and excluded from the scale
          diag_out[r] = buf[d];
          buf[d] = 0.f;
        }
        const float scale = use_given ? scale_data[b] : absmax(buf.data(), n);
        if (!use_given) scale_data[b] = scale;
        if (!(scale > 0.f)) {
          std::fill_n(idx.data(), n, table.zero_index);
        } else if (stochastic) {
          stochastic_indices(buf.data(), n, scale, table, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(r * g.cols + c0), idx.data());
        } else {
          nearest_bits(static_cast<int>(bits), buf.data(), n, scale, table, idx.data());
        }
        pack_bits(static_cast<int>(bits), idx.data(), n, code_out + r * row_bytes + c0 * bits / 8);
      }
    });
  });
  non_finite.throw_if_any(op, g.cols);
  return {codes, scales, diagonal};
}

template <int Bits, typename T>
void dequantize_block(const uint8_t* __restrict__ src, int64_t n, const float* __restrict__ lut,
                      T* __restrict__ dst) {
  // Unpacking first, then looking up, keeps both loops simple enough to pipeline well.
  uint8_t idx[kMaxBlockSize];
  packing::unpack<Bits>(src, n, idx);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(lut[idx[i]]);
}

template <int Bits, typename T>
void dequantize_blocks(const BlockGrid& g, const uint8_t* codes, const float* scales,
                       const float* diag, const CodeTable& table, T* out) {
  const int64_t row_bytes = packed_row_bytes(g.cols, Bits);
  at::parallel_for(0, g.total(), g.grain(), [&](int64_t begin, int64_t end) {
    float lut[256];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = g.row(b), c0 = g.first_col(b), n = g.length(b);
      const float scale = scales[b];
      for (int k = 0; k < table.size; ++k) lut[k] = table.values[k] * scale;
      T* dst = out + r * g.cols + c0;
      dequantize_block<Bits>(codes + r * row_bytes + c0 * Bits / 8, n, lut, dst);
      if (diag != nullptr) {
        const int64_t d = diagonal_offset(g, b);
        if (d >= 0) dst[d] = static_cast<T>(diag[r]);
      }
    }
  });
}

void dequantize_checked(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& codebook, const c10::optional<at::Tensor>& diagonal,
                        int64_t bits, int64_t block_size, const at::Tensor& out) {
  const BlockGrid g{out.size(0), out.size(1), block_size, blocks_per_row(out.size(1), block_size)};
  const CodeTable table(codebook);
  const at::Tensor codes_c = codes.contiguous(), scales_c = scales.contiguous();
  const bool has_diag = diagonal.has_value() && diagonal->defined() && diagonal->numel() > 0;
  const at::Tensor diag_c = has_diag ? diagonal->contiguous() : at::Tensor();
  const float* diag = has_diag ? diag_c.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_blockwise", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const uint8_t* c = codes_c.data_ptr<uint8_t>();
    const float* s = scales_c.data_ptr<float>();
    switch (bits) {
      case 3: return dequantize_blocks<3>(g, c, s, diag, table, dst);
      case 4: return dequantize_blocks<4>(g, c, s, diag, table, dst);
      default: return dequantize_blocks<8>(g, c, s, diag, table, dst);
    }
  });
}

at::Tensor& dequantize_blockwise_out_cpu(const at::Tensor& codes, const at::Tensor& scales,
                                         const at::Tensor& codebook,
                                         const c10::optional<at::Tensor>& diagonal, int64_t bits,
                                         int64_t block_size, at::Tensor& out) {
  constexpr const char* op = "lowbit::dequantize_blockwise.out";
  checks::dequantize_blockwise_out_args(codes, scales, codebook, diagonal, bits, block_size, out);
  dequantize_checked(op, codes, scales, codebook, diagonal, bits, block_size, out);
  return out;
}

// Double quantization of block scales: groups of kScaleGroupSize scales share their fp32
// maximum M; each scale becomes the smallest code c with table[c] * M >= scale, so the
// dequantized scale never undercuts the block's absmax (no clipping) and overshoots it
// by at most one gap of the table.
std::tuple<at::Tensor, at::Tensor> quantize_scales_cpu(const at::Tensor& scales_arg,
                                                       const at::Tensor& scale_codebook, bool /*check_finite*/) {
  constexpr const char* op = "lowbit::quantize_scales";
  checks::quantize_scales_args(scales_arg, scale_codebook);
  const at::Tensor scales = scales_arg.contiguous();
  const at::Tensor table_t = scale_codebook.cpu().contiguous();
  const float* table = table_t.data_ptr<float>();
  const int64_t n = scales.numel();
  const int64_t groups = (n + kScaleGroupSize - 1) / kScaleGroupSize;
  at::Tensor codes = at::empty(scales.sizes(), scales.options().dtype(at::kByte));
  at::Tensor group_max = at::empty({groups}, scales.options());
  const float* s = scales.data_ptr<float>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float* gm = group_max.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    if (!(s[i] >= 0.f && s[i] <= FLT_MAX)) checks::finite_nonnegative_scale(op, i, s[i]);
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t lo = gi * kScaleGroupSize, hi = std::min(n, lo + kScaleGroupSize);
      const float m = *std::max_element(s + lo, s + hi);
      gm[gi] = m;
      for (int64_t i = lo; i < hi; ++i) {
        int64_t first = 0, count = 256;  // lower_bound of table[k] * m >= s[i]
        while (count > 0) {
          const int64_t half = count / 2;
          if (table[first + half] * m < s[i]) { first += half + 1; count -= half + 1; }
          else count = half;
        }
        c[i] = static_cast<uint8_t>(std::min<int64_t>(first, 255));
      }
    }
  });
  return {codes, group_max};
}

at::Tensor dequantize_scales_cpu(const at::Tensor& codes_arg, const at::Tensor& group_max_arg,
                                 const at::Tensor& scale_codebook) {
  checks::dequantize_scales_args(codes_arg, group_max_arg, scale_codebook);
  const int64_t n = codes_arg.numel();
  const at::Tensor codes = codes_arg.contiguous(), gm_t = group_max_arg.contiguous();
  const at::Tensor table_t = scale_codebook.cpu().contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* gm = gm_t.data_ptr<float>();
  const float* table = table_t.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) o[i] = table[c[i]] * gm[i / kScaleGroupSize];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("block_absmax", &block_absmax_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cpu);
  m.impl("quantize_scales", &quantize_scales_cpu);
  m.impl("dequantize_scales", &dequantize_scales_cpu);
}

}  // namespace lowbit
