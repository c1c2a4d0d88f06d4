#include "precond/partition.h"

#include <c10/util/Exception.h>

namespace lowbit::precond {
namespace {

std::vector<std::pair<int64_t, int64_t>> chunks(int64_t size, int64_t max_dim) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t start = 0; start < size; start += max_dim) out.emplace_back(start, std::min(max_dim, size - start));
  return out;
}

}  // namespace

Partition partition_shape(at::IntArrayRef shape, int64_t max_dim) {
  TORCH_CHECK(max_dim >= 1, "max_preconditioner_dim must be at least 1; got ", max_dim);
  std::vector<int64_t> dims;
  for (int64_t d : shape)
    if (d != 1) dims.push_back(d);
  Partition p;
  if (dims.size() < 2) return p;
  for (int64_t d : dims)
    if (d == 0) return p;  // an empty parameter has nothing to precondition
  p.rows = dims[0];
  p.cols = 1;
  for (size_t i = 1; i < dims.size(); ++i) p.cols *= dims[i];
  for (const auto& [r0, rn] : chunks(p.rows, max_dim))
    for (const auto& [c0, cn] : chunks(p.cols, max_dim)) p.blocks.push_back({r0, rn, c0, cn});
  return p;
}

}  // namespace lowbit::precond
