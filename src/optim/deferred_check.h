// The overflow rule (optim/gradient_health.h) without a host read in every step
// (gradient_check = "deferred"; docs/shampoo.md, "Execution").
//
// A plain step (no factor refresh) computes the verdict on the gradients' device and
// commits its writes under it: a step with a NaN/Inf or overflowing gradient changes
// nothing, and so does every later step until the verdict is read ("poisoned": the steps
// after a bad one would otherwise run on counters that a run without it never had). The
// verdict is read at the next natural synchronisation point: a step that refreshes
// factors, one checked immediately, a save or state dict. If a step failed, its counters
// and those of the poisoned steps after it are rolled back, so that parameters and state
// are exactly what they were before the bad step, and the error names the step and the
// parameter, as the immediate check would have at that step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lowbit {

class ShampooParamState;

class DeferredGradientCheck {
 public:
  // What a pending step needs to roll back and to name an offender.
  struct Stepped {
    ShampooParamState* state;
    int64_t group, index;  // named "parameter <index> of group <group>"
    std::string key;       // health::consequence key
  };

  // Records one step of `stepped` (whose gradients are `grads`) and returns the 0-dim bool
  // tensor, on their device, under which the step's writes commit. Reads nothing.
  at::Tensor begin(const std::vector<at::Tensor>& grads, std::vector<Stepped> stepped);

  bool pending() const { return !steps_.empty(); }

  // Reads the verdict of the pending steps (one device read). All good: forgets them. A bad
  // one: rolls the step counters of it and of every later pending step back, forgets them
  // and throws c10::Error (`who`: "lowbit::Shampoo" or "lowbit.Shampoo").
  void settle(const std::string& who);

  // Forgets the pending steps without reading them (their states were replaced by a load).
  void discard();

 private:
  at::Tensor poisoned_;  // bool: a pending step had a bad gradient
  at::Tensor first_;     // fp64 [3]: that step's position, its offender's position, squared norm
  std::vector<std::vector<Stepped>> steps_;
};

}  // namespace lowbit
