// Pieces of the Shampoo optimizer shared by its source files (not public API).
#pragma once

#include <lowbit/shampoo.h>

#include <string>
#include <vector>

#include "precond/parameter_preconditioner.h"

namespace lowbit {

// Names of the options that differ between a and b and decide the saved state's layout.
std::vector<std::string> structural_differences(const ShampooOptions& a, const ShampooOptions& b);

precond::PreconditionerConfig preconditioner_config(const ShampooOptions& options,
                                                    const Shampoo::EighSolver& eigh);

// A fresh state for parameter p: step 0, and a preconditioner when p has two or more
// non-unit dimensions.
ShampooParamState make_param_state(const torch::Tensor& p, const ShampooOptions& options,
                                   const Shampoo::EighSolver& eigh);

// One Shampoo step of one parameter (the gradient already checked): statistics every
// T1 steps, roots every T2 steps, grafted preconditioned direction, first-order update.
// Shared by lowbit::Shampoo and the Python binding.
void shampoo_param_step(torch::Tensor& p, const torch::Tensor& grad, ShampooParamState& state,
                        const ShampooOptions& options);

// The first-order rules applied to the (grafted) direction d; they update p in place.
void sgdm_update(torch::Tensor& p, torch::Tensor d, ShampooParamState& state, const ShampooOptions& o);
void adamw_update(torch::Tensor& p, const torch::Tensor& d, ShampooParamState& state, const ShampooOptions& o);

}  // namespace lowbit
