// SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024), on lowbit's
// Shampoo factors: with Q_L, Q_R the eigenbases of L and R (4-bit eigenvectors at bits=4),
//   m = b1 m + (1 - b1) G                      (parameter coordinates, as in the paper)
//   G' = Q_L^T G Q_R,  M' = Q_L^T m Q_R
//   v = b2 v + (1 - b2) G' * G'                (rotated coordinates)
//   p *= 1 - lr wd;  p -= lr / (1 - b1^t) * Q_L (M' / (sqrt(v) / sqrt(1 - b2^t) + eps)) Q_R^T
// Bases refresh with the statistics (every T1 steps); they are used from the first root
// update on (T2, start_preconditioning_step), plain AdamW before. At that switch v, summed in
// the parameter's coordinates so far, is moved into the bases as the diagonal of
// Q^T diag(v) Q; left where it was, coordinates with a small v but a large rotated m would
// take huge steps (a 2-epoch CNN run diverged, loss 2.3 -> 22). Later refreshes are small
// warm-started rotations, and v stays (as in the paper).
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
  const bool rotated = s.preconditioner && s.step() >= o.start_preconditioning_step() && s.root_updates() > 0;
  precond::ParameterPreconditioner::Bases bases;
  if (rotated) bases = s.preconditioner->eigenbases();
  const bool first_rotation = rotated && s.root_updates() == 1 && s.step() % o.root_interval() == 0;
  if (first_rotation) v.copy_(s.preconditioner->rotate_second_moment(v.view(p.sizes()), bases).reshape({numel}));
  auto into = [&](const torch::Tensor& t) {
    return rotated ? s.preconditioner->rotate(t.view(p.sizes()), bases, true).reshape({numel}) : t;
  };

  m.mul_(beta1).add_(g, 1 - beta1);
  const torch::Tensor g_rotated = into(g);
  v.mul_(beta2).addcmul_(g_rotated, g_rotated, 1 - beta2);
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(s.step()));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(s.step()));
  const torch::Tensor denom = (v.sqrt() / std::sqrt(bias_correction2)).add_(o.eps());
  torch::Tensor direction = into(m) / denom;
  if (rotated) direction = s.preconditioner->rotate(direction.view(p.sizes()), bases, false);

  p.mul_(1 - o.lr() * o.weight_decay());  // decoupled weight decay
  p.add_(direction.view(p.sizes()).to(p.scalar_type()), -o.lr() / bias_correction1);
  adamw::write_moments(m, v, moments, layout, s.step());
}

}  // namespace lowbit
