// How a parameter of any shape is cut into the 2-D blocks that get their own L and R.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lowbit::precond {

struct BlockSlice {
  int64_t row0, rows, col0, cols;
};

// The block `s` of the 2-D matrix m (a view).
inline at::Tensor block_of(const at::Tensor& m, const BlockSlice& s) {
  return m.slice(0, s.row0, s.row0 + s.rows).slice(1, s.col0, s.col0 + s.cols);
}

struct Partition {
  int64_t rows = 0, cols = 0;     // the 2-D view of the parameter (when preconditioned)
  std::vector<BlockSlice> blocks; // empty: no preconditioner (scalars and vectors)
  bool preconditioned() const { return !blocks.empty(); }
};

// Drops size-1 dimensions, views more than two dimensions as (d0, product of the rest),
// and cuts each side into chunks of at most max_dim (the last chunk is the remainder).
// What is left with fewer than two dimensions gets no preconditioner.
Partition partition_shape(at::IntArrayRef shape, int64_t max_dim);

}  // namespace lowbit::precond
