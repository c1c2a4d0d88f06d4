// SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024), on lowbit's
// Shampoo factors: with Q_L, Q_R the eigenbases of L and R (4-bit eigenvectors at bits=4),
//   m = b1 m + (1 - b1) G                      (parameter coordinates, as in the paper)
//   G' = Q_L^T G Q_R,  M' = Q_L^T m Q_R
//   v = b2 v + (1 - b2) G' * G'                (rotated coordinates)
//   p *= 1 - lr wd;  p -= lr / (1 - b1^t) * Q_L (M' / (sqrt(v) / sqrt(1 - b2^t) + eps)) Q_R^T
// Bases refresh with the statistics (every T1 steps); they are used from the step after the
// first root update (T2, start_preconditioning_step), plain AdamW before.
// - At that switch m and v start afresh, their bias corrections counting from that step
//   (state soap_v_start), as if SOAP began there. v summed in the parameter's coordinates says
//   little about the rotated ones: kept, a 2-epoch CNN run diverged (loss 2.3 -> 22); moved as
//   the diagonal of Q^T diag(v) Q, a small run reached 0.50 accuracy where starting at the
//   bases reaches 0.89; restarting v alone, m's history against v's single step exploded.
// - At later refreshes v follows the bases as the diagonal of R^T diag(v) R with
//   R = Q_old^T Q_new per side, (R o R)^T V (R o R): near the identity for a warm-started
//   refresh. The paper keeps v; then a coordinate whose v is ~0 from the old basis but that
//   carries signal in the new one steps by m' / eps (a T1 = T2 = 1 run reached loss 3e4).
#include <ATen/ATen.h>

#include <cmath>

#include "optim/shampoo_internal.h"

namespace lowbit {

void soap_update(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& s, const ShampooOptions& o) {
  const auto [beta1, beta2] = o.betas();
  const adamw::MomentLayout layout = graft_layout(p, o);
  adamw::Moments moments = graft_moments(s, layout, p);
  auto [m, v] = adamw::read_moments(moments, layout);
  const int64_t numel = p.numel();
  const torch::Tensor g = grad.reshape({numel}).to(at::kFloat);
  // The bases are used from the step after the first root update: bases built from a
  // statistic that holds only the current gradient G make Q_L^T G Q_R exactly diagonal, and
  // rounding noise off the diagonal would then get Adam's full step (v ~ noise^2); the paper
  // likewise only builds the bases from its first gradient.
  const bool root_update_now = s.step() >= o.start_preconditioning_step() && s.step() % o.root_interval() == 0;
  const bool rotated = s.preconditioner && s.step() >= o.start_preconditioning_step() &&
                       (s.root_updates() > 1 || (s.root_updates() == 1 && (!root_update_now || s.soap_v_start() > 0)));
  precond::ParameterPreconditioner::Bases bases;
  if (rotated) bases = s.preconditioner->eigenbases();
  const bool first_rotation = rotated && s.soap_v_start() == 0;
  if (first_rotation) {
    m.zero_();
    v.zero_();
    s.soap_v_start(s.step());
  } else if (rotated && !s.soap_previous_bases.empty()) {
    precond::ParameterPreconditioner::Bases transition;
    for (size_t i = 0; i < bases.size(); ++i)
      transition.emplace_back(at::matmul(s.soap_previous_bases[i].first.t(), bases[i].first),
                              at::matmul(s.soap_previous_bases[i].second.t(), bases[i].second));
    v.copy_(s.preconditioner->rotate_second_moment(v.view(p.sizes()), transition).reshape({numel}));
  }
  s.soap_previous_bases.clear();
  auto into = [&](const torch::Tensor& t) {
    return rotated ? s.preconditioner->rotate(t.view(p.sizes()), bases, true).reshape({numel}) : t;
  };

  m.mul_(beta1).add_(g, 1 - beta1);
  const torch::Tensor g_rotated = into(g);
  v.mul_(beta2).addcmul_(g_rotated, g_rotated, 1 - beta2);
  const int64_t steps = s.soap_v_start() > 0 ? s.step() - s.soap_v_start() + 1 : s.step();
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(steps));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(steps));
  const torch::Tensor denom = (v.sqrt() / std::sqrt(bias_correction2)).add_(o.eps());
  torch::Tensor direction = into(m) / denom;
  if (rotated) direction = s.preconditioner->rotate(direction.view(p.sizes()), bases, false);

  p.mul_(1 - o.lr() * o.weight_decay());  // decoupled weight decay
  p.add_(direction.view(p.sizes()).to(p.scalar_type()), -o.lr() / bias_correction1);
  adamw::write_moments(m, v, moments, layout, s.step());
}

}  // namespace lowbit
