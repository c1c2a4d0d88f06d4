#include "optim/shampoo_engine.h"

#include <ATen/ATen.h>

#include "precond/batched_precondition.h"

namespace lowbit {
namespace {

constexpr int64_t kMiB = 1 << 20;

}  // namespace

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

void ShampooEngine::finish(const std::vector<ParamStepRef>& params) {
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
    apply_direction(param, p.grad, direction, *p.state, *p.options);
  }
  workspace_.end_step();
}

}  // namespace lowbit
