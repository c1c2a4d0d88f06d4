#include "precond/factor_refresh.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <tuple>

#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

// Factors that can share one batched call: same kind, order, device and the options their
// maths reads. (Factors of one optimizer share one eigh solver; `eigh` is not compared.)
bool same_batch(const KroneckerFactor& a, const KroneckerFactor& b) {
  const FactorConfig &x = a.config(), &y = b.config();
  return a.kind() == b.kind() && a.order() == b.order() && a.device() == b.device() &&
         x.stat_decay == y.stat_decay && x.epsilon == y.epsilon && x.root_exponent == y.root_exponent &&
         x.root_method == y.root_method && x.quant == y.quant && x.bjorck_stat_steps == y.bjorck_stat_steps &&
         x.bjorck_root_steps == y.bjorck_root_steps && x.eigen_update == y.eigen_update &&
         x.error_feedback == y.error_feedback && x.error_feedback_decay == y.error_feedback_decay &&
         x.eigenbasis == y.eigenbasis && x.eigen_form_root == y.eigen_form_root &&
         x.gram_statistics == y.gram_statistics && x.damping == y.damping;
}

void refresh_batch(FactorKind kind, c10::ArrayRef<RefreshItem> batch, RefreshContext& context) {
  switch (kind) {
    case FactorKind::Dense: return DenseFactor::refresh(batch, context);
    case FactorKind::EigenQuantized: return EigenQuantizedFactor::refresh(batch, context);
    case FactorKind::NaiveQuantized: return NaiveQuantizedFactor::refresh(batch, context);
    case FactorKind::CholeskyQuantized: return CholeskyQuantizedFactor::refresh(batch, context);
  }
}

}  // namespace

int64_t temporaries_per_factor(FactorKind kind) {
  switch (kind) {
    case FactorKind::Dense: return 3;           // stacked statistics / candidates, eigenvectors, V diag
    case FactorKind::EigenQuantized: return 5;  // U, A, A V / P^T A, R (reflectors), P^T
    case FactorKind::NaiveQuantized: return 2;  // statistic, outer product
    case FactorKind::CholeskyQuantized: return 0;  // factor by factor (its own temporaries)
  }
  return 1;
}

void refresh(c10::ArrayRef<RefreshItem> items, RefreshContext& context) {
  // Groups in order of first appearance, so that the work (and any error) follows the items.
  std::vector<std::vector<RefreshItem>> groups;
  for (const RefreshItem& item : items) {
    TORCH_CHECK(item.factor != nullptr, "refresh: an item has no factor");
    if (!item.side.defined() && !item.root) continue;
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return same_batch(*g.front().factor, *item.factor); });
    if (it == groups.end()) {
      groups.push_back({item});
    } else {
      it->push_back(item);
    }
  }
  for (const auto& group : groups) {
    const FactorKind kind = group.front().factor->kind();
    const int64_t n = group.front().factor->order();
    const int64_t per_factor = std::max<int64_t>(1, temporaries_per_factor(kind)) * n * n * 4;
    const int64_t size = static_cast<int64_t>(group.size());
    const int64_t chunk =
        context.workspace_bytes > 0 ? std::clamp<int64_t>(context.workspace_bytes / per_factor, 1, size) : size;
    for (int64_t begin = 0; begin < size; begin += chunk)
      refresh_batch(kind, c10::ArrayRef<RefreshItem>(group).slice(begin, std::min(chunk, size - begin)), context);
  }
}

void refresh_alone(c10::ArrayRef<RefreshItem> items) {
  linalg::Workspace workspace;
  RefreshContext context{&workspace};
  refresh(items, context);
}

at::Tensor keep_mask(const at::Tensor& candidates) { return linalg::finite_matrices(candidates); }

void outer_products(c10::ArrayRef<at::Tensor> sides, const at::Tensor& out, bool gram) {
  if (gram) {  // the products themselves (FactorConfig::gram_statistics)
    at::Tensor target = out;
    at::stack_out(target, sides);
    return;
  }
  if (out.is_cpu()) {
    // A CPU multiplies one matrix of a batch at a time (linalg::matmul_into), so a stacked copy
    // of the sides would buy nothing; BLAS reads a transposed side as it is.
    for (size_t i = 0; i < sides.size(); ++i)
      linalg::matmul_into(out[static_cast<int64_t>(i)], sides[i], sides[i].transpose(-2, -1));
    return;
  }
  // Sides of equal width are stacked for one batched product.
  std::map<int64_t, std::vector<int64_t>> by_width;
  for (size_t i = 0; i < sides.size(); ++i) by_width[sides[i].size(1)].push_back(static_cast<int64_t>(i));
  for (const auto& [width, members] : by_width) {
    const int64_t count = static_cast<int64_t>(members.size());
    std::vector<at::Tensor> stacked;
    for (int64_t i : members) stacked.push_back(sides[static_cast<size_t>(i)]);
    const at::Tensor g = at::stack(stacked);
    if (members.back() - members.front() + 1 == count) {  // consecutive: written in place
      linalg::matmul_into(out.narrow(0, members.front(), count), g, g.transpose(-2, -1));
    } else {
      const at::Tensor products = at::empty({count, g.size(1), g.size(1)}, out.options());
      linalg::matmul_into(products, g, g.transpose(-2, -1));
      out.index_copy_(0, at::tensor(members, out.options().dtype(at::kLong)), products);
    }
  }
}

}  // namespace lowbit::precond
