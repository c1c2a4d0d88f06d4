// Round trips of the codec over shapes x bits x mappings, checked element by element
// against the dense reference in codec_reference.h.
#include <gtest/gtest.h>

#include <tuple>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include "codec_reference.h"

namespace lowbit {
namespace {

using testing::Dense;

using Shape = std::pair<int64_t, int64_t>;
using Case = std::tuple<Shape, int, Mapping>;

class RoundTrip : public ::testing::TestWithParam<Case> {};

TEST_P(RoundTrip, NearestCodeTimesBlockScaleWithinHalfGap) {
  const auto [shape, bits, mapping] = GetParam();
  const auto [rows, cols] = shape;
  QuantOptions options;
  options.bits = bits;
  options.mapping = mapping;
  const at::Tensor m = testing::varied_matrix(rows, cols, 1000 * rows + cols);
  const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
  const Dense x(m), y(q.dequantize());
  const std::vector<float> codes = codebook_values(mapping, bits);
  const double bound = max_rounding_error(codes);
  const std::vector<float> absmax = testing::reference_absmax(x, options.block_size, false);
  const std::vector<int> idx = testing::read_bitstream_codes(q.codes(), bits, cols);
  const Dense scales(q.scales());
  const int64_t blocks = blocks_per_row(cols, options.block_size);

  ASSERT_EQ(q.scales().size(1), blocks);
  int64_t failures = 0;
  for (int64_t r = 0; r < rows && failures < 5; ++r)
    for (int64_t c = 0; c < cols && failures < 5; ++c) {
      const float s = absmax[r * blocks + c / options.block_size];
      const float stored_scale = scales(r, c / options.block_size);
      const int k = idx[r * cols + c];
      bool ok = stored_scale == s;                                       // scale is the absmax
      ok = ok && y(r, c) == codes[k] * s;                                // value = code * scale
      ok = ok && testing::abs_diff(x(r, c), y(r, c)) <= testing::error_bound(s, bound); // error bound
      if (s > 0) {  // nearest code, except within float rounding of a tie
        // The codec compares x with fl(fl(c_k + c_k+1) / 2 * s): the midpoint sum and the
        // product each round by <= 2^-24 relative, i.e. <= 2^-24 in units of t = x / s each
        // (|midpoint| <= 1), so it can pick the other neighbour only within 2^-23 of a tie.
        const double t = static_cast<double>(x(r, c)) / s;
        ok = ok && (k == testing::nearest_code(codes, t) ||
                    testing::distance_to_midpoint(codes, t) <= 0x1p-23);
      } else {
        ok = ok && codes[k] == 0.f;  // an all-zero block stores the zero code
      }
      if (!ok) {
        ++failures;
        ADD_FAILURE() << "element [" << r << ", " << c << "] x=" << x(r, c) << " y=" << y(r, c)
                      << " scale=" << stored_scale << " (absmax " << s << ") code " << k;
      }
    }

  // Storage at the real bit width, from the layout formula written out here.
  const int64_t expected = rows * ((cols * bits + 7) / 8) + 4 * rows * blocks;
  EXPECT_EQ(q.nbytes(), expected);
  EXPECT_EQ(QuantizedMatrix::storage_bytes(rows, cols, options), expected);
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto& [shape, bits, mapping] = info.param;
  return std::to_string(shape.first) + "x" + std::to_string(shape.second) + "_" +
         std::to_string(bits) + "bit_" + to_string(mapping);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RoundTrip,
    ::testing::Combine(::testing::Values(Shape{1, 1}, Shape{1, 63}, Shape{63, 65}, Shape{65, 64},
                                         Shape{1057, 1057}, Shape{1201, 7}),
                       ::testing::Values(3, 4, 8),
                       ::testing::Values(Mapping::Linear2, Mapping::DynamicTree, Mapping::Linear)),
    case_name);

TEST(RoundTripBlockSizes, EveryAllowedBlockSizeHasOneScalePerRowChunk) {
  const at::Tensor m = testing::varied_matrix(5, 4100, 7);
  const Dense x(m);
  for (int64_t bs = kMinBlockSize; bs <= kMaxBlockSize; bs *= 2) {
    QuantOptions options;
    options.block_size = bs;
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
    const std::vector<float> absmax = testing::reference_absmax(x, bs, false);
    const Dense scales(q.scales()), y(q.dequantize());
    const int64_t blocks = (4100 + bs - 1) / bs;
    ASSERT_EQ(q.scales().sizes(), at::IntArrayRef({5, blocks})) << "block " << bs;
    const double bound = max_rounding_error(codebook_values(options.mapping, options.bits));
    double worst = 0;
    for (int64_t r = 0; r < 5; ++r)
      for (int64_t c = 0; c < 4100; ++c) {
        const float s = absmax[r * blocks + c / bs];
        EXPECT_EQ(scales(r, c / bs), s);
        if (s > 0) worst = std::max(worst, testing::abs_diff(x(r, c), y(r, c)) / testing::error_bound(s, bound));
      }
    EXPECT_LE(worst, 1.0) << "block " << bs;
  }
}

TEST(RoundTripPacking, OddOrdersDoNotShareBytesBetweenRows) {
  // Quantizing rows one at a time must give exactly the rows of the whole matrix: no
  // row's codes may spill into its neighbour's bytes, whatever the order's parity.
  for (int bits : {3, 4, 8}) {
    QuantOptions options;
    options.bits = bits;
    const at::Tensor m = testing::varied_matrix(9, 1057, 3);
    const QuantizedMatrix whole = QuantizedMatrix::quantize(m, options);
    for (int64_t r = 0; r < 9; ++r) {
      const QuantizedMatrix row = QuantizedMatrix::quantize(m.slice(0, r, r + 1), options);
      EXPECT_TRUE(at::equal(row.codes()[0], whole.codes()[r])) << bits << " bits, row " << r;
    }
  }
}

}  // namespace
}  // namespace lowbit
