#include "distributed/sharded_step.h"

#include <ATen/ATen.h>

#include "distributed/cost_balance.h"
#include "distributed/factor_packing.h"

namespace lowbit::distributed {
namespace {

// A factor due for work this step.
struct DueFactor {
  size_t param;    // index into the step's parameters
  int64_t factor;  // index inside that parameter's preconditioner
};

}  // namespace

void sharded_shampoo_step(const std::vector<ParamStepRef>& params, Communicator& comm, ShampooEngine& engine) {
  // Which factors are due: the plan of every parameter, made without work items first
  // (the masks of this rank's share depend on it).
  std::vector<ParamStepPlan> plans;
  std::vector<DueFactor> due;
  std::vector<double> costs;
  for (size_t i = 0; i < params.size(); ++i) {
    plans.push_back(begin_param_step(*params[i].state, *params[i].options));
    if (!plans.back().any()) continue;
    precond::ParameterPreconditioner& pre = *params[i].state->preconditioner;
    for (int64_t f = 0; f < pre.factor_count(); ++f) {
      due.push_back({i, f});
      const double order = static_cast<double>(pre.factor(f).order());
      costs.push_back(order * order * order);  // eigendecompositions and matmuls: ~n^3
    }
  }
  const std::vector<int> owner = balance_by_cost(costs, comm.world_size());

  // This rank's share of the matrix work.
  std::vector<precond::ParameterPreconditioner::FactorMask> mine(params.size());
  for (size_t d = 0; d < due.size(); ++d) {
    auto& mask = mine[due[d].param];
    if (mask.empty()) mask.assign(static_cast<size_t>(params[due[d].param].state->preconditioner->factor_count()), false);
    mask[static_cast<size_t>(due[d].factor)] = owner[d] == comm.rank();
  }
  std::vector<precond::RefreshItem> items;
  for (size_t i = 0; i < params.size(); ++i)
    if (plans[i].any())
      params[i].state->preconditioner->plan_refresh(params[i].grad, plans[i].statistics, plans[i].roots, mine[i], items);
  engine.refresh(items);

  // Every owner sends its updated factors, in their stored (quantized) form.
  const bool exchange = !due.empty() && comm.world_size() > 1;
  if (exchange) comm.stats().exchanges += 1;
  for (int root = 0; exchange && root < comm.world_size(); ++root) {
    std::vector<precond::KroneckerFactor*> sent;
    for (size_t d = 0; d < due.size(); ++d)
      if (owner[d] == root) sent.push_back(&params[due[d].param].state->preconditioner->factor(due[d].factor));
    if (sent.empty()) continue;
    at::Tensor buffer = root == comm.rank()
                            ? pack_factors({sent.begin(), sent.end()})
                            : at::empty({packed_bytes(sent)}, params[due.front().param].param.options().dtype(at::kByte));
    comm.broadcast(buffer, root);
    if (root != comm.rank()) unpack_factors(buffer, sent);
  }

  engine.finish(params);
}

}  // namespace lowbit::distributed
