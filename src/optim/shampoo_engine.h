// One Shampoo step over many parameters, in three phases: plan which factors are due
// (begin_param_step), run their refreshes batched by kind, order and device
// (precond/factor_refresh.h) in the engine's reused workspace, then apply the grafted
// first-order updates (finish_param_step). lowbit::Shampoo, the Python binding and the
// sharded (distributed) step share it; the engine owns the loops, the factors the maths.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "linalg/workspace.h"
#include "optim/deferred_check.h"
#include "optim/shampoo_internal.h"
#include "precond/factor_refresh.h"

namespace lowbit {

// One parameter's part of a step.
struct ParamStepRef {
  at::Tensor param;
  at::Tensor grad;  // checked
  ShampooParamState* state;
  const ShampooOptions* options;
  int64_t group = 0, index = 0;  // where the parameter stands, for messages
};

class ShampooEngine {
 public:
  // The whole step of every parameter (gradients already checked).
  void step(const std::vector<ParamStepRef>& params);

  // The phases, for the sharded step, which splits the refresh work between ranks:
  // begin_param_step of every parameter, and the refresh items of those due (`mine`: the
  // factor masks of this rank, empty for all factors).
  std::vector<ParamStepPlan> plan(const std::vector<ParamStepRef>& params,
                                  const std::vector<precond::ParameterPreconditioner::FactorMask>& mine,
                                  std::vector<precond::RefreshItem>& items);
  void refresh(const std::vector<precond::RefreshItem>& items);
  void finish(const std::vector<ParamStepRef>& params, const at::Tensor& commit = {});

  // The deferred gradient check (optim/deferred_check.h), for gradient_check = "deferred"
  // (or "auto" with every parameter on a GPU). A step may be checked on the device when it
  // refreshes no factor and nothing but the gradients needs checking: every parameter has
  // stepped before (its buffers exist), is not fp16, and its group has bounded options,
  // no skip_nonfinite and is not SOAP (whose plain steps move host counters of their own).
  bool can_defer(const std::vector<ParamStepRef>& params, const std::string& gradient_check) const;
  // Such a step: the verdict and the writes stay on the device, committed under it.
  void step_deferred(const std::vector<ParamStepRef>& params);
  // Reads the verdict of deferred steps, if any (throws, naming the offender, if one failed;
  // see DeferredGradientCheck::settle); every other step, save and state dict calls it first.
  void settle(const std::string& who) { deferred_.settle(who); }
  // Forgets deferred steps whose states a load replaced.
  void discard_deferred() { deferred_.discard(); }

  const linalg::Workspace& workspace() const { return workspace_; }
  // The most bytes of temporaries one batched refresh or preconditioning pass may take (at
  // least one factor's or block's); 0: 64 MiB on a CPU, 1 GiB on a GPU (where they are
  // released after every step).
  void set_workspace_bytes(int64_t bytes) { workspace_bytes_ = bytes; }

 private:
  int64_t budget(const at::Device& device) const;
  linalg::Workspace workspace_;
  int64_t workspace_bytes_ = 0;
  DeferredGradientCheck deferred_;
};

}  // namespace lowbit
