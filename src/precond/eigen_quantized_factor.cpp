#include <ATen/ATen.h>

#include "precond/factor_kinds.h"

namespace lowbit::precond {
namespace {

QuantOptions with_diagonal(QuantOptions q, bool keep) {
  q.keep_diagonal = keep;
  return q;
}

// Workspace slots of a batch ([B, n, n] each). kVectors + 1 and + 2 hold Björck's products
// while the eigenvectors are rectified; the later steps reuse them. kBasisRows holds the new
// eigenvectors as rows (P^T), the layout they are stored in.
enum Slot { kVectors = 0, kStatistic = 1, kScratch = 2, kBasisRows = 4 };

// The candidates of a batch as codes, replacing non-finite values (whose factors the keep
// mask rejects anyway) so that the codec, which refuses them, can run on the whole batch.
std::vector<QuantizedMatrix> quantize_candidates(const at::Tensor& candidates, const QuantOptions& options) {
  return QuantizedMatrix::quantize_stack(candidates.nan_to_num_(0.0, 0.0, 0.0), options, FiniteInput::Assumed);
}

std::vector<const EigenQuantizedFactor*> read_only(c10::ArrayRef<EigenQuantizedFactor*> batch) {
  return {batch.begin(), batch.end()};
}

}  // namespace

EigenQuantizedFactor::EigenQuantizedFactor(int64_t order, const at::TensorOptions& device,
                                           const FactorConfig& config)
    : KroneckerFactor(order, device, config),
      vector_quant_(with_diagonal(config.quant, false)),
      root_quant_(with_diagonal(config.quant, true)) {
  const at::Tensor identity = at::eye(order, device.dtype(at::kFloat));
  // Initial state as in the paper: U = I, lambda = eps (so L = eps * I), inverse root = I.
  eigenvectors_t_ = QuantizedMatrix::quantize(identity, vector_quant_);
  eigenvalues_ = at::full({order}, config.epsilon, device.dtype(at::kFloat));
  if (keeps_root()) root_ = QuantizedMatrix::quantize(identity, root_quant_);
}

at::Tensor EigenQuantizedFactor::eigenvectors(c10::ArrayRef<const EigenQuantizedFactor*> batch, int bjorck_steps,
                                              linalg::Workspace& workspace, int slot) {
  const int64_t n = batch.front()->order_;
  at::Tensor rows = workspace.take(slot, {static_cast<int64_t>(batch.size()), n, n},
                                   batch.front()->eigenvalues_.options());
  std::vector<const QuantizedMatrix*> stored;
  for (const EigenQuantizedFactor* f : batch) stored.push_back(&f->eigenvectors_t_);
  QuantizedMatrix::dequantize_stack(stored, rows);
  // Stored transposed (rows are eigenvectors); Björck repairs the orthogonality that
  // quantization broke.
  const at::Tensor columns = rows.transpose(-2, -1);
  linalg::bjorck_orthonormalize_(columns, bjorck_steps, workspace, slot + 1);
  return columns;
}

at::Tensor EigenQuantizedFactor::eigenvectors(int bjorck_steps) const {
  return linalg::bjorck_orthonormalize(eigenvectors_t_.dequantize().t(), bjorck_steps);
}

void EigenQuantizedFactor::refresh(c10::ArrayRef<RefreshItem> batch, RefreshContext& context) {
  std::vector<EigenQuantizedFactor*> statistics, fresh_roots, stored_roots;
  std::vector<at::Tensor> sides;
  std::vector<int64_t> fresh_index;  // of each fresh root in the statistics batch
  for (const RefreshItem& item : batch) {
    auto* f = static_cast<EigenQuantizedFactor*>(item.factor);
    if (item.side.defined()) {
      statistics.push_back(f);
      sides.push_back(item.side);
    }
    if (!item.root) continue;
    if (item.side.defined()) {
      fresh_roots.push_back(f);
      fresh_index.push_back(static_cast<int64_t>(statistics.size()) - 1);
    } else {
      stored_roots.push_back(f);
    }
  }
  Refreshed fresh;
  if (!statistics.empty()) fresh = update_statistics(statistics, sides, context);
  // SOAP reads U, and an eigen-form root is made from U and lambda when read: no root to refresh.
  if (!static_cast<const EigenQuantizedFactor*>(batch.front().factor)->keeps_root()) return;
  if (!fresh_roots.empty()) {
    // Refreshed in this step: the root comes from the fp32 eigenvectors just computed, before
    // they were stored at low bits, so there is no rounding for Björck steps to repair. (A
    // factor whose statistics update failed keeps its root too.)
    const bool all = fresh_roots.size() == statistics.size();
    const at::Tensor index = all ? at::Tensor() : at::tensor(fresh_index, fresh.keep.options().dtype(at::kLong));
    const auto pick = [&](const at::Tensor& t) { return all ? t : t.index_select(0, index); };
    update_roots(fresh_roots, pick(fresh.vectors), pick(fresh.values), pick(fresh.keep), context);
  }
  if (!stored_roots.empty()) {
    // From the stored eigenvectors after t2 Björck steps (t2 in the paper).
    const EigenQuantizedFactor& first = *stored_roots.front();
    std::vector<at::Tensor> values;
    for (const EigenQuantizedFactor* f : stored_roots) values.push_back(f->eigenvalues_);
    update_roots(stored_roots, eigenvectors(read_only(stored_roots), first.config_.bjorck_root_steps, *context.workspace, kVectors),
                 at::stack(values), at::Tensor(), context);
  }
}

EigenQuantizedFactor::Refreshed EigenQuantizedFactor::update_statistics(c10::ArrayRef<EigenQuantizedFactor*> batch,
                                                                        c10::ArrayRef<at::Tensor> sides,
                                                                        RefreshContext& context) {
  const EigenQuantizedFactor& first = *batch.front();
  const FactorConfig& config = first.config_;
  linalg::Workspace& workspace = *context.workspace;
  const int64_t count = static_cast<int64_t>(batch.size()), n = first.order_;
  const at::TensorOptions fp32 = first.eigenvalues_.options();

  // A = beta V diag(lambda) V^T + (1 - beta) side side^T, V the stored eigenvectors after t1
  // Björck steps (t1 in the paper).
  const at::Tensor v = eigenvectors(read_only(batch), config.bjorck_stat_steps, workspace, kVectors);
  std::vector<at::Tensor> values;
  for (const EigenQuantizedFactor* f : batch) values.push_back(f->eigenvalues_);
  const at::Tensor a = workspace.take(kStatistic, {count, n, n}, fp32);
  outer_products(sides, a, config.gram_statistics);
  at::Tensor weighted = workspace.take_like(kScratch, v);
  at::mul_out(weighted, v, at::stack(values).unsqueeze(-2));
  linalg::matmul_into(a, weighted, v.transpose(-2, -1), config.stat_decay, 1.0 - config.stat_decay);

  // The paper replaces a full eigendecomposition by one warm-started subspace step,
  // P = QR(A V).Q with eigenvalues diag(P^T A P). SOAP (eigenbasis): the first refresh, from
  // the initial state, is a full eigh (see DenseFactor::update_eigenbases). 4-bit Shampoo
  // keeps the paper's QR step from U = I.
  Refreshed out;
  const bool first_basis = config.eigenbasis && !first.has_basis_;
  if (is_qr_step(config.eigen_update) && !first_basis) {
    // Column-major, so that the QR writes P in place and P^T (the stored rows) is contiguous.
    out.vectors = workspace.take(kBasisRows, {count, n, n}, fp32).mT();
    out.values = at::empty({count, n}, fp32);
    linalg::qr_subspace_step_out(a, v, out.vectors, out.values, workspace, kScratch,
                                 orthonormalization(config.eigen_update));
  } else {
    const linalg::Eigen e = linalg::eigh_batched(a, config.eigh);
    out.vectors = e.vectors;
    out.values = e.values;
  }

  out.keep = keep_mask(out.vectors).logical_and_(out.values.isfinite().all(-1));
  const at::Tensor failed = out.keep.logical_not();
  // Stored as rows. The codec's copy of non-finite values as zeros happens in place: only the
  // factors that the keep mask already rejects (with their fresh roots) change.
  at::Tensor rows = out.vectors.mT();
  if (!rows.is_contiguous()) rows = workspace.take(kBasisRows, rows.sizes(), fp32).copy_(rows);
  const std::vector<QuantizedMatrix> stored = quantize_candidates(rows, first.vector_quant_);
  for (int64_t i = 0; i < count; ++i) {
    EigenQuantizedFactor& f = *batch[static_cast<size_t>(i)];
    f.eigenvectors_t_ = QuantizedMatrix::select(out.keep[i], stored[static_cast<size_t>(i)], f.eigenvectors_t_);
    f.eigenvalues_ = at::where(out.keep[i], out.values[i], f.eigenvalues_);
    f.count_failure(failed[i]);
    f.has_basis_ = true;
  }
  return out;
}

void EigenQuantizedFactor::update_roots(c10::ArrayRef<EigenQuantizedFactor*> batch, const at::Tensor& vectors,
                                        const at::Tensor& values, const at::Tensor& usable, RefreshContext& context) {
  const EigenQuantizedFactor& first = *batch.front();
  const FactorConfig& config = first.config_;
  linalg::Workspace& workspace = *context.workspace;
  const int64_t count = static_cast<int64_t>(batch.size()), n = first.order_;
  at::Tensor roots = workspace.take(kStatistic, {count, n, n}, first.eigenvalues_.options());
  linalg::recompose_out(roots, vectors, linalg::inverse_root_spectrum(values, config.root_exponent, config.epsilon, config.damping),
                        workspace, kScratch);
  at::Tensor keep = keep_mask(roots), failed = keep.logical_not();
  if (usable.defined()) {
    keep.logical_and_(usable);
    failed.logical_and_(usable);  // a failed statistics update was counted already
  }
  const std::vector<QuantizedMatrix> stored = quantize_candidates(roots, first.root_quant_);
  for (int64_t i = 0; i < count; ++i) {
    EigenQuantizedFactor& f = *batch[static_cast<size_t>(i)];
    f.root_ = QuantizedMatrix::select(keep[i], stored[static_cast<size_t>(i)], f.root_);
    f.count_failure(failed[i]);
  }
}

at::Tensor EigenQuantizedFactor::inverse_root() const {
  if (config_.eigenbasis) return eigenvectors(config_.bjorck_root_steps);
  if (!config_.eigen_form_root) return root_.dequantize();
  // A batch of one through the step's batched path, so both make the root the same way.
  linalg::Workspace workspace;
  const at::Tensor out = at::empty({1, order_, order_}, eigenvalues_.options());
  eigen_form_roots_into({this}, out, workspace, 0);
  return out[0];
}

void EigenQuantizedFactor::eigen_form_roots_into(c10::ArrayRef<const EigenQuantizedFactor*> batch, const at::Tensor& out,
                                                 linalg::Workspace& workspace, int slot) {
  const EigenQuantizedFactor& first = *batch.front();
  const at::Tensor v = eigenvectors(batch, first.config_.bjorck_stat_steps, workspace, slot);
  std::vector<at::Tensor> values;
  for (const EigenQuantizedFactor* f : batch) values.push_back(f->eigenvalues_);
  const at::Tensor d =
      linalg::inverse_root_spectrum(at::stack(values), first.config_.root_exponent, first.config_.epsilon,
                                      first.config_.damping);
  linalg::recompose_out(out, v, d, workspace, slot + 1);  // Björck's slots are free again
}

at::Tensor EigenQuantizedFactor::statistic() const {
  const at::Tensor v = eigenvectors(0);
  return at::matmul(v * eigenvalues_.unsqueeze(0), v.t());
}

int64_t EigenQuantizedFactor::state_bytes() const {
  return eigenvectors_t_.nbytes() + eigenvalues_.numel() * 4 + (root_.defined() ? root_.nbytes() : 0);
}

void EigenQuantizedFactor::save(TensorMap& out, const std::string& prefix) const {
  save_quantized(out, prefix + "eigenvectors_t.", eigenvectors_t_);
  out[prefix + "eigenvalues"] = eigenvalues_;
  if (root_.defined()) save_quantized(out, prefix + "root.", root_);
}

void EigenQuantizedFactor::load(const TensorMap& in, const std::string& prefix) {
  QuantizedMatrix vectors = load_quantized(in, prefix + "eigenvectors_t.", {order_, order_}, vector_quant_);
  const at::Tensor values = read_entry(in, prefix + "eigenvalues", at::kFloat, {order_});
  QuantizedMatrix root;
  if (keeps_root()) root = load_quantized(in, prefix + "root.", {order_, order_}, root_quant_);
  const at::Device device = eigenvalues_.device();
  eigenvectors_t_ = vectors.to(device);
  eigenvalues_ = values.to(device).clone();
  if (root.defined()) root_ = root.to(device);
  // The initial state has every eigenvalue at epsilon; a refreshed one has not (read once, at load).
  has_basis_ = config_.eigenbasis && !eigenvalues_.eq(static_cast<float>(config_.epsilon)).all().item<bool>();
}

}  // namespace lowbit::precond
