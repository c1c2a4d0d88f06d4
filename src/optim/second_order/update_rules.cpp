#include "optim/second_order/update_rules.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "optim/gradient_health.h"

namespace lowbit::rules {

void ema(at::Tensor& avg, const at::Tensor& x, double beta) { avg.mul_(beta).add_(x, 1 - beta); }

void sophia_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& exp_avg, const at::Tensor& hessian, double lr,
                   double beta1, double rho, double eps, double weight_decay) {
  ema(exp_avg, grad, beta1);
  p.mul_(1 - lr * weight_decay);
  const at::Tensor ratio = exp_avg / (hessian * rho).clamp_min_(eps);
  p.add_(ratio.clamp_(-1, 1), -lr);
}

at::Tensor adahessian_diagonal(const at::Tensor& estimate) {
  if (estimate.dim() != 4) return estimate;
  return estimate.abs().mean({2, 3}, /*keepdim=*/true).expand_as(estimate).contiguous();
}

void adahessian_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_hessian_diag_sq,
                       const at::Tensor& diagonal, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, double hessian_power) {
  ema(exp_avg, grad, beta1);
  exp_hessian_diag_sq.mul_(beta2).addcmul_(diagonal, diagonal, 1 - beta2);
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
  at::Tensor denom = (exp_hessian_diag_sq / bias_correction2).sqrt_();
  if (hessian_power != 1.0) denom.pow_(hessian_power);
  denom.add_(eps);
  // Decoupled weight decay from the pre-update parameter, as the authors' code does.
  const at::Tensor decay = p * weight_decay;
  p.addcdiv_(exp_avg, denom, -lr / bias_correction1);
  p.sub_(decay, lr);
}

double nag_gs_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& velocity, double gamma, double alpha,
                     double mu) {
  const double b = alpha * mu / (alpha * mu + gamma);
  velocity.mul_(1 - b).add_(p, b).add_(grad, -alpha / (alpha * mu + gamma));
  const double a = alpha / (1 + alpha);
  p.mul_(1 - a).add_(velocity, a);
  return (gamma + alpha * mu) / (1 + alpha);
}

void mfac_update(at::Tensor& p, const at::Tensor& grad, mfac::WindowTensors& window, const mfac::WindowLayout& layout,
                 at::Tensor& momentum_buffer, double lr, double momentum, double weight_decay, double damping) {
  const at::Tensor rows = mfac::push(window, layout, grad);
  // A quantized window preconditions the gradient as stored: the rounding residual of g
  // lies outside the window's span, where F^-1 multiplies by 1/damping.
  const int64_t latest = (window.count - 1) % layout.size;
  const at::Tensor g = layout.quantized() ? rows[latest].to(at::kFloat).view(grad.sizes()) : grad;
  at::Tensor d = mfac::inverse_fisher_product(window, rows, g, damping);
  if (weight_decay != 0) d.add_(p, weight_decay);
  if (momentum != 0) {
    if (!momentum_buffer.defined()) {
      momentum_buffer = d.clone();
    } else {
      momentum_buffer.mul_(momentum).add_(d);
    }
    d = momentum_buffer;
  }
  p.add_(d, -lr);
}

bool sophia_update_bounded(double lr, double weight_decay) {
  // The step is lr clip(., 1): at most lr; the decoupled decay p (1 - lr wd) does not grow |p|
  // when lr wd <= 2. m (an EMA of g) and h (an EMA of estimates) stay below 2^52.
  return lr <= health::kMaxUncheckedUpdate && lr * weight_decay <= 2;
}

bool adahessian_update_bounded(double lr, double beta1, double eps, double weight_decay) {
  // |m| <= 2^52, bias correction 1 - b1^t >= 1 - b1, denominator (sqrt(v_hat))^k + eps >= eps:
  // the step is at most lr 2^52 / ((1 - b1) eps). The decay is applied as a second addition,
  // p -= lr (wd p_old), whose term wd p_old stays finite for wd <= 1 and leaves
  // |p_old (1 - lr wd)| <= |p_old| for lr wd <= 2; half the update margin for each addition.
  return lr * 0x1p52 / ((1 - beta1) * eps) <= health::kMaxUncheckedUpdate / 2 && weight_decay <= 1 &&
         lr * weight_decay <= 2;
}

bool mfac_update_bounded(double lr, double momentum, double weight_decay, double damping) {
  // F = damping I + (1/n) G^T G >= damping I, so |F^-1 g| <= ||g||_2 / damping <= 2^52 / damping.
  // The momentum buffer is a sum of momentum^k (d + wd p): |buf| <= (2^52 / damping + wd |p|)
  // / (1 - momentum), and the step lr buf. Bounded when the gradient part is at most half the
  // margin (it also keeps d and buf finite) and lr wd / (1 - momentum) <= 1, so the decay part
  // moves p by at most |p| (< 2^126: the result stays below 2^127).
  const double gradient_part = 0x1p52 / (damping * (1 - momentum));
  return lr * gradient_part <= health::kMaxUncheckedUpdate / 2 && gradient_part <= 0x1p120 &&
         lr * weight_decay / (1 - momentum) <= 1;
}

bool nag_gs_step_bounded(double x_max, double v_max, double g_max, double gamma, double alpha, double mu,
                         at::ScalarType dtype) {
  // v' = (1 - b) v + b x - c g with b in [0, 1] and c = alpha / (alpha mu + gamma), then
  // x' = (1 - a) x + a v' with a in [0, 1): convex combinations plus c g, so
  // |v'| <= max(|v|, |x|) + c |g| and |x'| <= max(|x|, |v'|). Half the largest value leaves
  // room for the rounding of each operation (relative 2^-8 at worst, bf16).
  const double c = alpha / (alpha * mu + gamma);
  const double bound = std::max(x_max, v_max) + c * g_max;
  return std::isfinite(bound) && bound <= health::largest_finite(dtype) / 2;
}

}  // namespace lowbit::rules
