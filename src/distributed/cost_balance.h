// Which rank does which piece of matrix work.
#pragma once

#include <vector>

namespace lowbit::distributed {

// Assigns items of the given costs to ranks 0..world_size-1: the most expensive first,
// each to the rank with the least work so far (ties: the lowest rank). Deterministic, so
// every rank computes the same assignment without talking to the others.
std::vector<int> balance_by_cost(const std::vector<double>& costs, int world_size);

}  // namespace lowbit::distributed
