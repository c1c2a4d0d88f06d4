// QuantizedMatrix as a value: state() / from_state() round trips, corrupt states, devices.
#include <gtest/gtest.h>

#include "expect_error.h"

#include <cmath>
#include <functional>
#include <string>

#include <lowbit/quantized_matrix.h>

namespace lowbit {
namespace {

using State = std::map<std::string, at::Tensor>;

using testing::expect_error;

std::vector<QuantOptions> all_modes() {
  std::vector<QuantOptions> modes(4);
  modes[1].keep_diagonal = true;
  modes[2].double_quant_scales = true;
  modes[3].keep_diagonal = modes[3].double_quant_scales = true;
  modes[3].bits = 3;
  modes[3].mapping = Mapping::DynamicTree;
  modes[3].block_size = 16;
  return modes;
}

TEST(QuantizedMatrixState, RoundTripGivesIdenticalValuesInEveryMode) {
  const at::Tensor m = at::randn({67, 67});
  for (const QuantOptions& options : all_modes()) {
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, options);
    const QuantizedMatrix back = QuantizedMatrix::from_state(q.state());
    EXPECT_TRUE(at::equal(back.dequantize(), q.dequantize()));
    EXPECT_EQ(back.nbytes(), q.nbytes());
    EXPECT_EQ(back.options().bits, options.bits);
    EXPECT_EQ(back.options().mapping, options.mapping);
    EXPECT_EQ(back.options().block_size, options.block_size);
    EXPECT_EQ(back.options().keep_diagonal, options.keep_diagonal);
    EXPECT_EQ(back.options().double_quant_scales, options.double_quant_scales);
    const QuantizedMatrix moved = q.to(at::kCPU);
    EXPECT_TRUE(at::equal(moved.dequantize(), q.dequantize()));
  }
}

TEST(QuantizedMatrixState, CorruptStatesAreRejectedWithTheEntryNamed) {
  QuantOptions diag_dq;
  diag_dq.keep_diagonal = diag_dq.double_quant_scales = true;
  const State good = QuantizedMatrix::quantize(at::randn({70, 70}), diag_dq).state();
  auto edited = [&](const std::function<void(State&)>& edit) {
    State s = good;
    for (auto& [k, v] : s) v = v.clone();
    edit(s);
    return s;
  };
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s.erase("codes"); })); },
               "no \"codes\" entry");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s.erase("diagonal"); })); },
               "no \"diagonal\" entry");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s.erase("scale_group_max"); })); },
               "no \"scale_group_max\" entry");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["meta"] = s["meta"].slice(0, 0, 3); })); },
               "\"meta\" must be int64 of shape [7]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["meta"][2] = 5; })); },
               "bits must be 3, 4 or 8; got 5");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["meta"][3] = 9; })); },
               "unknown mapping id 9");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["codes"] = s["codes"].slice(0, 1); })); },
               "codes must be uint8 of shape [70, 35]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scales"] = s["scales"].to(at::kFloat); })); },
               "scales must be Byte of shape [70, 2]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["diagonal"] = s["diagonal"].slice(0, 1); })); },
               "diagonal must be float32 of shape [70]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scale_group_max"] = at::ones({3}); })); },
               "\"scale_group_max\" must be float32 of shape [1]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["meta"][1] = 71; })); },
               "\"meta\" sets keep_diagonal for a 70 x 71 matrix");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["meta"][0] = int64_t{1} << 61; })); },
               "expected orders in [0, 2^40]");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["diagonal"][3] = NAN; })); },
               "\"diagonal\" holds NaN or Inf");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scale_group_max"][0] = -1.f; })); },
               "\"scale_group_max\" holds a negative value");
}

// Found by python/tests/test_fuzz_codec.py: values that decoded silently to NaN, flipped
// signs or an overwritten diagonal.
TEST(QuantizedMatrixState, BadValuesAndUnusedEntriesAreRejected) {
  const State good = QuantizedMatrix::quantize(at::randn({9, 9}), QuantOptions{}).state();
  auto edited = [&](const std::function<void(State&)>& edit) {
    State s = good;
    for (auto& [k, v] : s) v = v.clone();
    edit(s);
    return s;
  };
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scales"][0][0] = NAN; })); },
               "\"scales\" holds NaN or Inf");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scales"][1][0] = -2.f; })); },
               "\"scales\" holds a negative value");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["diagonal"] = at::zeros({9}); })); },
               "\"diagonal\" entry but \"meta\" says keep_diagonal is off");
  expect_error([&] { QuantizedMatrix::from_state(edited([](State& s) { s["scale_group_max"] = at::ones({1}); })); },
               "\"scale_group_max\" entry but \"meta\" says its scales are not double-quantized");
}

}  // namespace
}  // namespace lowbit
