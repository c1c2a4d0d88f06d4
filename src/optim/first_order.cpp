// The first-order rules Shampoo grafts onto. Their arithmetic follows torch::optim::SGD
// and torch::optim::AdamW operation for operation, so that with preconditioning off the
// optimizer reproduces them exactly (tested).
#include <ATen/ATen.h>

#include <cmath>

#include "optim/second_order/optimizer_support.h"
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

int64_t first_order_bytes(const ShampooParamState& s) {
  int64_t total = 0;
  for (const torch::Tensor* t : {&s.momentum_buffer(), &s.exp_avg(), &s.exp_avg_sq(), &s.exp_avg_codes(),
                                 &s.exp_avg_scales(), &s.exp_avg_sq_codes(), &s.exp_avg_sq_scales()})
    total += support::bytes_of(*t);
  return total;
}

adamw::MomentLayout graft_layout(const torch::Tensor& p, const ShampooOptions& o) {
  return adamw::layout_for(p.numel(), o.graft_bits(), "dynamic", "auto", 0, o.min_quant_numel());
}

adamw::Moments graft_moments(ShampooParamState& s, const adamw::MomentLayout& layout, const torch::Tensor& p) {
  const bool present = layout.quantized() ? s.exp_avg_codes().defined() : s.exp_avg().defined();
  if (!present) adamw::store_moments(s, adamw::make_moments(layout, p));
  return adamw::moments_of(s);
}

void adamw_update(torch::Tensor& p, const torch::Tensor& d, ShampooParamState& state, const ShampooOptions& o) {
  const auto [beta1, beta2] = o.betas();
  const adamw::MomentLayout layout = graft_layout(p, o);
  if (layout.quantized()) {  // low-bit moments: lowbit::AdamW's rule
    adamw::Moments moments = graft_moments(state, layout, p);
    adamw::update(p, d, moments, layout, state.step(), o.lr(), beta1, beta2, o.eps(), o.weight_decay());
    return;
  }
  p.mul_(1 - o.lr() * o.weight_decay());  // decoupled weight decay
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
