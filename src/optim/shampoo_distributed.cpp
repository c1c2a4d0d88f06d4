// lowbit::Shampoo's distributed mode (lowbit/distributed.h).
#include <lowbit/distributed.h>
#include <lowbit/shampoo.h>

#include "distributed/communicator.h"
#include "distributed/sharded_step.h"
#include "optim/shampoo_engine.h"
#include "optim/shampoo_internal.h"

namespace lowbit {

void Shampoo::distribute(const c10::intrusive_ptr<c10d::ProcessGroup>& group, DistributedOptions options) {
  TORCH_CHECK(state().empty(), "lowbit::Shampoo::distribute must be called before the first step");
  communicator_ = std::make_shared<distributed::Communicator>(group, options);
}

CommunicationStats Shampoo::communication() const {
  return communicator_ ? communicator_->stats() : CommunicationStats{};
}

void Shampoo::distributed_step() {
  if (communicator_->options().average_gradients) {
    std::vector<torch::Tensor> grads;
    for (const auto& group : param_groups())
      for (const auto& p : group.params())
        if (p.grad().defined()) grads.push_back(p.grad());
    communicator_->average(grads);
  }
  // Gradients are equal on every rank now, so every rank takes the same decision here.
  if (!accepts_step()) {
    ++skipped_steps_;
    return;
  }
  std::vector<ParamStepRef> refs;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const ShampooOptions&>(group.options());
    for (auto& p : group.params())
      if (p.grad().defined()) refs.push_back({p, p.grad(), &state_for(p, o), &o});
  }
  distributed::sharded_shampoo_step(refs, *communicator_, *engine_);
}

}  // namespace lowbit
