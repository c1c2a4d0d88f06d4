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

bool all_finite(const torch::Tensor& t) {
  if (at::isFloatingType(t.scalar_type()) && std::isfinite(t.sum().item<double>())) return true;
  return t.isfinite().all().item<bool>();
}

void shampoo_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& s,
                        const ShampooOptions& o) {
  s.step(s.step() + 1);
  torch::Tensor direction = grad;
  if (s.preconditioner) {
    const int64_t k = s.step();
    const bool started = k >= o.start_preconditioning_step();
    if (k % o.stat_interval() == 0) s.preconditioner->update_statistics(grad);  // every T1 steps
    if (started && k % o.root_interval() == 0) {                                  // every T2 steps
      s.preconditioner->update_inverse_roots();
      s.root_updates(s.root_updates() + 1);
    }
    if (started && s.root_updates() > 0) direction = s.preconditioner->precondition(grad);
  }
  if (o.graft() == "sgdm") {
    sgdm_update(p, direction, s, o);
  } else {
    adamw_update(p, direction, s, o);
  }
}

}  // namespace lowbit
