#include <ATen/ATen.h>

#include <cmath>

#include "optim/shampoo_internal.h"

namespace lowbit {

ShampooParamState make_param_state(const torch::Tensor& p, const ShampooOptions& options,
                                   const Shampoo::EighSolver& eigh) {
  ShampooParamState s;
  auto preconditioner = std::make_shared<precond::ParameterPreconditioner>(
      p.sizes(), p.options(), preconditioner_config(options, eigh));
  if (preconditioner->active()) s.preconditioner = std::move(preconditioner);
  return s;
}

bool all_finite(const torch::Tensor& t) { return t.isfinite().all().item<bool>(); }

ParamStepPlan next_param_step(const ShampooParamState& s, const ShampooOptions& o) {
  ParamStepPlan plan;
  if (!s.preconditioner) return plan;
  const int64_t k = s.step() + 1;
  plan.statistics = k % o.stat_interval() == 0;
  plan.roots = k >= o.start_preconditioning_step() && k % o.root_interval() == 0;
  return plan;
}

ParamStepPlan begin_param_step(ShampooParamState& s, const ShampooOptions& o) {
  const ParamStepPlan plan = next_param_step(s, o);
  s.step(s.step() + 1);
  if (!s.preconditioner) return plan;
  // SOAP keeps v in the bases' coordinates: remember the bases in use before the refresh.
  s.soap_previous_bases.clear();
  if (o.preconditioner() == "soap" && plan.statistics && s.root_updates() > 0)
    s.soap_previous_bases = s.preconditioner->eigenbases();
  if (plan.roots) s.root_updates(s.root_updates() + 1);
  return plan;
}

bool preconditions(const ShampooParamState& s, const ShampooOptions& o) {
  return o.preconditioner() != "soap" && s.preconditioner && s.step() >= o.start_preconditioning_step() &&
         s.root_updates() > 0;
}

void apply_direction(torch::Tensor& p, const torch::Tensor& grad, const torch::Tensor& direction,
                     ShampooParamState& s, const ShampooOptions& o) {
  if (o.preconditioner() == "soap") {
    soap_update(p, grad, s, o);
  } else if (o.graft() == "sgdm") {
    sgdm_update(p, direction, s, o);
  } else {
    adamw_update(p, direction, s, o);
  }
}

void finish_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& s,
                       const ShampooOptions& o) {
  apply_direction(p, grad, preconditions(s, o) ? s.preconditioner->precondition(grad) : grad, s, o);
}

void shampoo_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& s,
                        const ShampooOptions& o) {
  const ParamStepPlan plan = begin_param_step(s, o);
  if (plan.statistics) s.preconditioner->update_statistics(grad);
  if (plan.roots) s.preconditioner->update_inverse_roots();
  finish_param_step(p, grad, s, o);
}

}  // namespace lowbit
