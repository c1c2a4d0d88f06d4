#include "optim/shampoo_engine.h"

#include <ATen/ATen.h>

#include "precond/batched_precondition.h"

namespace lowbit {
namespace {

constexpr int64_t kMiB = 1 << 20;

}  // namespace

bool ShampooEngine::can_defer(const std::vector<ParamStepRef>& params, const std::string& gradient_check) const {
  if (gradient_check == "immediate" || params.empty()) return false;
  for (const ParamStepRef& p : params) {
    if (gradient_check == "auto" && !p.param.is_cuda()) return false;
    const ShampooOptions& o = *p.options;
    if (p.state == nullptr || p.state->step() < 1 || p.param.scalar_type() == at::kHalf || o.skip_nonfinite() ||
        o.preconditioner() == "soap" || !shampoo_update_bounded(o) || next_param_step(*p.state, o).any())
      return false;
  }
  return true;
}

void ShampooEngine::step_deferred(const std::vector<ParamStepRef>& params) {
  std::vector<at::Tensor> grads;
  std::vector<DeferredGradientCheck::Stepped> stepped;
  for (const ParamStepRef& p : params) {
    grads.push_back(p.grad);
    stepped.push_back({p.state, p.group, p.index, shampoo_overflow_key(p.param, *p.options)});
  }
  const at::Tensor commit = deferred_.begin(grads, std::move(stepped));
  for (const ParamStepRef& p : params) begin_param_step(*p.state, *p.options);  // refreshes nothing
  finish(params, commit);
}

void ShampooEngine::step(const std::vector<ParamStepRef>& params) {
  std::vector<precond::RefreshItem> items;
  plan(params, {}, items);
  refresh(items);
  finish(params);
}

std::vector<ParamStepPlan> ShampooEngine::plan(const std::vector<ParamStepRef>& params,
                                               const std::vector<precond::ParameterPreconditioner::FactorMask>& mine,
                                               std::vector<precond::RefreshItem>& items) {
  std::vector<ParamStepPlan> plans;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamStepRef& p = params[i];
    plans.push_back(begin_param_step(*p.state, *p.options));
    if (!plans.back().any()) continue;
    p.state->preconditioner->plan_refresh(p.grad, plans.back().statistics, plans.back().roots,
                                          mine.empty() ? precond::ParameterPreconditioner::FactorMask{} : mine[i],
                                          items);
  }
  return plans;
}

int64_t ShampooEngine::budget(const at::Device& device) const {
  return workspace_bytes_ > 0 ? workspace_bytes_ : (device.is_cpu() ? 64 * kMiB : 1024 * kMiB);
}

void ShampooEngine::refresh(const std::vector<precond::RefreshItem>& items) {
  if (items.empty()) return;
  precond::RefreshContext context;
  context.workspace = &workspace_;
  context.workspace_bytes = budget(items.front().factor->device());
  precond::refresh(items, context);
}

void ShampooEngine::finish(const std::vector<ParamStepRef>& params, const at::Tensor& commit) {
  // The preconditioned directions of every parameter that has one, batched by block shape.
  std::vector<at::Tensor> directions(params.size());
  std::vector<precond::PreconditionItem> items;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamStepRef& p = params[i];
    if (!preconditions(*p.state, *p.options)) continue;
    const precond::Partition& partition = p.state->preconditioner->partition();
    directions[i] = at::empty({partition.rows, partition.cols}, p.grad.options().dtype(at::kFloat));
    items.push_back({p.state->preconditioner.get(), p.grad, directions[i]});
  }
  if (!items.empty()) precond::precondition_all(items, workspace_, budget(items.front().direction.device()));
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamStepRef& p = params[i];
    at::Tensor param = p.param;
    const at::Tensor direction =
        directions[i].defined() ? directions[i].view(p.grad.sizes()).to(p.grad.scalar_type()) : p.grad;
    if (!commit.defined()) {
      apply_direction(param, p.grad, direction, *p.state, *p.options);
      continue;
    }
    // Under a device-side verdict: the writes are kept where it holds, the values before
    // the step elsewhere (where() takes nothing from the branch it does not select, so a
    // NaN computed from a bad gradient goes nowhere).
    const at::Tensor param_before = param.clone();
    const auto writes = first_order_tensors(*p.state);  // a plain step writes these and the parameter
    std::vector<at::Tensor> before;
    for (const at::Tensor* t : writes) before.push_back(t->defined() ? t->clone() : at::Tensor());
    apply_direction(param, p.grad, direction, *p.state, *p.options);
    param.copy_(at::where(commit, param, param_before));
    for (size_t k = 0; k < writes.size(); ++k)
      if (before[k].defined() && writes[k]->defined()) *writes[k] = at::where(commit, *writes[k], before[k]);
  }
  workspace_.end_step();
}

}  // namespace lowbit
