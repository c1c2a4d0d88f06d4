// The first-order rules Shampoo grafts onto. Their arithmetic follows torch::optim::SGD
// and torch::optim::AdamW operation for operation, so that with preconditioning off the
// optimizer reproduces them exactly (tested).
#include <ATen/ATen.h>

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
  for (const torch::Tensor* t : first_order_tensors(s)) total += support::bytes_of(*t);
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

// lowbit::AdamW's rule: with fp32 moments the operations of torch::optim::AdamW, in its order.
void adamw_update(torch::Tensor& p, const torch::Tensor& d, ShampooParamState& state, const ShampooOptions& o) {
  const auto [beta1, beta2] = o.betas();
  const adamw::MomentLayout layout = graft_layout(p, o);
  adamw::Moments moments = graft_moments(state, layout, p);
  adamw::update(p, d, moments, layout, state.step(), o.lr(), beta1, beta2, o.eps(), o.weight_decay());
}

}  // namespace lowbit
