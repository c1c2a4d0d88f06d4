#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <ATen/ATen.h>

#include <lowbit/codebook.h>

#include "quant/codec_checks.h"

namespace lowbit {
namespace {

// Values printed in the paper (4 decimals), see shared/reference/4bit-shampoo.md: a printed
// value is within half a unit of the 4th decimal (5e-5) of the exact code, and the float
// table within 2^-24 (|code| <= 1) of that.
void expect_table(const std::vector<float>& got, const std::vector<double>& paper) {
  ASSERT_EQ(got.size(), paper.size());
  for (size_t k = 0; k < got.size(); ++k) EXPECT_NEAR(got[k], paper[k], 5e-5 + 0x1p-24) << "entry " << k;
}

TEST(Codebook, Linear2FourBitMatchesPaper) {
  expect_table(codebook_values(Mapping::Linear2, 4),
               {-1, -.7511, -.5378, -.36, -.2178, -.1111, -.04, 0, .0044, .04, .1111, .2178, .36,
                .5378, .7511, 1});
}

TEST(Codebook, DynamicTreeFourBitMatchesPaper) {
  expect_table(codebook_values(Mapping::DynamicTree, 4),
               {-.8875, -.6625, -.4375, -.2125, -.0775, -.0325, -.0055, 0, .0055, .0325, .0775,
                .2125, .4375, .6625, .8875, 1});
}

TEST(Codebook, ThreeBitTablesMatchPaper) {
  expect_table(codebook_values(Mapping::Linear2, 3), {-1, -.5102, -.1837, 0, .0204, .1837, .5102, 1});
  expect_table(codebook_values(Mapping::DynamicTree, 3), {-.775, -.325, -.055, 0, .055, .325, .775, 1});
}

// EXPECT_FLOAT_EQ (4 ulp) below: the table and the expectation are both the double formula
// rounded once to float, so they agree exactly; the 4 ulp would also admit a table that
// evaluates the formula in float (<= 2 roundings away from cancellation) -- both are
// correct tables.
TEST(Codebook, LinearIsTheEvenGridWithAnExactZero) {
  for (int bits : {3, 4, 8}) {
    const int n = 1 << bits;
    const std::vector<float> v = codebook_values(Mapping::Linear, bits);
    ASSERT_EQ(static_cast<int>(v.size()), n);
    for (int j = 0; j < n; ++j) {
      const double expected = (j == n / 2 - 1) ? 0.0 : -1.0 + 2.0 * j / (n - 1);
      EXPECT_FLOAT_EQ(v[j], static_cast<float>(expected)) << bits << " bits, entry " << j;
    }
  }
}

TEST(Codebook, EightBitLinear2IsTheSignedSquare) {
  const std::vector<float> v = codebook_values(Mapping::Linear2, 8);
  ASSERT_EQ(v.size(), 256u);
  for (int j = 0; j < 256; ++j) {
    const double x = -1.0 + 2.0 * j / 255;
    const double expected = (j == 127) ? 0.0 : std::copysign(x * x, x);
    EXPECT_FLOAT_EQ(v[j], static_cast<float>(expected)) << "entry " << j;
  }
}

TEST(Codebook, EightBitDynamicTreeEndpoints) {
  const std::vector<float> v = codebook_values(Mapping::DynamicTree, 8);
  ASSERT_EQ(v.size(), 256u);
  // Smallest magnitude: midpoint of [0.1, 1] scaled to the 1e-6 decade. (FLOAT_EQ: a few
  // float roundings in building the table, <= 4 ulp.)
  EXPECT_FLOAT_EQ(v[128], 0.55e-6f);
  EXPECT_FLOAT_EQ(v[126], -0.55e-6f);
  EXPECT_EQ(v[127], 0.f);
  EXPECT_EQ(v[255], 1.f);
  // Largest below 1: midpoint of the last of 64 parts of [0.1, 1].
  EXPECT_FLOAT_EQ(v[254], 1.0f - 0.9f / 128);
  EXPECT_FLOAT_EQ(v[0], -(1.0f - 0.9f / 128));
}

TEST(Codebook, EveryTableIsSortedHasZeroAndOneAndMatchesItsTensor) {
  for (Mapping m : {Mapping::Linear2, Mapping::DynamicTree, Mapping::Linear})
    for (int bits : {3, 4, 8}) {
      const std::vector<float> v = codebook_values(m, bits);
      ASSERT_EQ(static_cast<int>(v.size()), 1 << bits);
      for (size_t k = 0; k + 1 < v.size(); ++k) EXPECT_LT(v[k], v[k + 1]);
      EXPECT_EQ(v.back(), 1.f);
      EXPECT_GE(v.front(), -1.f);
      EXPECT_NE(std::find(v.begin(), v.end(), 0.f), v.end());
      const at::Tensor& t = codebook(m, bits);
      ASSERT_EQ(t.numel(), static_cast<int64_t>(v.size()));
      for (int64_t k = 0; k < t.numel(); ++k) EXPECT_EQ(t[k].item<float>(), v[k]);
    }
}

TEST(Codebook, ScaleTableIsUnsignedDynamicTree) {
  const std::vector<float> v = scale_codebook_values();
  ASSERT_EQ(v.size(), 256u);
  EXPECT_EQ(v.front(), 0.f);
  EXPECT_EQ(v.back(), 1.f);
  EXPECT_FLOAT_EQ(v[1], 0.325e-6f);  // midpoint of the first half of [0.1, 1], 1e-6 decade
  EXPECT_FLOAT_EQ(v[254], 1.0f - 0.9f / 256);
  for (size_t k = 0; k + 1 < v.size(); ++k) EXPECT_LT(v[k], v[k + 1]);
}

TEST(Codebook, MaxRoundingErrorMatchesADenseScan) {
  for (Mapping m : {Mapping::Linear2, Mapping::DynamicTree, Mapping::Linear})
    for (int bits : {3, 4, 8}) {
      const std::vector<float> v = codebook_values(m, bits);
      double worst = 0;
      const int samples = 200001;
      for (int i = 0; i < samples; ++i) {
        const double x = -1.0 + 2.0 * i / (samples - 1);
        double best = 1e9;
        for (float c : v) best = std::min(best, std::fabs(x - c));
        worst = std::max(worst, best);
      }
      // The distance to the nearest code is 1-Lipschitz in x, so a scan with spacing
      // h = 2 / (samples - 1) = 1e-5 finds its maximum to within h / 2 (from below); the
      // half-gap (b - a) / 2 of two float codes is exact in double.
      EXPECT_NEAR(max_rounding_error(v), worst, 1.0 / (samples - 1)) << to_string(m) << " " << bits;
    }
  // The widest 4-bit linear-2 gap is the top one, from (13/15)^2 to 1: half-gap 28/225. The
  // float code 0.7511 carries <= 2^-24 of rounding (half of it in the half-gap), so 2^-24.
  EXPECT_NEAR(max_rounding_error(codebook_values(Mapping::Linear2, 4)), 28.0 / 225.0, 0x1p-24);
}

// On a GPU the codec's argument check would read a device codebook back (a host
// synchronisation per call) unless it is one of lowbit's cached tables, whose values were
// made sorted on the host. The meta device holds no data: a check that passes on a meta copy
// provably read nothing, and one that reads fails there.
TEST(Codebook, CachedTablesAndTheirDeviceCopiesAreCheckedWithoutReadingThem) {
  const at::Tensor& host = codebook(Mapping::Linear2, 4);
  const at::Tensor copy = codebook_on(host, at::Device(at::kMeta));
  EXPECT_TRUE(copy.is_meta());
  EXPECT_TRUE(copy.is_same(codebook_on(host, at::Device(at::kMeta))));  // made once per device
  EXPECT_TRUE(is_cached_codebook(host));
  EXPECT_TRUE(is_cached_codebook(copy));
  EXPECT_TRUE(is_cached_codebook(scale_codebook()));
  EXPECT_TRUE(is_cached_codebook(positive_codebook(Mapping::Linear2, 4)));
  EXPECT_NO_THROW(checks::codebook("test", copy, 4));
  EXPECT_NO_THROW(checks::codebook("test", host, 4));

  // A table lowbit did not make, or a cached one changed in place, is read to be checked.
  const at::Tensor foreign = host.clone().to(at::kMeta);
  EXPECT_FALSE(is_cached_codebook(foreign));
  EXPECT_FALSE(is_cached_codebook(host.clone()));
  EXPECT_FALSE(is_cached_codebook(at::Tensor()));
  EXPECT_THROW(checks::codebook("test", foreign, 4), c10::Error);
  at::Tensor changed = codebook_on(codebook(Mapping::Linear, 3), at::Device(at::kMeta));
  changed.mul_(2);  // bumps its version (no data on meta)
  EXPECT_FALSE(is_cached_codebook(changed));
  EXPECT_THROW(checks::codebook("test", changed, 3), c10::Error);
}

TEST(Codebook, RejectsUnsupportedBits) {
  EXPECT_THROW(codebook_values(Mapping::Linear2, 5), c10::Error);
  EXPECT_THROW(codebook(Mapping::Linear, 2), c10::Error);
}

}  // namespace
}  // namespace lowbit
