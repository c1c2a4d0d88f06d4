// The first-order rules Shampoo grafts onto. Their arithmetic follows torch::optim::SGD
// and torch::optim::AdamW operation for operation, so that with preconditioning off the
// optimizer reproduces them exactly (tested).
#include <ATen/ATen.h>

#include <cmath>

#include "optim/shampoo_internal.h"

namespace lowbit {

void sgdm_update(torch::Tensor& p, torch::Tensor d, ShampooParamState& state, const ShampooOptions& o) {
  if (o.weight_decay() != 0) d = d.add(p, o.weight_decay());  // coupled L2
  if (o.momentum() != 0) {
    torch::Tensor& buf = state.momentum_buffer();
    if (!buf.defined()) {
      buf = d.clone().detach();
    } else {
      buf.mul_(o.momentum()).add_(d);
    }
    d = o.nesterov() ? d.add(buf, o.momentum()) : buf;
  }
  p.add_(d, -o.lr());
}

void adamw_update(torch::Tensor& p, const torch::Tensor& d, ShampooParamState& state, const ShampooOptions& o) {
  p.mul_(1 - o.lr() * o.weight_decay());  // decoupled weight decay
  const auto [beta1, beta2] = o.betas();
  if (!state.exp_avg().defined()) {
    state.exp_avg(torch::zeros_like(p));
    state.exp_avg_sq(torch::zeros_like(p));
  }
  const double bias_correction1 = 1 - std::pow(beta1, state.step());
  const double bias_correction2 = 1 - std::pow(beta2, state.step());
  state.exp_avg().mul_(beta1).add_(d, 1 - beta1);
  state.exp_avg_sq().mul_(beta2).addcmul_(d, d, 1 - beta2);
  const torch::Tensor denom = (state.exp_avg_sq().sqrt() / std::sqrt(bias_correction2)).add_(o.eps());
  p.addcdiv_(state.exp_avg(), denom, -o.lr() / bias_correction1);
}

}  // namespace lowbit
