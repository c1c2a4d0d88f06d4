// Buffers for the temporaries of batched preconditioner work (dequantized eigenvectors,
// products, candidate roots), reused from step to step.
//
// Why: a refresh makes several n x n fp32 temporaries per factor. Allocated and freed one
// factor after another, interleaved with the small long-lived quantized state that each
// refresh leaves behind, they fragment glibc's heap: resident memory then stays near the
// fp32 figure although the stored state is 7x smaller. Buffers that persist keep resident
// memory at stored state + this workspace. On a GPU the caching allocator already reuses
// blocks, and a buffer held between steps would add to the peak of the next forward and
// backward, so there the buffers are handed back at the end of each step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <tuple>

namespace lowbit::linalg {

class Workspace {
 public:
  // A contiguous tensor of `shape`, dtype and device of `options`, backed by buffer `slot`.
  // Its contents are undefined. It stays valid until the next take() of the same slot (with
  // the same dtype and device) or end_step(); callers number their slots so that the
  // temporaries alive at the same time use different ones.
  at::Tensor take(int slot, at::IntArrayRef shape, const at::TensorOptions& options);

  // A tensor of like's shape, dtype and device, backed by buffer `slot`, laid out as `like`
  // when `like` is a transposed (column-major) view. Why: an elementwise op between a
  // row-major and a column-major n x n operand walks one of them across rows, several times
  // slower on a CPU than two operands of one layout (7 ms against about 1 ms at order 1024).
  at::Tensor take_like(int slot, const at::Tensor& like);

  // Ends a step: buffers on accelerators go back to their allocator; CPU buffers are kept.
  void end_step();

  // Bytes held now, and the most ever held.
  int64_t bytes() const;
  int64_t peak_bytes() const { return peak_bytes_; }

 private:
  using Key = std::tuple<int, std::string, int>;  // slot, device, dtype
  std::map<Key, at::Tensor> buffers_;
  int64_t peak_bytes_ = 0;
};

}  // namespace lowbit::linalg
