// One Shampoo step of many parameters with the matrix work split over the ranks of a
// process group (see lowbit/distributed.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "distributed/communicator.h"
#include "optim/shampoo_internal.h"

namespace lowbit::distributed {

struct ParamStepRef {
  at::Tensor param;
  at::Tensor grad;  // checked, and identical on every rank
  ShampooParamState* state;
  const ShampooOptions* options;
};

// begin_param_step for every parameter; each factor due for work is updated by the one
// rank it is assigned to; the updated factors are broadcast from their owners; then
// finish_param_step for every parameter. Parameters end bit-identical on every rank.
void sharded_shampoo_step(const std::vector<ParamStepRef>& params, Communicator& comm);

}  // namespace lowbit::distributed
