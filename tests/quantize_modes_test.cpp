// Diagonal mode, double-quantized scales, stochastic rounding, dtypes and the torch ops.
#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include "codec_reference.h"

namespace lowbit {
namespace {

using testing::Dense;

TEST(DiagonalMode, DiagonalIsExactAndExcludedFromTheScales) {
  for (int64_t n : {1, 65, 1057}) {
    at::manual_seed(n);
    // A dominant diagonal (~100) would swamp the block scales if it were included.
    const at::Tensor m = at::randn({n, n}) + at::diag(100 + at::rand({n}));
    QuantOptions options;
    options.keep_diagonal = true;
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
    const Dense x(m), y(q.dequantize());
    const int64_t blocks = blocks_per_row(n, 64);
    const std::vector<float> s = testing::reference_absmax(x, 64, /*skip_diagonal=*/true);
    const double bound = max_rounding_error(codebook_values(options.mapping, 4));
    const Dense scales(q.scales());
    ASSERT_EQ(q.diagonal().numel(), n);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) {
        if (r == c) {
          ASSERT_EQ(y(r, c), x(r, c)) << "diagonal " << r;
          continue;
        }
        const float block_scale = s[r * blocks + c / 64];
        ASSERT_EQ(scales(r, c / 64), block_scale);
        ASSERT_LE(testing::abs_diff(x(r, c), y(r, c)), testing::error_bound(block_scale, bound)) << r << "," << c;
      }
    EXPECT_EQ(q.nbytes(), n * ((n * 4 + 7) / 8) + 4 * n * blocks + 4 * n);
  }
}

TEST(DoubleQuantizedScales, ScalesRoundUpWithinOneGapAndBitsStayBelowFourAndAHalf) {
  const int64_t n = 1200;  // 1200 * 19 blocks: many groups of 256 scales
  const at::Tensor m = testing::varied_matrix(n, n, 11);
  QuantOptions options;
  options.double_quant_scales = true;
  const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
  const Dense x(m), y(q.dequantize());
  const int64_t blocks = blocks_per_row(n, 64);
  const std::vector<float> s = testing::reference_absmax(x, 64, false);
  const std::vector<float> table = scale_codebook_values();
  const double table_gap = testing::max_gap(table);
  const double bound = max_rounding_error(codebook_values(options.mapping, 4));
  const at::Tensor effective = q.effective_scales().contiguous();
  const float* s_hat = effective.data_ptr<float>();
  const at::Tensor group_max = q.scale_group_max().contiguous();
  ASSERT_EQ(q.scales().scalar_type(), at::kByte);
  ASSERT_EQ(group_max.numel(), (n * blocks + 255) / 256);

  for (int64_t g = 0; g < group_max.numel(); ++g) {
    float m_ref = 0;
    for (int64_t i = 256 * g; i < std::min<int64_t>(n * blocks, 256 * (g + 1)); ++i)
      m_ref = std::max(m_ref, s[i]);
    ASSERT_EQ(group_max[g].item<float>(), m_ref) << "group " << g;
  }
  for (int64_t i = 0; i < n * blocks; ++i) {
    const float gm = group_max[i / 256].item<float>();
    ASSERT_GE(s_hat[i], s[i]) << "scale " << i << " was rounded down";
    // Rounded up to the next code of the scale table (relative to the group max): at most one
    // table gap times the group max, plus the float rounding of code * group max.
    ASSERT_LE(testing::abs_diff(s_hat[i], s[i]), testing::error_bound(gm, table_gap)) << "scale " << i;
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < n; ++c)
      ASSERT_LE(testing::abs_diff(x(r, c), y(r, c)), testing::error_bound(s_hat[r * blocks + c / 64], bound))
          << r << "," << c;

  // Exact byte count (pinned below): 4 + 8/64 + 32/(64 * 256) = 4.127 bits, under the
  // paper's 4.5 for fp32 scales.
  const double bits_per_element = 8.0 * q.nbytes() / (n * n);
  EXPECT_LT(bits_per_element, 4.5);
  EXPECT_EQ(q.nbytes(), n * (n / 2) + n * blocks + 4 * ((n * blocks + 255) / 256));
  EXPECT_EQ(q.nbytes(), QuantizedMatrix::storage_bytes(n, n, options));
}

TEST(StochasticRounding, UnbiasedWithinAStatisticalBound) {
  const at::Tensor m = testing::varied_matrix(16, 64, 5);
  const Dense x(m);
  const std::vector<float> codes = codebook_values(Mapping::Linear2, 4);
  const std::vector<float> absmax = testing::reference_absmax(x, 64, false);
  const int seeds = 2000;
  std::vector<double> sum(x.v.size(), 0.0);
  QuantOptions options;
  options.rounding = Rounding::Stochastic;
  for (int seed = 0; seed < seeds; ++seed) {
    options.seed = seed;
    const Dense y(QuantizedMatrix::quantize(m, options).dequantize());
    for (size_t i = 0; i < sum.size(); ++i) {
      // Every draw is one of the two codes around x / scale.
      const double s = absmax[i / 64];
      ASSERT_LE(testing::abs_diff(y.v[i], x.v[i]), testing::error_bound(s, testing::max_gap(codes)));
      sum[i] += y.v[i];
    }
  }
  for (size_t i = 0; i < sum.size(); ++i) {
    const double s = absmax[i / 64];
    if (s == 0) continue;
    // Bernoulli between neighbours a < t < b: sd = s * sqrt(p(1-p)) * (b - a) <= s * (b - a) / 2.
    const double t = x.v[i] / s;
    const auto upper = std::upper_bound(codes.begin(), codes.end(), static_cast<float>(t));
    const double gap = (upper == codes.end() || upper == codes.begin()) ? 0 : *upper - *(upper - 1);
    const double sd = s * gap / 2 / std::sqrt(static_cast<double>(seeds));
    // 6 standard errors: P(|Z| > 6) = 2e-9 per element, 2e-6 over the 1024 elements. Plus
    // the bias float arithmetic may leave, in units of s: fl(x / s) (2^-24), the
    // probability (t - a) / (b - a) in float (3 roundings, times the gap <= 1/4 of this
    // table) and 24-bit uniforms (2^-24 times the gap), the dequantized fl(code * s)
    // (2^-24): 2^-24 (1 + 3/4 + 1/4 + 1) = 3 * 2^-24.
    EXPECT_LE(std::fabs(sum[i] / seeds - x.v[i]), 6 * sd + 3 * 0x1p-24 * s) << "element " << i;
  }
}

TEST(StochasticRounding, ReproducibleForASeedAndIndependentOfThreads) {
  const at::Tensor m = testing::varied_matrix(300, 257, 9);
  QuantOptions options;
  options.rounding = Rounding::Stochastic;
  options.seed = 1234;
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const QuantizedMatrix one = QuantizedMatrix::quantize(m, options);
  at::set_num_threads(std::max(2, threads));
  const QuantizedMatrix many = QuantizedMatrix::quantize(m, options);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one.codes(), many.codes()));
  options.seed = 1235;
  EXPECT_FALSE(at::equal(one.codes(), QuantizedMatrix::quantize(m, options).codes()));
  options.rounding = Rounding::Nearest;
  EXPECT_FALSE(at::equal(one.codes(), QuantizedMatrix::quantize(m, options).codes()));
}

