// Bit packing of code indices inside one row. A block starts at a column that is a
// multiple of 16, so at every width it starts on a byte boundary and blocks of one
// row never share a byte; rows never share bytes either (each row has its own bytes).
#pragma once

#include <cstdint>
#include <cstring>

#include "quant/host_device.h"

namespace lowbit::packing {

// Packs n indices (each < 2^bits) into ceil(n * bits / 8) bytes.
//  8 bits: one per byte. 4 bits: index 2j in the low nibble of byte j.
//  3 bits: index k in bits 3k..3k+2 of a little-endian bit stream (8 indices -> 3 bytes).
template <int Bits>
LOWBIT_HOST_DEVICE void pack(const uint8_t* __restrict__ idx, int64_t n, uint8_t* __restrict__ out) {
  if constexpr (Bits == 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = idx[i];
  } else if constexpr (Bits == 4) {
    const int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; ++j)
      out[j] = static_cast<uint8_t>(idx[2 * j] | (idx[2 * j + 1] << 4));
    if (n & 1) out[pairs] = idx[n - 1];
  } else {
    static_assert(Bits == 3, "packing supports 3, 4 and 8 bits");
    const int64_t groups = n / 8;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* s = idx + 8 * g;
      uint32_t word = 0;
      for (int k = 0; k < 8; ++k) word |= static_cast<uint32_t>(s[k]) << (3 * k);
      out[3 * g] = static_cast<uint8_t>(word);
      out[3 * g + 1] = static_cast<uint8_t>(word >> 8);
      out[3 * g + 2] = static_cast<uint8_t>(word >> 16);
    }
    const int64_t rest = n - 8 * groups;
    if (rest > 0) {
      uint32_t word = 0;
      for (int64_t k = 0; k < rest; ++k) word |= static_cast<uint32_t>(idx[8 * groups + k]) << (3 * k);
      const int64_t bytes = (3 * rest + 7) / 8;
      for (int64_t b = 0; b < bytes; ++b) out[3 * groups + b] = static_cast<uint8_t>(word >> (8 * b));
    }
  }
}

// The inverse of pack: n indices from ceil(n * bits / 8) bytes.
template <int Bits>
LOWBIT_HOST_DEVICE void unpack(const uint8_t* __restrict__ in, int64_t n, uint8_t* __restrict__ idx) {
  if constexpr (Bits == 8) {
    for (int64_t i = 0; i < n; ++i) idx[i] = in[i];
  } else if constexpr (Bits == 4) {
    const int64_t pairs = n / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      idx[2 * j] = in[j] & 0xF;
      idx[2 * j + 1] = in[j] >> 4;
    }
    if (n & 1) idx[n - 1] = in[pairs] & 0xF;
  } else {
    static_assert(Bits == 3, "packing supports 3, 4 and 8 bits");
    const int64_t groups = (n + 7) / 8;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t count = (n - 8 * g < 8) ? n - 8 * g : 8;
      const int64_t bytes = (3 * count + 7) / 8;
      uint32_t word = 0;
      for (int64_t b = 0; b < bytes; ++b) word |= static_cast<uint32_t>(in[3 * g + b]) << (8 * b);
      for (int64_t k = 0; k < count; ++k) idx[8 * g + k] = (word >> (3 * k)) & 0x7;
    }
  }
}

}  // namespace lowbit::packing
