// Options of the block-wise low-bit codec.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace lowbit {

// How the 2^bits code values are spread over [-1, 1].
enum class Mapping {
  Linear2,      // signed square of the linear grid: the paper's "linear square"
  DynamicTree,  // dynamic tree quantization, as in 8-bit optimizers
  Linear,       // evenly spaced
  Kashin,       // Kashin quantization (seed 004): x = u + Q v per block, (u_i, v_i) -> one of
                // 2^bits fitted 2-D centroids; bits 3 or 4, nearest rounding, fp32 scales
};

enum class Rounding {
  Nearest,     // the nearest code value
  Stochastic,  // one of the two neighbouring codes, unbiased in expectation
};

Mapping parse_mapping(std::string_view name);   // "linear2" | "dynamic" | "linear" | "kashin"
std::string to_string(Mapping mapping);
Rounding parse_rounding(std::string_view name); // "nearest" | "stochastic"
std::string to_string(Rounding rounding);

// Every field is validated by validate(), which names the field and the allowed values.
struct QuantOptions {
  int bits = 4;                     // 3, 4 or 8
  Mapping mapping = Mapping::Linear2;
  int64_t block_size = 64;          // elements of one row per fp32 scale; power of two in [16, 4096]
  Rounding rounding = Rounding::Nearest;
  uint64_t seed = 0;                // stochastic rounding is a pure function of (seed, element index)
  bool keep_diagonal = false;       // square matrices: fp32 diagonal, only the off-diagonal quantized
  bool double_quant_scales = false; // 8-bit block scales with one fp32 scale per kScaleGroupSize

  void validate() const;
  bool operator==(const QuantOptions& other) const;
};

constexpr int64_t kMinBlockSize = 16;
constexpr int64_t kMaxBlockSize = 4096;
// Number of consecutive block scales that share one fp32 scale under double quantization.
constexpr int64_t kScaleGroupSize = 256;

// Throws c10::Error naming `what` unless bits is 3, 4 or 8 / block_size is allowed.
void check_bits(int64_t bits, const char* what);
void check_block_size(int64_t block_size, const char* what);
// What a mapping needs of the other options, named with `prefix` (e.g. "QuantOptions."):
// "kashin" codes index 2-D centroids fitted per matrix, so it takes 3 or 4 bits, nearest
// rounding and fp32 scales. Shared by QuantOptions::validate and the optimizers' options.
void check_mapping_options(Mapping mapping, int64_t bits, Rounding rounding, bool double_quant_scales,
                           const std::string& prefix);

}  // namespace lowbit
