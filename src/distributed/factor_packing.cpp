#include "distributed/factor_packing.h"

#include <ATen/ATen.h>

namespace lowbit::distributed {
namespace {

precond::TensorMap entries_of(const precond::KroneckerFactor& factor) {
  precond::TensorMap entries;
  factor.save(entries, "");
  return entries;
}

int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

int64_t packed_bytes(const precond::KroneckerFactor& factor) {
  int64_t total = 0;
  for (const auto& [name, t] : entries_of(factor)) total += bytes_of(t);
  return total;
}

int64_t packed_bytes(const std::vector<precond::KroneckerFactor*>& factors) {
  int64_t total = 0;
  for (const precond::KroneckerFactor* f : factors) total += packed_bytes(*f);
  return total;
}

at::Tensor pack_factors(const std::vector<const precond::KroneckerFactor*>& factors) {
  std::vector<at::Tensor> pieces;
  for (const precond::KroneckerFactor* f : factors)
    for (const auto& [name, t] : entries_of(*f)) pieces.push_back(t.contiguous().reshape({-1}).view(at::kByte));
  TORCH_CHECK(!pieces.empty(), "pack_factors: no factors to pack");
  return at::cat(pieces);
}

void unpack_factors(const at::Tensor& buffer, const std::vector<precond::KroneckerFactor*>& factors) {
  const int64_t expected = packed_bytes(factors);
  TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.dim() == 1 && buffer.numel() == expected,
              "unpack_factors: the buffer holds ", buffer.numel(), " bytes; these factors need ", expected);
  int64_t offset = 0;
  for (precond::KroneckerFactor* f : factors) {
    precond::TensorMap received;
    for (const auto& [name, t] : entries_of(*f)) {
      const int64_t n = bytes_of(t);
      // clone() first: a view as a wider dtype needs an aligned start.
      received[name] = buffer.slice(0, offset, offset + n).clone().view(t.scalar_type()).view(t.sizes());
      offset += n;
    }
    f->load(received, "");
  }
}

}  // namespace lowbit::distributed
