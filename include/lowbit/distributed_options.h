// Options and counters of lowbit's distributed mode (see lowbit/distributed.h), kept
// apart so that lowbit/shampoo.h does not pull in the torch.distributed headers.
#pragma once

#include <chrono>
#include <cstdint>

namespace lowbit {

struct DistributedOptions {
  // All-reduce (mean) the gradients inside step(). Leave off under DDP, which already has.
  bool average_gradients = false;
  // How long one collective may wait for the other ranks before the step fails.
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

// Traffic of this rank's process group caused by the optimizer.
struct CommunicationStats {
  int64_t exchanges = 0;       // steps that exchanged updated preconditioner factors
  int64_t state_bytes = 0;     // factor state broadcast in them (the sum over all owners)
  int64_t gradient_bytes = 0;  // gradients all-reduced (average_gradients)
};

}  // namespace lowbit
