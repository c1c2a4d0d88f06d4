// Distributed Shampoo for Python: torch.classes.lowbit.ShampooSharding wraps a
// torch.distributed process group (passed as `group.boxed()`) and runs the step of every
// parameter of the optimizer with the matrix work split over its ranks (lowbit/distributed.h).
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "bindings/shampoo_param.h"
#include "distributed/communicator.h"
#include "distributed/sharded_step.h"

namespace lowbit::bindings {
namespace {

class ShampooSharding : public torch::CustomClassHolder {
 public:
  ShampooSharding(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool average_gradients, double timeout_s)
      : comm_(group, options(average_gradients, timeout_s)) {}

  // Mean over the ranks, in place (for the optimizer's own gradient averaging).
  void average(const std::vector<at::Tensor>& tensors) { comm_.average(tensors); }

  // One step of every (parameter, gradient) pair of the optimizer, each with its group's config.
  void step(const std::vector<c10::intrusive_ptr<ShampooConfig>>& configs,
            const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
            const std::vector<at::Tensor>& grads) {
    TORCH_CHECK(configs.size() == states.size() && states.size() == params.size() && params.size() == grads.size(),
                kWho, "the sharded step needs as many configs, states, parameters and gradients; got ",
                configs.size(), ", ", states.size(), ", ", params.size(), " and ", grads.size());
    std::vector<ParamStepRef> refs;
    for (size_t i = 0; i < states.size(); ++i)
      refs.push_back({params[i], grads[i], &states[i]->prepare(params[i], configs[i]), &configs[i]->options});
    at::NoGradGuard no_grad;
    distributed::sharded_shampoo_step(refs, comm_, engine_);
  }

  int64_t rank() const { return comm_.rank(); }
  int64_t world_size() const { return comm_.world_size(); }
  // (exchanges, state bytes, gradient bytes) sent through the group so far.
  std::tuple<int64_t, int64_t, int64_t> traffic() const {
    const CommunicationStats& s = comm_.stats();
    return {s.exchanges, s.state_bytes, s.gradient_bytes};
  }

 private:
  static DistributedOptions options(bool average_gradients, double timeout_s) {
    TORCH_CHECK(timeout_s > 0, kWho, "timeout must be > 0 seconds; got ", timeout_s);
    DistributedOptions o;
    o.average_gradients = average_gradients;
    o.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    return o;
  }
  distributed::Communicator comm_;
  ShampooEngine engine_;
};

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using lowbit::bindings::ShampooSharding;
  m.class_<ShampooSharding>("ShampooSharding")
      .def(torch::init<c10::intrusive_ptr<c10d::ProcessGroup>, bool, double>())
      .def("average", &ShampooSharding::average)
      .def("step", &ShampooSharding::step)
      .def("rank", &ShampooSharding::rank)
      .def("world_size", &ShampooSharding::world_size)
      .def("traffic", &ShampooSharding::traffic);
}
