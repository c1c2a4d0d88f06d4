// fp32 Shampoo factor: statistic and inverse root kept as dense fp32 matrices.
#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

// Results are committed as new tensors (never written into the old ones): a caller may
// still hold the previous root or basis (SOAP keeps the bases of the step before).

// Workspace slots of a dense batch.
enum Slot { kCandidates = 0, kVectors = 1, kScratch = 2 };

// Slot i of every factor of a batch, stacked into a workspace buffer [B, n, n].
at::Tensor stacked(const std::vector<at::Tensor>& matrices, linalg::Workspace& workspace, int slot) {
  const int64_t n = matrices.front().size(0);
  at::Tensor out = workspace.take(slot, {static_cast<int64_t>(matrices.size()), n, n}, matrices.front().options());
  at::stack_out(out, matrices);
  return out;
}

}  // namespace

DenseFactor::DenseFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config)
    : KroneckerFactor(order, device, config) {
  const at::TensorOptions fp32 = device.dtype(at::kFloat);
  statistic_ = config.epsilon * at::eye(order, fp32);  // L_0 = eps * I, as in the paper
  root_ = at::eye(order, fp32);
}

void DenseFactor::refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context) {
  std::vector<DenseFactor*> statistics, roots;
  std::vector<at::Tensor> sides;
  for (const RefreshItem& item : batch) {
    auto* f = static_cast<DenseFactor*>(item.factor);
    if (item.side.defined()) {
      statistics.push_back(f);
      sides.push_back(item.side);
    }
    if (item.root) roots.push_back(f);
  }
  const bool eigenbasis = batch.front().factor->config().eigenbasis;
  if (!statistics.empty()) {
    update_statistics(statistics, sides, context);
    if (eigenbasis) update_eigenbases(statistics, context);
  }
  if (!roots.empty() && !eigenbasis) update_roots(roots, context);  // SOAP's basis follows the statistics
}

void DenseFactor::update_statistics(c10::ArrayRef<DenseFactor*> batch, c10::ArrayRef<at::Tensor> sides,
                                    RefreshContext& context) {
  const FactorConfig& config = batch.front()->config_;
  const int64_t count = static_cast<int64_t>(batch.size()), n = batch.front()->order_;
  at::Tensor candidates = context.workspace->take(kCandidates, {count, n, n}, batch.front()->statistic_.options());
  outer_products(sides, candidates, config.gram_statistics);
  std::vector<at::Tensor> statistics;
  for (DenseFactor* f : batch) statistics.push_back(f->statistic_);
  candidates.mul_(1.0 - config.stat_decay);
  at::_foreach_add_(candidates.unbind(0), statistics, config.stat_decay);
  const at::Tensor keep = keep_mask(candidates), failed = keep.logical_not();
  for (int64_t i = 0; i < count; ++i) {
    DenseFactor& f = *batch[static_cast<size_t>(i)];
    f.statistic_ = at::where(keep[i], candidates[i], f.statistic_);
    f.count_failure(failed[i]);
  }
}

void DenseFactor::update_eigenbases(c10::ArrayRef<DenseFactor*> batch, RefreshContext& context) {
  // SOAP's refresh: one warm-started power-iteration + QR step (or a full eigh), as the
  // 4-bit factor refreshes its eigenvectors, so 32- and 4-bit SOAP track alike. The first
  // refresh (from the identity) is a full eigh, as in the paper: a QR step from I is far from
  // an eigenbasis and the next ones would rotate it a lot, under Adam's second moment.
  std::vector<DenseFactor*> by_eigh, by_qr;
  for (DenseFactor* f : batch)
    (is_qr_step(f->config_.eigen_update) && f->has_basis_ ? by_qr : by_eigh).push_back(f);
  linalg::Workspace& workspace = *context.workspace;
  for (const auto* part : {&by_eigh, &by_qr}) {
    if (part->empty()) continue;
    const int64_t count = static_cast<int64_t>(part->size()), n = part->front()->order_;
    std::vector<at::Tensor> statistics, bases;
    for (DenseFactor* f : *part) {
      statistics.push_back(f->statistic_);
      bases.push_back(f->root_);
    }
    const at::Tensor a = stacked(statistics, workspace, kCandidates);
    at::Tensor vectors;
    if (part == &by_eigh) {
      vectors = linalg::eigh_batched(a, part->front()->config_.eigh).vectors;
    } else {
      vectors = workspace.take(kScratch + 2, {count, n, n}, a.options());
      const at::Tensor values = at::empty({count, n}, a.options());
      linalg::qr_subspace_step_out(a, stacked(bases, workspace, kVectors), vectors, values, workspace, kScratch,
                                   orthonormalization(part->front()->config_.eigen_update));
    }
    const at::Tensor keep = keep_mask(vectors), failed = keep.logical_not();
    for (int64_t i = 0; i < count; ++i) {
      DenseFactor& f = *(*part)[static_cast<size_t>(i)];
      f.root_ = at::where(keep[i], vectors[i], f.root_);
      f.count_failure(failed[i]);
      f.has_basis_ = true;
    }
  }
}

void DenseFactor::update_roots(c10::ArrayRef<DenseFactor*> batch, RefreshContext& context) {
  const FactorConfig& config = batch.front()->config_;
  const int64_t count = static_cast<int64_t>(batch.size()), n = batch.front()->order_;
  linalg::Workspace& workspace = *context.workspace;
  at::Tensor candidates;
  if (config.root_method == RootMethod::Eigen) {
    std::vector<at::Tensor> statistics;
    for (DenseFactor* f : batch) statistics.push_back(f->statistic_);
    const linalg::Eigen e = linalg::eigh_batched(stacked(statistics, workspace, kCandidates), config.eigh);
    candidates = workspace.take(kVectors, {count, n, n}, e.vectors.options());
    linalg::recompose_out(candidates, e.vectors,
                          linalg::inverse_root_spectrum(e.values, config.root_exponent, config.epsilon, config.damping), workspace,
                          kScratch);
  } else {
    // The coupled Newton iteration decides when to stop on the host: one factor at a time.
    candidates = workspace.take(kVectors, {count, n, n}, batch.front()->root_.options());
    for (int64_t i = 0; i < count; ++i)
      candidates[i].copy_(linalg::inverse_root_newton(batch[static_cast<size_t>(i)]->statistic_,
                                                      static_cast<int>(config.root_exponent), config.epsilon,
                                                      100, 1e-6, config.damping));
  }
  const at::Tensor keep = keep_mask(candidates), failed = keep.logical_not();
  for (int64_t i = 0; i < count; ++i) {
    DenseFactor& f = *batch[static_cast<size_t>(i)];
    f.root_ = at::where(keep[i], candidates[i], f.root_);
    f.count_failure(failed[i]);
  }
}

int64_t DenseFactor::state_bytes() const { return 2 * order_ * order_ * 4; }

void DenseFactor::save(TensorMap& out, const std::string& prefix) const {
  out[prefix + "statistic"] = statistic_;
  out[prefix + "root"] = root_;
}

void DenseFactor::load(const TensorMap& in, const std::string& prefix) {
  const at::Tensor statistic = read_entry(in, prefix + "statistic", at::kFloat, {order_, order_});
  const at::Tensor root = read_entry(in, prefix + "root", at::kFloat, {order_, order_});
  statistic_ = statistic.to(statistic_.device()).clone();
  root_ = root.to(root_.device()).clone();
  // A basis that is not the identity has been refreshed (read once, at load).
  has_basis_ = config_.eigenbasis && !at::equal(root_, at::eye(order_, root_.options()));
}

}  // namespace lowbit::precond
