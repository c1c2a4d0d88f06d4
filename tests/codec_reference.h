// Independent reference computations for the codec tests: plain loops over a dense
// matrix, written without any of the library's kernels or packing helpers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lowbit::testing {

// A dense row-major float copy of a 2-D tensor.
struct Dense {
  int64_t rows = 0, cols = 0;
  std::vector<float> v;
  explicit Dense(const at::Tensor& t) : rows(t.size(0)), cols(t.size(1)) {
    const at::Tensor f = t.to(at::kFloat).contiguous();
    v.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  }
  float operator()(int64_t r, int64_t c) const { return v[r * cols + c]; }
};

// absmax of every block of `block_size` elements of a row, optionally ignoring the diagonal.
inline std::vector<float> reference_absmax(const Dense& m, int64_t block_size, bool skip_diagonal) {
  const int64_t blocks = (m.cols + block_size - 1) / block_size;
  std::vector<float> out(m.rows * blocks, 0.f);
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) {
      if (skip_diagonal && r == c) continue;
      float& s = out[r * blocks + c / block_size];
      s = std::max(s, std::fabs(m(r, c)));
    }
  return out;
}

// Reads code k of a row as bits [bits*k, bits*k + bits) of a little-endian bit stream.
inline std::vector<int> read_bitstream_codes(const at::Tensor& codes, int bits, int64_t cols) {
  const at::Tensor c = codes.contiguous();
  const int64_t rows = c.size(0), row_bytes = c.size(1);
  const uint8_t* p = c.data_ptr<uint8_t>();
  std::vector<int> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      int value = 0;
      for (int i = 0; i < bits; ++i) {
        const int64_t bit = bits * k + i;
        value |= ((p[r * row_bytes + bit / 8] >> (bit % 8)) & 1) << i;
      }
      out[r * cols + k] = value;
    }
  return out;
}

// Index of the code nearest to x (brute force, in double).
inline int nearest_code(const std::vector<float>& codes, double x) {
  int best = 0;
  for (int k = 1; k < static_cast<int>(codes.size()); ++k)
    if (std::fabs(x - codes[k]) < std::fabs(x - codes[best])) best = k;
  return best;
}

// Distance from x to the nearest midpoint between neighbouring codes (ties live there).
inline double distance_to_midpoint(const std::vector<float>& codes, double x) {
  double d = 1e300;
  for (size_t k = 0; k + 1 < codes.size(); ++k)
    d = std::min(d, std::fabs(x - (static_cast<double>(codes[k]) + codes[k + 1]) / 2));
  return d;
}

// The worst error allowed for an element of a block with scale `scale` when the code
// itself may be `code_error` away (in normalized units): the dequantized value fl(code *
// scale) adds at most scale * 2^-24 of float rounding; 2^-23 leaves room for the test's own.
inline double error_bound(double scale, double code_error) { return scale * (code_error + 0x1p-23); }

// |a - b| in double, so the test adds no rounding of its own.
inline double abs_diff(float a, float b) { return std::fabs(static_cast<double>(a) - b); }

// Largest gap between neighbouring codes.
inline double max_gap(const std::vector<float>& codes) {
  double g = 0;
  for (size_t k = 0; k + 1 < codes.size(); ++k) g = std::max(g, double(codes[k + 1]) - codes[k]);
  return g;
}

// A test matrix whose rows have very different magnitudes (scales from 1e-3 to 1e2),
// with one all-zero row when there are at least three rows.
inline at::Tensor varied_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor m = at::randn({rows, cols});
  at::Tensor row_scale = at::pow(10.0, at::linspace(-3, 2, rows)).unsqueeze(1);
  m = m * row_scale;
  if (rows >= 3) m[1].zero_();
  return m;
}

}  // namespace lowbit::testing
