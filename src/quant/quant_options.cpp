#include <lowbit/quant_options.h>

#include <c10/util/Exception.h>

namespace lowbit {

Mapping parse_mapping(std::string_view name) {
  if (name == "linear2" || name == "linear-2") return Mapping::Linear2;
  if (name == "dynamic" || name == "dt") return Mapping::DynamicTree;
  if (name == "linear") return Mapping::Linear;
  if (name == "kashin") return Mapping::Kashin;
  TORCH_CHECK(false, "mapping must be one of \"linear2\", \"dynamic\", \"linear\", \"kashin\"; got \"",
              std::string(name), "\"");
}

std::string to_string(Mapping mapping) {
  switch (mapping) {
    case Mapping::Linear2: return "linear2";
    case Mapping::DynamicTree: return "dynamic";
    case Mapping::Linear: return "linear";
    case Mapping::Kashin: return "kashin";
  }
  return "unknown";
}

Rounding parse_rounding(std::string_view name) {
  if (name == "nearest") return Rounding::Nearest;
  if (name == "stochastic") return Rounding::Stochastic;
  TORCH_CHECK(false, "rounding must be \"nearest\" or \"stochastic\"; got \"", std::string(name),
              "\"");
}

std::string to_string(Rounding rounding) {
  return rounding == Rounding::Nearest ? "nearest" : "stochastic";
}

void check_bits(int64_t bits, const char* what) {
  TORCH_CHECK(bits == 3 || bits == 4 || bits == 8, what, " must be 3, 4 or 8; got ", bits);
}

void check_block_size(int64_t block_size, const char* what) {
  const bool power_of_two = block_size > 0 && (block_size & (block_size - 1)) == 0;
  TORCH_CHECK(power_of_two && block_size >= kMinBlockSize && block_size <= kMaxBlockSize, what,
              " must be a power of two from ", kMinBlockSize, " to ", kMaxBlockSize, "; got ",
              block_size);
}

void QuantOptions::validate() const {
  check_bits(bits, "QuantOptions.bits");
  check_block_size(block_size, "QuantOptions.block_size");
  const int m = static_cast<int>(mapping);
  TORCH_CHECK(m >= 0 && m <= 3, "QuantOptions.mapping is not a known Mapping (", m, ")");
  TORCH_CHECK(rounding == Rounding::Nearest || rounding == Rounding::Stochastic,
              "QuantOptions.rounding is not a known Rounding");
  check_mapping_options(mapping, bits, rounding, double_quant_scales, "QuantOptions.");
}

void check_mapping_options(Mapping mapping, int64_t bits, Rounding rounding, bool double_quant_scales,
                           const std::string& prefix) {
  if (mapping != Mapping::Kashin) return;
  // One code indexes a 2-D centroid (u_i, v_i); 8-bit codes would mean 256 centroids
  // fitted per matrix, and the fitted table has no stochastic or double-quantized form.
  TORCH_CHECK(bits == 3 || bits == 4, prefix, "bits must be 3 or 4 with mapping \"kashin\"; got ", bits);
  TORCH_CHECK(rounding == Rounding::Nearest, prefix,
              "rounding must be \"nearest\" with mapping \"kashin\" (codes are nearest centroids)");
  TORCH_CHECK(!double_quant_scales, prefix,
              "double_quant_scales is not supported with mapping \"kashin\" (its scales are fp32 block norms)");
}

bool QuantOptions::operator==(const QuantOptions& o) const {
  return bits == o.bits && mapping == o.mapping && block_size == o.block_size &&
         rounding == o.rounding && seed == o.seed && keep_diagonal == o.keep_diagonal &&
         double_quant_scales == o.double_quant_scales;
}

}  // namespace lowbit
