#include "linalg/workspace.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

namespace lowbit::linalg {

at::Tensor Workspace::take(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(shape);
  at::Tensor& buffer = buffers_[Key{slot, options.device().str(), static_cast<int>(options.dtype().toScalarType())}];
  if (!buffer.defined() || buffer.numel() < numel) {
    // Grown in steps of 1/4 so that a slot whose size creeps up is not re-made every time.
    const int64_t previous = buffer.defined() ? buffer.numel() : 0;
    buffer = at::Tensor();  // the old buffer goes before the new one is made
    buffer = at::empty({std::max(numel, previous + previous / 4)}, options);
    peak_bytes_ = std::max(peak_bytes_, bytes());
  }
  return buffer.narrow(0, 0, numel).view(shape);
}

at::Tensor Workspace::take_like(int slot, const at::Tensor& like) {
  if (like.dim() < 2 || like.is_contiguous() || !like.mT().is_contiguous())
    return take(slot, like.sizes(), like.options());
  return take(slot, like.mT().sizes(), like.options()).mT();
}

void Workspace::end_step() {
  for (auto it = buffers_.begin(); it != buffers_.end();)
    it = it->second.is_cpu() ? std::next(it) : buffers_.erase(it);
}

int64_t Workspace::bytes() const {
  int64_t total = 0;
  for (const auto& [key, buffer] : buffers_) total += buffer.numel() * static_cast<int64_t>(buffer.element_size());
  return total;
}

}  // namespace lowbit::linalg
