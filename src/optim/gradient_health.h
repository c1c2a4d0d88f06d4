// The one rule every lowbit optimizer applies before it writes anything (tracker issue 17):
// a step whose gradients could make a statistic, moment, Hessian estimate or parameter
// non-finite is refused (or skipped), and the optimizer is left exactly as it was.
//
// 1. Gradients (pre-check). Every fp32 quantity the optimizers form from a gradient G is
//    bounded by ||G||_F^2 times a factor of at most 2^24:
//    - Shampoo's statistics: L = E[G G^T] is an exponential moving average, a convex
//      combination of PSD matrices, so lambda_max(L) <= max lambda_max(G G^T)
//      = max ||G||_2^2 <= ||G||_F^2; every entry of L is at most lambda_max(L).
//    - Adam's v is an EMA of g*g, so v <= max g^2 <= ||G||_F^2; m <= ||G||_F.
//    - A product of n x n matrices of such entries sums n <= 2^24 terms (the Frobenius norm
//      of L G, of the root applied to G, ...).
//    FLT_MAX is about 2^128, so ||G||_F^2 <= 2^104 keeps all of them finite (2^104 * 2^24
//    = 2^128 minus the rounding). bf16 has fp32's exponent range; fp64 more. A real training
//    gradient is many orders below: ||G||_F <= 2^52, about 4.5e15.
//    A NaN or Inf gradient has a NaN or Inf squared norm, so one test finds both.
// 2. Quantities not bounded by the gradient (Hessian estimates from autograd, M-FAC's
//    inverse-Fisher direction, NAG-GS's velocity, fp16 parameters and the state kept in
//    their dtype) are checked before they are stored: Hessian estimates obey rule 1 as if
//    they were gradients; the others are bounded from the options (and, for NAG-GS, from the
//    largest magnitudes of the state), and where no bound holds the step of that parameter
//    is first tried on copies (trial_update) and refused if a copy came out non-finite.
//    Eigendecompositions and roots keep their last good value on failure (precond/).
//
// The check is split in two so that a device need not wait for the host per parameter:
// squared_norms() launches one computation for all gradients and returns one fp64 tensor
// on their device; first_offence() reads it, once per step, and decides.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lowbit::health {

// The largest squared Frobenius norm a gradient (or a Hessian estimate) may have: 2^104,
// about 2.03e31 (derivation above).
constexpr double kMaxGradientSquaredNorm = 0x1p104;

// The largest parameter change the optimizers may apply without checking the result: a
// finite fp32 or bf16 value changed by at most 2^101 rounds to a finite value, because half
// an ulp at the largest finite value (2^103 for fp32, 2^119 for bf16) is larger. (2^101, not
// 2^102: some rules add two such terms, e.g. AdaHessian's update and its weight decay.)
// fp16 parameters have no such margin (65504 is their largest value): their steps are
// always tried on copies first.
constexpr double kMaxUncheckedUpdate = 0x1p101;

// The squared Frobenius norm of every tensor, reduced in fp64 (no fp32, bf16 or fp16 input
// can overflow it: at most numel * 1.2e77; relative error a few 1e-16, from the sum, the
// square root linalg_vector_norm takes and the square), as one [n] fp64 tensor on the
// tensors' device (CPU when there are none).
// An entry is NaN or Inf when its tensor holds a NaN or an Inf (or an fp64 tensor's norm
// overflows fp64). Launches the reductions; reads nothing back.
at::Tensor squared_norms(at::TensorList tensors);

// The first entry of a squared_norms() tensor that is not finite or exceeds `limit`.
struct Offence {
  int64_t index = -1;          // -1: none
  double squared_norm = 0.0;   // its value (NaN or Inf for a non-finite tensor)
  bool found() const { return index >= 0; }
  bool nonfinite() const;      // a NaN or Inf element, rather than a too large norm
};
// Reads `squared_norms` to the host (the step's one synchronisation) and decides.
Offence first_offence(const at::Tensor& squared_norms, double limit = kMaxGradientSquaredNorm);

// What a gradient (or Hessian estimate) beyond the rule would overflow in each optimizer, by
// key, so that C++ and Python say the same: the `noun` checked and the message's `tail`.
//   "shampoo" (a preconditioned parameter), "shampoo.adamw", "shampoo.sgdm" (a parameter the
//   graft alone steps), "adamw", "sophia", "sophia.gnb" (update_hessian's gradients),
//   "sophia.gnb_estimate", "sophia.hutchinson", "adahessian", "adahessian.hutchinson",
//   "mfac", "nag_gs".
struct Consequence {
  const char* noun;  // "gradient", "Hutchinson Hessian estimate u*(Hu)", ...
  const char* tail;  // "the G G^T statistics would overflow fp32"
};
const Consequence& consequence(const std::string& key);

// The message for an offence of parameter `what` ("parameter 2 of group 0"):
//   "<what> has a NaN or Inf <noun>"
//   "<what>: its <noun>'s squared norm 7.68e+53 exceeds 2^104 (2.03e+31): <tail>"
std::string offence_message(const std::string& what, const Consequence& consequence, double squared_norm);

// The largest finite value of a floating dtype (65504 for fp16).
double largest_finite(at::ScalarType dtype);

// Whether a parameter of this dtype gets no unchecked update (fp16; see kMaxUncheckedUpdate).
bool reduced_range(at::ScalarType dtype);

// The largest magnitude of every tensor, as one [n] fp64 tensor on the tensors' device (NaN
// for a tensor holding NaN). For bounds on state the gradient does not bound (NAG-GS).
at::Tensor max_magnitudes(at::TensorList tensors);

// Runs `update` on copies of `writes` (the tensors the update writes in place; undefined
// ones stay undefined, and the update may define them) and reports the first floating copy
// that is not finite afterwards. The originals are untouched. Costs a copy of those tensors
// and the update's arithmetic, once; used only where no bound guarantees the update (fp16
// parameters, extreme options), one parameter at a time, before anything is written.
struct Trial {
  int64_t index = -1;                   // -1: every copy finite
  at::ScalarType dtype = at::kFloat;    // the offending copy's
  bool failed() const { return index >= 0; }
};
Trial trial_update(const std::vector<at::Tensor>& writes,
                   const std::function<void(std::vector<at::Tensor>& copies)>& update);

// "this step would make its <tensor> non-finite (<dtype>, largest finite value <max>)":
// overflow, or NaN (0 / 0 where a small fp16 eps rounds to 0).
std::string overflow_problem(const std::string& tensor, at::ScalarType dtype);

}  // namespace lowbit::health