TEST(Dtypes, HalfPrecisionAndDoubleInputsQuantizeTheirOwnValues) {
  const at::Tensor base = testing::varied_matrix(33, 130, 4);
  const double bound = max_rounding_error(codebook_values(Mapping::Linear2, 4));
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kDouble}) {
    const at::Tensor m = base.to(dtype);
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, {});
    const Dense x(m), y(q.dequantize());  // x: the dtype's values, widened to float
    const std::vector<float> s = testing::reference_absmax(x, 64, false);
    for (int64_t r = 0; r < 33; ++r)
      for (int64_t c = 0; c < 130; ++c)
        ASSERT_LE(testing::abs_diff(x(r, c), y(r, c)), testing::error_bound(s[r * 3 + c / 64], bound))
            << c10::toString(dtype) << " [" << r << ", " << c << "]";
    // Dequantizing to the input's dtype rounds the float result once.
    EXPECT_TRUE(at::equal(q.dequantize(dtype), q.dequantize().to(dtype))) << c10::toString(dtype);
  }
}

TEST(TorchOps, RegisteredUnderTheLowbitNamespaceAndMatchTheCppApi) {
  const at::Tensor m = testing::varied_matrix(40, 70, 8);
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("lowbit::quantize_blockwise", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                          const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, bool,
                          int64_t, const c10::optional<at::Tensor>&, bool)>();
  const auto [codes, scales, diag] =
      op.call(m, codebook(Mapping::DynamicTree, 8), 8, 32, false, false, 0, c10::nullopt, /*check_finite=*/true);
  QuantOptions options;
  options.bits = 8;
  options.mapping = Mapping::DynamicTree;
  options.block_size = 32;
  const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
  EXPECT_TRUE(at::equal(codes, q.codes()));
  EXPECT_TRUE(at::equal(scales, q.scales()));
  EXPECT_EQ(diag.numel(), 0);
  for (const char* name : {"lowbit::block_absmax", "lowbit::dequantize_blockwise",
                           "lowbit::quantize_scales", "lowbit::dequantize_scales"})
    EXPECT_TRUE(c10::Dispatcher::singleton().findSchema({name, ""}).has_value()) << name;
  EXPECT_TRUE(c10::Dispatcher::singleton().findSchema({"lowbit::dequantize_blockwise", "out"}).has_value());

  const auto table_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowbit::codebook", "")
                            .typed<at::Tensor(c10::string_view, int64_t)>();
  EXPECT_TRUE(at::equal(table_op.call("dynamic", 3), codebook(Mapping::DynamicTree, 3)));
  EXPECT_THROW(table_op.call("linear2", 6), c10::Error);
}

TEST(EmptyMatrices, ZeroRowsOrColumnsRoundTrip) {
  for (auto shape : {std::pair<int64_t, int64_t>{0, 5}, {3, 0}, {0, 0}}) {
    const at::Tensor m = at::zeros({shape.first, shape.second});
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, {});
    EXPECT_EQ(q.dequantize().sizes(), m.sizes());
    EXPECT_EQ(q.nbytes(), 0);
  }
}

}  // namespace
}  // namespace lowbit
