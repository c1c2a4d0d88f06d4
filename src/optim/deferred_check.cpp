#include "optim/deferred_check.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <lowbit/shampoo.h>

#include "optim/gradient_health.h"

namespace lowbit {

at::Tensor DeferredGradientCheck::begin(const std::vector<at::Tensor>& grads, std::vector<Stepped> stepped) {
  const at::Tensor norms = health::squared_norms(grads);
  const at::Tensor bad = norms.isfinite().logical_and_(norms.le(health::kMaxGradientSquaredNorm)).logical_not_();
  const at::Tensor any_bad = bad.any();
  if (!poisoned_.defined()) {
    poisoned_ = at::zeros({}, any_bad.options());
    first_ = at::zeros({3}, norms.options());
  }
  // The first bad step's record: its position among the pending steps, the position of its
  // first offending gradient (argmax finds the first true) and that gradient's squared norm.
  const at::Tensor offender = bad.to(at::kByte).argmax();
  const at::Tensor record = at::stack({at::full({}, static_cast<double>(steps_.size()), norms.options()),
                                       offender.to(at::kDouble), norms.index_select(0, offender.view({1})).squeeze(0)});
  first_ = at::where(poisoned_.logical_not().logical_and(any_bad), record, first_);
  poisoned_ = poisoned_.logical_or(any_bad);
  steps_.push_back(std::move(stepped));
  return poisoned_.logical_not();
}

void DeferredGradientCheck::settle(const std::string& who) {
  if (steps_.empty()) return;
  // The one read of the device for all pending steps.
  RECORD_FUNCTION("lowbit::read_to_host", std::vector<c10::IValue>());
  const at::Tensor host = at::cat({poisoned_.to(at::kDouble).view({1}), first_}).to(at::kCPU).contiguous();
  const double* values = host.data_ptr<double>();
  std::vector<std::vector<Stepped>> steps = std::move(steps_);
  discard();
  if (values[0] == 0.0) return;
  const auto first = static_cast<size_t>(values[1]);
  const Stepped& offender = steps[first][static_cast<size_t>(values[2])];
  // The bad step and every later pending step changed nothing on the device: their counters
  // go back, so that the state is what it was before the bad step.
  for (size_t k = first; k < steps.size(); ++k)
    for (const Stepped& s : steps[k]) s.state->step(s.state->step() - 1);
  const size_t later = steps.size() - 1 - first;
  const std::string name = "parameter " + std::to_string(offender.index) + " of group " + std::to_string(offender.group);
  TORCH_CHECK(false, who, ": ", health::offence_message(name, health::consequence(offender.key), values[3]),
              " (found by the deferred gradient check ", later, " step", later == 1 ? "" : "s",
              " later); nothing was updated by that step or since: parameters and state are as they were "
              "before it (gradient_check=\"immediate\" raises in the step itself)");
}

void DeferredGradientCheck::discard() {
  steps_.clear();
  poisoned_ = at::Tensor();
  first_ = at::Tensor();
}

}  // namespace lowbit
