#include "precond/parameter_preconditioner.h"

#include <ATen/ATen.h>

#include "precond/batched_precondition.h"

namespace lowbit::precond {
namespace {

std::string block_prefix(size_t index, const char* side) {
  return "block" + std::to_string(index) + "." + side + ".";
}

}  // namespace

ParameterPreconditioner::ParameterPreconditioner(at::IntArrayRef shape, const at::TensorOptions& device,
                                                 const PreconditionerConfig& config)
    : partition_(partition_shape(shape, config.max_dim)), config_(config), device_(device) {
  auto make = [&](int64_t order) {
    // A Cholesky factor of order 1 has no triangle to quantize: it stays Dense too.
    const bool too_small = order * order < config.min_quant_numel ||
                           (config.kind == FactorKind::CholeskyQuantized && order < 2);
    const FactorKind kind = too_small ? FactorKind::Dense : config.kind;
    return make_factor(kind, order, device, config.factor);
  };
  for (const BlockSlice& s : partition_.blocks) blocks_.push_back({s, make(s.rows), make(s.cols)});
}

at::Tensor ParameterPreconditioner::as_matrix(const at::Tensor& grad) const {
  return grad.reshape({partition_.rows, partition_.cols}).to(at::kFloat);
}

KroneckerFactor& ParameterPreconditioner::factor(int64_t index) {
  TORCH_CHECK(index >= 0 && index < factor_count(), "factor index ", index, " out of range [0, ", factor_count(), ")");
  Block& b = blocks_[static_cast<size_t>(index / 2)];
  return index % 2 == 0 ? *b.left : *b.right;
}

void ParameterPreconditioner::check_mask(const FactorMask& mask) const {
  TORCH_CHECK(mask.empty() || static_cast<int64_t>(mask.size()) == factor_count(), "factor mask has ",
              mask.size(), " entries for ", factor_count(), " factors");
}

void ParameterPreconditioner::plan_refresh(const at::Tensor& grad, bool statistics, bool roots,
                                           const FactorMask& mask, std::vector<RefreshItem>& items) {
  check_mask(mask);
  const auto wanted = [&](size_t index) { return mask.empty() || mask[index]; };
  const at::Tensor g = statistics ? as_matrix(grad) : at::Tensor();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = blocks_[i];
    const at::Tensor gb = statistics ? block_of(g, b.slice) : at::Tensor();
    if (wanted(2 * i)) items.push_back({b.left.get(), gb, roots});
    if (wanted(2 * i + 1)) items.push_back({b.right.get(), statistics ? gb.t() : at::Tensor(), roots});
  }
}

void ParameterPreconditioner::update_statistics(const at::Tensor& grad, const FactorMask& mask) {
  std::vector<RefreshItem> items;
  plan_refresh(grad, true, false, mask, items);
  refresh_alone(items);
}

void ParameterPreconditioner::update_inverse_roots(const FactorMask& mask) {
  std::vector<RefreshItem> items;
  plan_refresh(at::Tensor(), false, true, mask, items);
  refresh_alone(items);
}

at::Tensor ParameterPreconditioner::precondition(const at::Tensor& grad) const {
  at::Tensor out = at::empty({partition_.rows, partition_.cols}, grad.options().dtype(at::kFloat));
  linalg::Workspace workspace;
  precondition_all({PreconditionItem{this, grad, out}}, workspace, 0);
  return out.reshape(grad.sizes()).to(grad.scalar_type());
}

std::vector<ParameterPreconditioner::BlockView> ParameterPreconditioner::block_views() const {
  std::vector<BlockView> out;
  for (const Block& b : blocks_) out.push_back({b.slice, b.left.get(), b.right.get()});
  return out;
}

ParameterPreconditioner::Bases ParameterPreconditioner::eigenbases() const {
  TORCH_CHECK(config_.factor.eigenbasis, "eigenbases() needs factors that keep an eigenbasis (SOAP)");
  Bases out;
  for (const Block& b : blocks_) out.emplace_back(b.left->inverse_root(), b.right->inverse_root());
  return out;
}

at::Tensor ParameterPreconditioner::rotate(const at::Tensor& m, const Bases& bases, bool into) const {
  TORCH_CHECK(bases.size() == blocks_.size(), "rotate: ", bases.size(), " bases for ", blocks_.size(), " blocks");
  const at::Tensor g = as_matrix(m);
  at::Tensor out = at::empty_like(g);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const auto& [left, right] = bases[i];
    const at::Tensor gb = block_of(g, blocks_[i].slice);
    const at::Tensor r = into ? at::matmul(at::matmul(left.t(), gb), right) : at::matmul(at::matmul(left, gb), right.t());
    block_of(out, blocks_[i].slice).copy_(r);
  }
  return out.reshape(m.sizes());
}

at::Tensor ParameterPreconditioner::rotate_second_moment(const at::Tensor& v, const Bases& bases) const {
  Bases squared;
  for (const auto& [left, right] : bases) squared.emplace_back(left * left, right * right);
  return rotate(v, squared, true);
}

int64_t ParameterPreconditioner::state_bytes() const {
  int64_t total = 0;
  for (const KroneckerFactor* f : factors()) total += f->state_bytes();
  return total;
}

int64_t ParameterPreconditioner::failures() const {
  int64_t total = 0;
  for (const KroneckerFactor* f : factors()) total += f->failures();
  return total;
}

std::vector<const KroneckerFactor*> ParameterPreconditioner::factors() const {
  std::vector<const KroneckerFactor*> out;
  for (const Block& b : blocks_) {
    out.push_back(b.left.get());
    out.push_back(b.right.get());
  }
  return out;
}

void ParameterPreconditioner::save(TensorMap& out) const {
  for (size_t i = 0; i < blocks_.size(); ++i) {
    blocks_[i].left->save(out, block_prefix(i, "left"));
    blocks_[i].right->save(out, block_prefix(i, "right"));
  }
}

void ParameterPreconditioner::load(const TensorMap& in) {
  // Load into fresh factors first, so a bad entry leaves this preconditioner as it was.
  std::vector<Block> staged;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block b{blocks_[i].slice, make_factor(blocks_[i].left->kind(), blocks_[i].slice.rows, device_, config_.factor),
            make_factor(blocks_[i].right->kind(), blocks_[i].slice.cols, device_, config_.factor)};
    b.left->load(in, block_prefix(i, "left"));
    b.right->load(in, block_prefix(i, "right"));
    staged.push_back(std::move(b));
  }
  const std::string extra = "block" + std::to_string(blocks_.size()) + ".";
  TORCH_CHECK(in.lower_bound(extra) == in.end() || in.lower_bound(extra)->first.rfind(extra, 0) != 0,
              "checkpoint holds more preconditioner blocks than this parameter has (", blocks_.size(), ")");
  blocks_ = std::move(staged);
}

}  // namespace lowbit::precond
