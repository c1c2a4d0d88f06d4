#include "precond/batched_precondition.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "linalg/matrix_functions.h"
#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

// One block of one parameter: its gradient block, where its direction goes, its factors.
struct BlockWork {
  at::Tensor grad;
  at::Tensor out;
  const KroneckerFactor* left;
  const KroneckerFactor* right;
  Combine combine;
};

// Workspace slots ([B, ., .] each).
// kRootScratch .. + 2 hold eigen-form roots' temporaries while they are made.
enum Slot { kGrad = 0, kLeft = 1, kRight = 2, kFirst = 3, kSecond = 4, kRootScratch = 5 };

// The factors as eigen-form 4-bit factors (EigenQuantizedFactor with eigen_form_root), or
// empty when any is not one.
std::vector<const EigenQuantizedFactor*> eigen_form(const std::vector<const KroneckerFactor*>& factors) {
  std::vector<const EigenQuantizedFactor*> out;
  for (const KroneckerFactor* f : factors) {
    if (f->kind() != FactorKind::EigenQuantized || !f->config().eigen_form_root) return {};
    out.push_back(static_cast<const EigenQuantizedFactor*>(f));
  }
  return out;
}

// The inverse roots of `factors` (one order) stacked into out [B, n, n]: quantized roots
// with one codec call, eigen-form ones made in one batch, dense ones copied.
void roots_into(const std::vector<const KroneckerFactor*>& factors, const at::Tensor& out,
                linalg::Workspace& workspace) {
  if (const std::vector<const EigenQuantizedFactor*> eigen = eigen_form(factors); !eigen.empty()) {
    EigenQuantizedFactor::eigen_form_roots_into(eigen, out, workspace, kRootScratch);
    return;
  }
  std::vector<const QuantizedMatrix*> quantized;
  for (const KroneckerFactor* f : factors)
    if (const QuantizedMatrix* q = f->quantized_root()) quantized.push_back(q);
  if (quantized.size() == factors.size()) {
    QuantizedMatrix::dequantize_stack(quantized, out);
    return;
  }
  for (size_t i = 0; i < factors.size(); ++i) out[static_cast<int64_t>(i)].copy_(factors[i]->inverse_root());
}

void run_chunk(c10::ArrayRef<BlockWork> chunk, linalg::Workspace& workspace) {
  const BlockWork& first = chunk.front();
  const int64_t count = static_cast<int64_t>(chunk.size()), rows = first.grad.size(0), cols = first.grad.size(1);
  const at::TensorOptions fp32 = first.out.options();
  std::vector<at::Tensor> grads;
  std::vector<const KroneckerFactor*> lefts, rights;
  for (const BlockWork& b : chunk) {
    grads.push_back(b.grad);
    lefts.push_back(b.left);
    rights.push_back(b.right);
  }
  at::Tensor g = workspace.take(kGrad, {count, rows, cols}, fp32);
  at::stack_out(g, grads);
  const at::Tensor l = workspace.take(kLeft, {count, rows, rows}, fp32);
  const at::Tensor r = workspace.take(kRight, {count, cols, cols}, fp32);
  roots_into(lefts, l, workspace);
  roots_into(rights, r, workspace);
  const at::Tensor t = workspace.take(kFirst, {count, rows, cols}, fp32);
  const at::Tensor h = workspace.take(kSecond, {count, rows, cols}, fp32);
  linalg::matmul_into(t, l, g);
  if (first.combine == Combine::Caspr) {
    // CASPR: J = L~ G + G R~, U = L~ J + J R~ = L~^2 G + 2 L~ G R~ + G R~^2.
    linalg::matmul_into(t, g, r, 1.0, 1.0);
    linalg::matmul_into(h, l, t);
    linalg::matmul_into(h, t, r, 1.0, 1.0);
  } else {
    linalg::matmul_into(h, t, r);
  }
  // Grafting by norm: the direction is the preconditioner's, the step length the gradient's.
  // The norms are summed in fp64: an fp32 sum's rounding depends on how the reduction is
  // split (over blocks, or over threads inside one block), and would make a batch of one
  // differ from a larger batch in the last bit; rounded from fp64 the scales agree.
  const auto norm = [](const at::Tensor& x) { return at::linalg_vector_norm(x, 2, {1, 2}, false, at::kDouble); };
  const at::Tensor scale = (norm(g) / (norm(h) + 1e-12)).to(at::kFloat);
  h.mul_(scale.view({count, 1, 1}));
  for (int64_t i = 0; i < count; ++i) chunk[static_cast<size_t>(i)].out.copy_(h[i]);
}

}  // namespace

void precondition_all(c10::ArrayRef<PreconditionItem> items, linalg::Workspace& workspace, int64_t workspace_bytes) {
  // Blocks grouped by shape, combine rule and device, in order of first appearance.
  std::vector<std::vector<BlockWork>> groups;
  for (const PreconditionItem& item : items) {
    const ParameterPreconditioner& pre = *item.preconditioner;
    TORCH_CHECK(pre.config().combine != Combine::Soap, "precondition_all: SOAP applies its bases through rotate()");
    const at::Tensor g = pre.as_matrix(item.grad);
    for (const ParameterPreconditioner::BlockView& b : pre.block_views()) {
      BlockWork work{block_of(g, b.slice), block_of(item.direction, b.slice), b.left, b.right, pre.config().combine};
      auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<BlockWork>& group) {
        const BlockWork& x = group.front();
        return x.grad.sizes() == work.grad.sizes() && x.combine == work.combine && x.out.device() == work.out.device();
      });
      if (it == groups.end()) {
        groups.push_back({work});
      } else {
        it->push_back(work);
      }
    }
  }
  for (const auto& group : groups) {
    const int64_t rows = group.front().grad.size(0), cols = group.front().grad.size(1);
    const int64_t per_block = 4 * (rows * rows + cols * cols + 3 * rows * cols);
    const int64_t size = static_cast<int64_t>(group.size());
    const int64_t chunk = workspace_bytes > 0 ? std::clamp<int64_t>(workspace_bytes / per_block, 1, size) : size;
    for (int64_t begin = 0; begin < size; begin += chunk)
      run_chunk(c10::ArrayRef<BlockWork>(group).slice(begin, std::min(chunk, size - begin)), workspace);
  }
}

}  // namespace lowbit::precond
