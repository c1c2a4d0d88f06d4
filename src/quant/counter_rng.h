// Counter-based uniform numbers for stochastic rounding: a pure function of
// (seed, element index), so results do not depend on threads, backend or call order.
#pragma once

#include <cstdint>

#include "quant/host_device.h"

namespace lowbit {

// SplitMix64's finaliser applied to seed and index: a well-mixed 64-bit value.
LOWBIT_HOST_DEVICE uint64_t mix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
LOWBIT_HOST_DEVICE float uniform01(uint64_t seed, uint64_t index) {
  return static_cast<float>(mix64(seed, index) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace lowbit
