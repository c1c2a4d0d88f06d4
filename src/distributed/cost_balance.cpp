#include "distributed/cost_balance.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>

namespace lowbit::distributed {

std::vector<int> balance_by_cost(const std::vector<double>& costs, int world_size) {
  TORCH_CHECK(world_size >= 1, "balance_by_cost: world_size must be >= 1; got ", world_size);
  std::vector<size_t> order(costs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  // Stable: equal costs keep their index order, which every rank sees the same way.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return costs[a] > costs[b]; });
  std::vector<double> load(static_cast<size_t>(world_size), 0.0);
  std::vector<int> owner(costs.size(), 0);
  for (size_t item : order) {
    const auto least = std::min_element(load.begin(), load.end());  // first minimum: lowest rank
    owner[item] = static_cast<int>(least - load.begin());
    *least += costs[item];
  }
  return owner;
}

}  // namespace lowbit::distributed
