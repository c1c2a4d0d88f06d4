// The per-parameter update rules of Sophia, AdaHessian and NAG-GS on plain tensors: one
// implementation shared by the C++ optimizers and the Python package's ops. Each updates
// p and its state tensors in place and expects checked, finite inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "optim/second_order/gradient_window.h"

namespace lowbit::rules {

// avg = beta avg + (1 - beta) x
void ema(at::Tensor& avg, const at::Tensor& x, double beta);

// Sophia: m = b1 m + (1 - b1) g;  p *= 1 - lr wd;  p -= lr clip(m / max(rho h, eps), 1).
void sophia_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& exp_avg, const at::Tensor& hessian, double lr,
                   double beta1, double rho, double eps, double weight_decay);

// AdaHessian's D from a Hutchinson estimate z * (H z): unchanged for tensors of up to 3
// dimensions; for 4-D convolution kernels, the mean of |estimate| over the kernel's last two
// (spatial) dimensions, broadcast back to the kernel's shape.
at::Tensor adahessian_diagonal(const at::Tensor& estimate);

// AdaHessian at step `step` (1-based) with the diagonal D.
void adahessian_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_hessian_diag_sq,
                       const at::Tensor& diagonal, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay, double hessian_power);

// One NAG-GS step (see lowbit/nag_gs.h); returns the new gamma.
double nag_gs_update(at::Tensor& p, const at::Tensor& grad, at::Tensor& velocity, double gamma, double alpha, double mu);

// One M-FAC step: push grad into the window, d = F^-1 g + wd p, momentum (the buffer is
// created on first use when momentum > 0), p -= lr d. g is grad for an fp32 window and
// grad as stored (dequantized) for a quantized one.
void mfac_update(at::Tensor& p, const at::Tensor& grad, mfac::WindowTensors& window, const mfac::WindowLayout& layout,
                 at::Tensor& momentum_buffer, double lr, double momentum, double weight_decay, double damping);

// Whether the options bound the change of an fp32 / bf16 parameter (of magnitude below 2^126)
// by health::kMaxUncheckedUpdate, every gradient and Hessian estimate obeying the rule of
// optim/gradient_health.h (entries at most 2^52); the derivations are next to the
// definitions. Where they do not, a step is tried on copies before anything is written.
bool sophia_update_bounded(double lr, double weight_decay);
bool adahessian_update_bounded(double lr, double beta1, double eps, double weight_decay);
bool mfac_update_bounded(double lr, double momentum, double weight_decay, double damping);

// Whether a NAG-GS step of a parameter of `dtype` stays at most half the dtype's largest
// value, given the largest magnitudes of the parameter x, its velocity v (x's when it has
// none yet) and its gradient g. NAG-GS's state is not bounded by the gradient: with mu = 0,
// gamma decays like (1 + alpha)^-k and the gradient's weight alpha / (alpha mu + gamma)
// grows without bound.
bool nag_gs_step_bounded(double x_max, double v_max, double g_max, double gamma, double alpha, double mu,
                         at::ScalarType dtype);

}  // namespace lowbit::rules
