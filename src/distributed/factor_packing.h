// The state of Kronecker factors as one byte buffer, and back. The layout is each
// factor's own save() entries in key order: factors of the same kind and order have the
// same entries, so a rank knows the layout of another rank's factors from its own copies
// and only the bytes travel.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "precond/kronecker_factor.h"

namespace lowbit::distributed {

int64_t packed_bytes(const precond::KroneckerFactor& factor);
// Bytes of the buffer pack_factors makes of these factors.
int64_t packed_bytes(const std::vector<precond::KroneckerFactor*>& factors);
// uint8 tensor on the factors' device holding their states one after the other.
at::Tensor pack_factors(const std::vector<const precond::KroneckerFactor*>& factors);
// Loads the states in `buffer` (as pack_factors wrote them) into `factors`; checks the
// size first, so a buffer of the wrong layout changes nothing.
void unpack_factors(const at::Tensor& buffer, const std::vector<precond::KroneckerFactor*>& factors);

}  // namespace lowbit::distributed
