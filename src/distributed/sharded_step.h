// One Shampoo step of many parameters with the matrix work split over the ranks of a
// process group (see lowbit/distributed.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "distributed/communicator.h"
#include "optim/shampoo_engine.h"

namespace lowbit::distributed {

// The engine's step with its refresh phase split over the ranks (gradients identical on
// every rank): begin_param_step for every parameter; each factor due for work is updated
// by the one rank it is assigned to (batched there like a local step's); the updated
// factors are broadcast from their owners; then finish_param_step for every parameter.
// Parameters end bit-identical on every rank.
void sharded_shampoo_step(const std::vector<ParamStepRef>& params, Communicator& comm, ShampooEngine& engine);

}  // namespace lowbit::distributed
