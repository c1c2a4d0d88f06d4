// The exact allocation: the Pareto frontier of (bytes, Omega) over the layers.
#include <lowbit/hawq.h>

#include <c10/util/Exception.h>

#include <algorithm>

namespace lowbit::hawq {

std::vector<Choice> pareto_frontier(const std::vector<std::vector<int64_t>>& costs,
                                    const std::vector<std::vector<double>>& omegas, int64_t budget) {
  TORCH_CHECK(costs.size() == omegas.size(), "hawq::pareto_frontier: costs has ", costs.size(),
              " layers but omegas has ", omegas.size());
  std::vector<Choice> frontier{Choice{}};
  for (size_t i = 0; i < costs.size(); ++i) {
    TORCH_CHECK(!costs[i].empty() && costs[i].size() == omegas[i].size(), "hawq::pareto_frontier: layer ", i,
                " needs as many costs as omegas, and at least one (got ", costs[i].size(), " and ", omegas[i].size(),
                ")");
    std::vector<Choice> candidates;
    for (const Choice& c : frontier)
      for (size_t j = 0; j < costs[i].size(); ++j) {
        const int64_t bytes = c.bytes + costs[i][j];
        if (budget >= 0 && bytes > budget) continue;  // costs are >= 0: it cannot come back
        Choice next{bytes, c.omega + omegas[i][j], c.option};
        next.option.push_back(static_cast<int>(j));
        candidates.push_back(std::move(next));
      }
    std::stable_sort(candidates.begin(), candidates.end(), [](const Choice& a, const Choice& b) {
      return a.bytes != b.bytes ? a.bytes < b.bytes : a.omega < b.omega;
    });
    frontier.clear();
    for (Choice& c : candidates)
      if (frontier.empty() || c.omega < frontier.back().omega) frontier.push_back(std::move(c));
  }
  return frontier;
}

Choice best_choice(const std::vector<std::vector<int64_t>>& costs, const std::vector<std::vector<double>>& omegas,
                   int64_t budget) {
  TORCH_CHECK(budget >= 0, "hawq: the budget must be >= 0 bytes; got ", budget);
  std::vector<Choice> frontier = pareto_frontier(costs, omegas, budget);
  if (frontier.empty()) {
    int64_t smallest = 0;
    for (const auto& c : costs) smallest += *std::min_element(c.begin(), c.end());
    TORCH_CHECK(false, "hawq: budget ", budget, " bytes is below the smallest possible size, ", smallest, " bytes");
  }
  return frontier.back();
}

}  // namespace lowbit::hawq
