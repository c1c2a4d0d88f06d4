// Pieces of the Shampoo optimizer shared by its source files (not public API).
#pragma once

#include <lowbit/shampoo.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "optim/adamw_rule.h"
#include "precond/parameter_preconditioner.h"

namespace lowbit {

// ShampooOptions::validate with messages starting with `prefix` + the option's name
// ("ShampooOptions." from C++, "lowbit.Shampoo: " from Python).
void validate_options(const ShampooOptions& options, const std::string& prefix);

// Names of the options that differ between a and b and decide the saved state's layout.
std::vector<std::string> structural_differences(const ShampooOptions& a, const ShampooOptions& b);
// Names of the other options that differ between a and b and go into the preconditioner
// config (stat_decay, epsilon, root_method, rectify_steps, eigen_update).
std::vector<std::string> preconditioner_differences(const ShampooOptions& a, const ShampooOptions& b);

precond::PreconditionerConfig preconditioner_config(const ShampooOptions& options,
                                                    const Shampoo::EighSolver& eigh);

// A fresh state for parameter p: step 0, and a preconditioner when p has two or more
// non-unit dimensions.
ShampooParamState make_param_state(const torch::Tensor& p, const ShampooOptions& options,
                                   const Shampoo::EighSolver& eigh);

// Checks one parameter's state read from a checkpoint against its parameter p and the
// layout `options` gives p, then completes it: first-order buffers moved to p's device
// and dtype, preconditioner built from `state.loaded_preconditioner` (which is cleared).
// `state` is a staged copy: on error it is left half-done and must be discarded. Messages
// start with `who` and name the parameter as `what` (e.g. "parameter 2 of group 0").
void install_checkpoint_state(ShampooParamState& state, const torch::Tensor& p, const ShampooOptions& options,
                              const Shampoo::EighSolver& eigh, const std::string& who, const std::string& what);

// Whether every element of t is finite (checkpoint loading; steps use the overflow rule).
bool all_finite(const torch::Tensor& t);

// Shampoo's part of the overflow rule (optim/gradient_health.h; shampoo_overflow.cpp):
// - the health::consequence key of a gradient beyond the rule: "shampoo" (p has a
//   preconditioner: the G G^T statistics), else "shampoo.adamw" / "shampoo.sgdm" (the graft);
std::string shampoo_overflow_key(const torch::Tensor& p, const ShampooOptions& options);
// - whether the options bound the update of an fp32 / bf16 parameter by
//   health::kMaxUncheckedUpdate (else, and for fp16 parameters, a step is tried first);
bool shampoo_update_bounded(const ShampooOptions& options);
// - a step of p tried on copies of its state (`state` null: a fresh one), nothing of p or
//   the state written: "" when everything stays finite, else health::overflow_problem of
//   the first tensor that would not ("values", "exp_avg_sq", ...).
std::string shampoo_trial_step(const torch::Tensor& p, const torch::Tensor& grad, const ShampooParamState* state,
                               const ShampooOptions& options, const Shampoo::EighSolver& eigh);

// One Shampoo step of one parameter (the gradient already checked): statistics every
// T1 steps, roots every T2 steps, grafted preconditioned direction, first-order update.
// Shared by lowbit::Shampoo and the Python binding. It is begin_param_step, the matrix
// work of the plan on every factor, then finish_param_step; a distributed step runs the
// same three phases with the matrix work split over ranks.
void shampoo_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& state,
                        const ShampooOptions& options);

// The matrix work a step does on a parameter's preconditioner.
struct ParamStepPlan {
  bool statistics = false;  // every T1 steps
  bool roots = false;       // every T2 steps, once preconditioning started
  bool any() const { return statistics || roots; }
};
// Advances the step counter (and the root-update count when roots are due) and says
// which matrix work this step does.
ParamStepPlan begin_param_step(ShampooParamState& state, const ShampooOptions& options);
// The plan begin_param_step will return, without advancing anything.
ParamStepPlan next_param_step(const ShampooParamState& state, const ShampooOptions& options);
// The preconditioned (once a root exists) grafted direction, applied by the first-order rule.
void finish_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& state,
                       const ShampooOptions& options);
// finish_param_step in two parts, for steps that precondition many parameters at once:
// whether this step's direction goes through the preconditioner (a root exists,
// preconditioning started, not SOAP), and the update along a given direction (the gradient
// itself, or its preconditioned form; SOAP's update reads only the gradient).
bool preconditions(const ShampooParamState& state, const ShampooOptions& options);
void apply_direction(torch::Tensor& p, const torch::Tensor& grad, const torch::Tensor& direction,
                     ShampooParamState& state, const ShampooOptions& options);

// The first-order rules applied to the (grafted) direction d; they update p in place.
void sgdm_update(torch::Tensor& p, torch::Tensor d, ShampooParamState& state, const ShampooOptions& o);
void adamw_update(torch::Tensor& p, const torch::Tensor& d, ShampooParamState& state, const ShampooOptions& o);
// SOAP (preconditioner "soap"): AdamW with m in the parameter's coordinates and v in the
// eigenbases of its preconditioner, once a basis is in use (plain AdamW before, and for
// parameters without a preconditioner).
void soap_update(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& state, const ShampooOptions& o);

// The AdamW moments' layout for p (graft_bits, min_quant_numel), and the state's moments
// as handles (created as zeros on first use; updates write through).
// Bytes of the first-order state (momentum, AdamW moments in fp32 or low-bit).
int64_t first_order_bytes(const ShampooParamState& state);
// That state's tensors (const or not, as the state is): what a step writes besides the
// parameter and its preconditioner.
template <typename State>
std::array<decltype(&std::declval<State&>().exp_avg()), 7> first_order_tensors(State& s) {
  return {&s.momentum_buffer(), &s.exp_avg(), &s.exp_avg_sq(), &s.exp_avg_codes(),
          &s.exp_avg_scales(), &s.exp_avg_sq_codes(), &s.exp_avg_sq_scales()};
}

adamw::MomentLayout graft_layout(const torch::Tensor& p, const ShampooOptions& o);
adamw::Moments graft_moments(ShampooParamState& state, const adamw::MomentLayout& layout, const torch::Tensor& p);

}  // namespace lowbit
