// Bad input: each case raises a c10::Error whose message names the problem, and writes nothing.
#include <gtest/gtest.h>

#include "expect_error.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <functional>
#include <limits>
#include <string>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

namespace lowbit {
namespace {

using testing::expect_error;

QuantOptions with(std::function<void(QuantOptions&)> edit) {
  QuantOptions o;
  edit(o);
  return o;
}

TEST(QuantizeErrors, NonFiniteValuesAreReportedWithTheirPosition) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    at::Tensor m = at::randn({4, 100});
    m[2][75] = bad;
    expect_error([&] { QuantizedMatrix::quantize(m); }, "NaN or Inf");
    expect_error([&] { QuantizedMatrix::quantize(m); }, "first at [2, 75]");
    expect_error([&] { QuantizedMatrix::quantize(m, with([](auto& o) { o.double_quant_scales = true; })); },
                 "first at [2, 75]");
  }
  at::Tensor square = at::randn({8, 8});
  square[3][3] = std::numeric_limits<float>::quiet_NaN();  // the kept diagonal is checked too
  expect_error([&] { QuantizedMatrix::quantize(square, with([](auto& o) { o.keep_diagonal = true; })); },
               "first at [3, 3]");
}

TEST(QuantizeErrors, WrongDtypeRankOrLayout) {
  expect_error([] { QuantizedMatrix::quantize(at::ones({4, 4}, at::kInt)); },
               "must be float32, bfloat16, float16 or float64");
  expect_error([] { QuantizedMatrix::quantize(at::ones({4, 4}, at::kBool)); }, "got Bool");
  expect_error([] { QuantizedMatrix::quantize(at::ones({16})); }, "must be a 2-D matrix");
  expect_error([] { QuantizedMatrix::quantize(at::ones({2, 3, 4})); }, "got shape [2, 3, 4]");
  expect_error([] { QuantizedMatrix::quantize(at::ones({4, 4}).to_sparse()); }, "dense (strided)");
  expect_error([] { QuantizedMatrix::quantize(at::Tensor()); }, "undefined");
}

TEST(QuantizeErrors, InvalidOptionsNameTheOptionAndTheValue) {
  for (int64_t bs : {0, 8, 100, 8192, -64})
    expect_error([&] { QuantizedMatrix::quantize(at::ones({4, 4}), with([&](auto& o) { o.block_size = bs; })); },
                 "block_size must be a power of two from 16 to 4096; got " + std::to_string(bs));
  for (int bits : {0, 2, 5, 16, 32})
    expect_error([&] { QuantizedMatrix::quantize(at::ones({4, 4}), with([&](auto& o) { o.bits = bits; })); },
                 "bits must be 3, 4 or 8; got " + std::to_string(bits));
  expect_error([] { QuantizedMatrix::quantize(at::ones({4, 5}), with([](auto& o) { o.keep_diagonal = true; })); },
               "keep_diagonal needs a square matrix");
  expect_error([] { parse_mapping("cubic"); }, "mapping must be one of");
  expect_error([] { parse_rounding("up"); }, "rounding must be");
}

TEST(DequantizeErrors, MismatchedOutputIsRejectedBeforeWriting) {
  const QuantizedMatrix q = QuantizedMatrix::quantize(at::randn({10, 70}));
  for (const at::Tensor& wrong : {at::full({10, 71}, 7.0), at::full({70, 10}, 7.0), at::full({10}, 7.0)}) {
    expect_error([&] { q.dequantize_into(wrong); }, "out must have shape [10, 70]");
    EXPECT_TRUE(at::equal(wrong, at::full_like(wrong, 7.0))) << "out was written";
  }
  const at::Tensor int_out = at::full({10, 70}, 7, at::kInt);
  expect_error([&] { q.dequantize_into(int_out); }, "out must be float32");
  EXPECT_TRUE(at::equal(int_out, at::full_like(int_out, 7)));
  const at::Tensor strided_out = at::full({70, 10}, 7.0).t();
  expect_error([&] { q.dequantize_into(strided_out); }, "out must be contiguous");
  EXPECT_TRUE(at::equal(strided_out, at::full_like(strided_out, 7.0)));
  expect_error([] { QuantizedMatrix().dequantize(); }, "empty");
}

TEST(DequantizeErrors, TheOpChecksCodesScalesAndDiagonalAgainstTheOutput) {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("lowbit::dequantize_blockwise", "out")
                      .typed<at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, int64_t, int64_t,
                                         at::Tensor&)>();
  const QuantizedMatrix q = QuantizedMatrix::quantize(at::randn({9, 9}));
  const at::Tensor& table = codebook(Mapping::Linear2, 4);
  at::Tensor out = at::full({9, 9}, 7.0);
  auto untouched = [&] { EXPECT_TRUE(at::equal(out, at::full_like(out, 7.0))) << "out was written"; };

  expect_error([&] { op.call(q.codes().slice(1, 0, 4), q.scales(), table, c10::nullopt, 4, 64, out); },
               "codes must be uint8 of shape [9, 5]");
  untouched();
  expect_error([&] { op.call(q.codes(), q.scales().repeat({1, 2}), table, c10::nullopt, 4, 64, out); },
               "scales must be Float of shape [9, 1]");
  untouched();
  expect_error([&] { op.call(q.codes(), q.scales(), table, at::ones({8}), 4, 64, out); },
               "diagonal must be float32 of shape [9]");
  untouched();
  expect_error([&] { op.call(q.codes(), q.scales(), table, c10::nullopt, 3, 64, out); },
               "codebook must be a 1-D float32 tensor of 2^bits = 8 values");
  untouched();
  expect_error([&] { op.call(q.codes(), q.scales(), table.flip(0), c10::nullopt, 4, 64, out); },
               "strictly ascending");
  untouched();
  expect_error([&] { op.call(q.codes(), q.scales(), table, c10::nullopt, 4, 48, out); },
               "block_size must be a power of two");
  untouched();
}

}  // namespace
}  // namespace lowbit
