#include <lowbit/codebook.h>

#include <c10/util/Exception.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace lowbit {
namespace {

// Signed grid x_j = -1 + 2j/(n-1), j = 0..n-1, with the value just below zero
// (index n/2 - 1) replaced by an exact 0 so that zeros survive quantization.
std::vector<double> signed_grid_with_zero(int bits) {
  const int n = 1 << bits;
  std::vector<double> x(n);
  for (int j = 0; j < n; ++j) x[j] = -1.0 + 2.0 * j / (n - 1);
  x[n / 2 - 1] = 0.0;
  return x;
}

// Dynamic tree quantization (Dettmers, 8-bit optimizers) with all non-sign bits as
// exponent bits: decade i holds the midpoints of an even split of [0.1, 1] into
// 2^i (signed) or 2^(i+1) (unsigned) parts, scaled by 10^(i - (bits-2)); plus 0 and 1.
std::vector<double> dynamic_tree(int bits, bool is_signed) {
  const int exponent_bits = bits - 1;
  std::vector<double> values;
  for (int i = 0; i < exponent_bits; ++i) {
    const int parts = is_signed ? (1 << i) : (1 << (i + 1));
    const double decade = std::pow(10.0, -(exponent_bits - 1) + i);
    for (int k = 0; k < parts; ++k) {
      const double lo = 0.1 + 0.9 * k / parts;
      const double hi = 0.1 + 0.9 * (k + 1) / parts;
      values.push_back(decade * (lo + hi) / 2.0);
      if (is_signed) values.push_back(-decade * (lo + hi) / 2.0);
    }
  }
  values.push_back(0.0);
  values.push_back(1.0);
  return values;
}

std::vector<float> sorted_floats(const std::vector<double>& values) {
  std::vector<float> out(values.begin(), values.end());
  std::sort(out.begin(), out.end());
  return out;
}

// The tables this file hands out (host tables and their device copies), each with the version
// it had when made. They live as long as the process, so their addresses are never reused.
class CachedTables {
 public:
  static CachedTables& instance() {
    static CachedTables tables;
    return tables;
  }
  const at::Tensor& add(const at::Tensor& table) {
    std::lock_guard<std::mutex> lock(mutex_);
    known_.emplace_back(table.unsafeGetTensorImpl(), table._version());
    return table;
  }
  bool contains(const at::Tensor& table) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::pair<const void*, uint32_t> key{table.unsafeGetTensorImpl(), table._version()};
    return std::find(known_.begin(), known_.end(), key) != known_.end();
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::pair<const void*, uint32_t>> known_;
};

at::Tensor as_tensor(const std::vector<float>& values) {
  at::Tensor table = at::from_blob(const_cast<float*>(values.data()),
                                   {static_cast<int64_t>(values.size())}, at::kFloat)
                         .clone();
  return CachedTables::instance().add(table);
}

int bits_slot(int bits) {
  switch (bits) {
    case 3: return 0;
    case 4: return 1;
    case 8: return 2;
  }
  check_bits(bits, "bits");
  return -1;
}

// Kashin codes index 2-D centroids fitted per matrix: there is no fixed table to hand out,
// and the block ops (AdamW moments, the M-FAC window) cannot use the mapping.
void check_has_table(Mapping mapping) {
  TORCH_CHECK(mapping != Mapping::Kashin,
              "mapping \"kashin\" has no fixed code table (its 2-D centroids are fitted per matrix); it is "
              "available only where state is a lowbit::QuantizedMatrix (Shampoo eigenvectors and roots)");
}

}  // namespace

std::vector<float> codebook_values(Mapping mapping, int bits) {
  check_bits(bits, "bits");
  check_has_table(mapping);
  switch (mapping) {
    case Mapping::Linear: return sorted_floats(signed_grid_with_zero(bits));
    case Mapping::Linear2: {
      std::vector<double> x = signed_grid_with_zero(bits);
      for (double& v : x) v = std::copysign(v * v, v);
      return sorted_floats(x);
    }
    case Mapping::DynamicTree: return sorted_floats(dynamic_tree(bits, /*is_signed=*/true));
    case Mapping::Kashin: break;  // refused by check_has_table above
  }
  TORCH_CHECK(false, "lowbit: unknown mapping");
}

const at::Tensor& codebook(Mapping mapping, int bits) {
  static std::array<std::array<at::Tensor, 3>, 3> cache;
  static std::mutex mutex;
  const int slot = bits_slot(bits);
  check_has_table(mapping);
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& entry = cache[static_cast<int>(mapping)][slot];
  if (!entry.defined()) entry = as_tensor(codebook_values(mapping, bits));
  return entry;
}

std::vector<float> positive_codebook_values(Mapping mapping, int bits) {
  check_bits(bits, "bits");
  check_has_table(mapping);
  const int n = 1 << bits;
  std::vector<double> x;
  switch (mapping) {
    case Mapping::Linear:
    case Mapping::Linear2:
      for (int k = 0; k < n; ++k) {
        const double v = static_cast<double>(k + 1) / n;
        x.push_back(mapping == Mapping::Linear ? v : v * v);
      }
      break;
    case Mapping::DynamicTree:
      x = dynamic_tree(bits, /*is_signed=*/false);
      for (double& v : x)
        if (v == 0.0) v = 0.55 * std::pow(10.0, -(bits - 1));
      break;
    case Mapping::Kashin: break;  // refused by check_has_table above
  }
  TORCH_CHECK(!x.empty(), "lowbit: unknown mapping");
  return sorted_floats(x);
}

const at::Tensor& positive_codebook(Mapping mapping, int bits) {
  static std::array<std::array<at::Tensor, 3>, 3> cache;
  static std::mutex mutex;
  const int slot = bits_slot(bits);
  check_has_table(mapping);
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& entry = cache[static_cast<int>(mapping)][slot];
  if (!entry.defined()) entry = as_tensor(positive_codebook_values(mapping, bits));
  return entry;
}

std::vector<float> scale_codebook_values() {
  return sorted_floats(dynamic_tree(8, /*is_signed=*/false));
}

const at::Tensor& scale_codebook() {
  static const at::Tensor table = as_tensor(scale_codebook_values());
  return table;
}

at::Tensor codebook_on(const at::Tensor& table, const at::Device& device) {
  if (table.device() == device) return table;
  // Keyed by the cached host table's storage: the tables above live as long as the process.
  static std::map<std::pair<const void*, std::string>, at::Tensor> copies;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& entry = copies[{table.const_data_ptr(), device.str()}];
  if (!entry.defined()) entry = CachedTables::instance().add(table.to(device));
  return entry;
}

bool is_cached_codebook(const at::Tensor& table) {
  return table.defined() && CachedTables::instance().contains(table);
}

double max_rounding_error(const std::vector<float>& codes) {
  TORCH_CHECK(!codes.empty(), "max_rounding_error: empty codebook");
  double worst = std::max(1.0 + codes.front(), 1.0 - codes.back());
  for (size_t k = 0; k + 1 < codes.size(); ++k)
    worst = std::max(worst, (static_cast<double>(codes[k + 1]) - codes[k]) / 2.0);
  return worst;
}

}  // namespace lowbit
