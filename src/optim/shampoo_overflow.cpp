// Shampoo's part of the overflow rule (optim/gradient_health.h): what a gradient beyond the
// rule would overflow, when the options bound a parameter's update, and the trial of a step
// on copies where they do not (fp16 parameters, extreme options).
#include <ATen/ATen.h>

#include "optim/gradient_health.h"
#include "optim/shampoo_internal.h"
#include "precond/partition.h"

namespace lowbit {
namespace {

// A copy of `s` that shares no tensor with it, for a step of p with options `o`: the
// preconditioner rebuilt from its saved entries (as a checkpoint resumes it, bit-identically)
// on p's device. The first-order tensors are only moved to p's device (trial_update copies
// them).
ShampooParamState detached_copy(const ShampooParamState& s, const torch::Tensor& p, const ShampooOptions& o,
                                const Shampoo::EighSolver& eigh) {
  ShampooParamState copy = s;
  for (torch::Tensor* t : {&copy.momentum_buffer(), &copy.exp_avg(), &copy.exp_avg_sq(), &copy.exp_avg_codes(),
                           &copy.exp_avg_scales(), &copy.exp_avg_sq_codes(), &copy.exp_avg_sq_scales()})
    if (t->defined()) *t = t->to(p.device());
  if (s.preconditioner) {
    precond::TensorMap entries;
    s.preconditioner->save(entries);
    for (auto& [name, t] : entries) t = t.to(p.device(), t.scalar_type(), false, /*copy=*/true);
    copy.preconditioner =
        std::make_shared<precond::ParameterPreconditioner>(p.sizes(), p.options(), preconditioner_config(o, eigh));
    copy.preconditioner->load(entries);
  }
  return copy;
}

}  // namespace

std::string shampoo_overflow_key(const torch::Tensor& p, const ShampooOptions& o) {
  if (precond::partition_shape(p.sizes(), o.max_preconditioner_dim()).preconditioned()) return "shampoo";
  return o.graft() == "sgdm" ? "shampoo.sgdm" : "shampoo.adamw";
}

bool shampoo_update_bounded(const ShampooOptions& o) {
  // The direction is the gradient, or the preconditioned gradient grafted to its norm: every
  // entry at most ||G||_F <= 2^52 (optim/gradient_health.h). Then
  // - AdamW (lowbit::adamw::update_bounded): at most lr 2^52 / ((1 - b1) eps). SOAP's direction
  //   is that of Adam in the eigenbases, rotated back: its Frobenius norm is at most
  //   ||m||_F / eps times the bases' norms (orthonormal; 4-bit ones within 2), so 4 times that.
  // - SGD: d + wd p into buf = momentum buf + d: |buf| <= (2^52 + wd |p|) / (1 - momentum), and
  //   the step lr buf (Nesterov: lr (d + momentum buf), at most twice that). The gradient part
  //   within the margin, and lr wd 2 / (1 - momentum) <= 1 so that the decay part moves p by
  //   at most |p| (< 2^126: the result stays below 2^127).
  if (o.graft() == "sgdm") {
    const double gradient_part = 2 * 0x1p52 / (1 - o.momentum());
    return o.lr() * gradient_part <= health::kMaxUncheckedUpdate / 2 && gradient_part <= 0x1p120 &&
           2 * o.lr() * o.weight_decay() / (1 - o.momentum()) <= 1;
  }
  const double scale = o.preconditioner() == "soap" ? 4 : 1;
  return adamw::update_bounded(o.lr() * scale, std::get<0>(o.betas()), o.eps(), o.weight_decay() / scale);
}

std::string shampoo_trial_step(const torch::Tensor& p, const torch::Tensor& grad, const ShampooParamState* state,
                               const ShampooOptions& o, const Shampoo::EighSolver& eigh) {
  ShampooParamState copy = state ? detached_copy(*state, p, o, eigh) : make_param_state(p, o, eigh);
  const std::vector<std::string> names = {"values",           "momentum_buffer", "exp_avg",
                                          "exp_avg_sq",       "exp_avg_codes",   "exp_avg_scales",
                                          "exp_avg_sq_codes", "exp_avg_sq_scales"};
  const std::vector<torch::Tensor> writes = {p,
                                             copy.momentum_buffer(),
                                             copy.exp_avg(),
                                             copy.exp_avg_sq(),
                                             copy.exp_avg_codes(),
                                             copy.exp_avg_scales(),
                                             copy.exp_avg_sq_codes(),
                                             copy.exp_avg_sq_scales()};
  const health::Trial t = health::trial_update(writes, [&](std::vector<torch::Tensor>& c) {
    copy.momentum_buffer(c[1]).exp_avg(c[2]).exp_avg_sq(c[3]).exp_avg_codes(c[4]).exp_avg_scales(c[5]);
    copy.exp_avg_sq_codes(c[6]).exp_avg_sq_scales(c[7]);
    shampoo_param_step(c[0], grad, copy, o);
    // The step creates the first-order state it lacked: check those too.
    c[1] = copy.momentum_buffer();
    c[2] = copy.exp_avg();
    c[3] = copy.exp_avg_sq();
    c[4] = copy.exp_avg_codes();
    c[5] = copy.exp_avg_scales();
    c[6] = copy.exp_avg_sq_codes();
    c[7] = copy.exp_avg_sq_scales();
  });
  return t.failed() ? health::overflow_problem(names[static_cast<size_t>(t.index)], t.dtype) : std::string();
}

}  // namespace lowbit
