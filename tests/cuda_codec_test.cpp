// The CUDA kernels of the codec ops against the CPU kernels: bit-identical codes, scales and
// diagonals (nearest rounding, and stochastic rounding with the same seed), bit-identical
// dequantized values, and the same errors. Every test skips where no CUDA device is present;
// the file uses only device-generic torch API, so it also compiles against a CPU LibTorch.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include "codec_reference.h"
#include "expect_error.h"
#include "quant/codec_ops.h"

namespace lowbit {
namespace {

using testing::expect_error;

class CudaCodec : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }
  const at::Device cuda{at::kCUDA, 0};
};

// Same shape, dtype and bytes (so -0.0 vs 0.0 or two NaN payloads would count as different).
void expect_same_bits(const at::Tensor& expected, const at::Tensor& actual, const std::string& what) {
  ASSERT_EQ(expected.defined(), actual.defined()) << what;
  if (!expected.defined()) return;
  ASSERT_EQ(expected.sizes(), actual.sizes()) << what;
  ASSERT_EQ(expected.scalar_type(), actual.scalar_type()) << what;
  const at::Tensor a = expected.cpu().contiguous(), b = actual.cpu().contiguous();
  const auto* pa = static_cast<const uint8_t*>(a.data_ptr());
  const auto* pb = static_cast<const uint8_t*>(b.data_ptr());
  const size_t size = a.element_size();
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(pa + i * size, pb + i * size, size) != 0) {
      FAIL() << what << ": element " << i << " (flat) differs: CPU " << a.reshape({-1})[i].item<double>()
             << ", CUDA " << b.reshape({-1})[i].item<double>();
    }
}

void expect_same_quantization(const QuantizedMatrix& cpu, const QuantizedMatrix& gpu, const std::string& what) {
  ASSERT_TRUE(gpu.codes().is_cuda()) << what;
  expect_same_bits(cpu.codes(), gpu.codes(), what + " codes");
  expect_same_bits(cpu.scales(), gpu.scales(), what + " scales");
  expect_same_bits(cpu.scale_group_max(), gpu.scale_group_max(), what + " scale_group_max");
  expect_same_bits(cpu.diagonal(), gpu.diagonal(), what + " diagonal");
}

// Quantizes on both devices and compares the stored tensors, then dequantizes the CPU result
// on both devices (so a dequantize difference is not hidden behind a quantize difference).
void check_both_devices(const at::Tensor& m, const QuantOptions& options, const std::string& what) {
  const QuantizedMatrix cpu = QuantizedMatrix::quantize(m, options);
  const QuantizedMatrix gpu = QuantizedMatrix::quantize(m.to(at::kCUDA), options);
  expect_same_quantization(cpu, gpu, what);
  expect_same_bits(cpu.dequantize(), cpu.to(at::kCUDA).dequantize(), what + " dequantized");
}

std::string describe(int64_t rows, int64_t cols, const QuantOptions& o) {
  return std::to_string(rows) + "x" + std::to_string(cols) + " " + std::to_string(o.bits) + "-bit " +
         to_string(o.mapping) + " block " + std::to_string(o.block_size) + " " + to_string(o.rounding) +
         " seed " + std::to_string(o.seed) + (o.keep_diagonal ? " diagonal" : "") +
         (o.double_quant_scales ? " double-quant" : "");
}

// Odd and even orders, one element, whole and partial chunks of 8, and more rows than a grid's y.
const std::vector<std::pair<int64_t, int64_t>> kShapes{{1, 1}, {3, 5}, {33, 130}, {64, 64},
                                                       {17, 1057}, {5, 4100}, {70000, 3}};

TEST_F(CudaCodec, NearestAndStochasticMatchCpuBitForBit) {
  for (auto [rows, cols] : kShapes)
    for (int bits : {3, 4, 8})
      for (Mapping mapping : {Mapping::Linear2, Mapping::DynamicTree, Mapping::Linear})
        for (Rounding rounding : {Rounding::Nearest, Rounding::Stochastic}) {
          const at::Tensor m = testing::varied_matrix(rows, cols, rows * 31 + cols);
          QuantOptions o;
          o.bits = bits;
          o.mapping = mapping;
          o.rounding = rounding;
          o.seed = 12345;
          check_both_devices(m, o, describe(rows, cols, o));
        }
}

TEST_F(CudaCodec, EveryBlockSizeMatchesCpu) {
  const at::Tensor m = testing::varied_matrix(7, 4100, 21);
  for (int64_t bs = kMinBlockSize; bs <= kMaxBlockSize; bs *= 2)
    for (int bits : {3, 4, 8}) {
      QuantOptions o;
      o.bits = bits;
      o.block_size = bs;
      check_both_devices(m, o, describe(7, 4100, o));
      o.rounding = Rounding::Stochastic;
      o.seed = static_cast<uint64_t>(bs);
      check_both_devices(m, o, describe(7, 4100, o));
    }
}

TEST_F(CudaCodec, DiagonalModeAndDoubleQuantizedScalesMatchCpu) {
  for (int64_t n : {1, 17, 65, 300}) {
    at::manual_seed(n);
    const at::Tensor m = at::randn({n, n}) + at::diag(100 + at::rand({n}));
    for (int bits : {3, 4, 8})
      for (int mode = 0; mode < 3; ++mode)
        for (Rounding rounding : {Rounding::Nearest, Rounding::Stochastic}) {
          QuantOptions o;
          o.bits = bits;
          o.block_size = 16;
          o.rounding = rounding;
          o.seed = 7;
          o.keep_diagonal = mode != 1;
          o.double_quant_scales = mode != 0;
          check_both_devices(m, o, describe(n, n, o));
        }
  }
  // Many groups of 256 scales, rows of very different magnitude and an all-zero row.
  QuantOptions o;
  o.double_quant_scales = true;
  o.block_size = 16;
  check_both_devices(testing::varied_matrix(300, 1000, 5), o, describe(300, 1000, o));
}

TEST_F(CudaCodec, HalfBfloatAndDoubleInputsAndOutputsMatchCpu) {
  const at::Tensor base = testing::varied_matrix(33, 136, 4);  // 136: whole chunks of 8
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16, at::kDouble, at::kFloat})
    for (int bits : {3, 4, 8}) {
      QuantOptions o;
      o.bits = bits;
      const at::Tensor m = base.to(dtype);
      check_both_devices(m, o, describe(33, 136, o) + " " + c10::toString(dtype));
      const QuantizedMatrix q = QuantizedMatrix::quantize(m, o);
      const QuantizedMatrix q_gpu = q.to(at::kCUDA);
      for (at::ScalarType out : {at::kHalf, at::kBFloat16, at::kDouble})
        expect_same_bits(q.dequantize(out), q_gpu.dequantize(out),
                         std::string("dequantize to ") + c10::toString(out));
    }
  // Doubles beyond float range are non-finite once narrowed, on both devices.
  at::Tensor huge = at::ones({2, 20}, at::kDouble);
  huge[1][3] = 1e300;
  expect_error([&] { QuantizedMatrix::quantize(huge.to(at::kCUDA)); }, "first at [1, 3]");
}

TEST_F(CudaCodec, DequantizeIntoUnalignedOutputMatchesCpu) {
  // An output that starts one element into its buffer cannot take the wide stores.
  for (int bits : {3, 4, 8}) {
    QuantOptions o;
    o.bits = bits;
    const at::Tensor m = testing::varied_matrix(40, 64, 9);
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, o);
    at::Tensor buffer = at::zeros({40 * 64 + 1}, at::TensorOptions().device(cuda));
    at::Tensor out = buffer.narrow(0, 1, 40 * 64).view({40, 64});
    q.to(at::kCUDA).dequantize_into(out);
    expect_same_bits(q.dequantize(), out, "unaligned out, " + std::to_string(bits) + "-bit");
    EXPECT_EQ(buffer[0].item<float>(), 0.f) << "wrote before the output";
  }
}

TEST_F(CudaCodec, ScaleOpsMatchCpu) {
  // block_absmax with and without the diagonal; quantize/dequantize_scales with zeros, ties
  // and a partial last group.
  const at::Tensor m = testing::varied_matrix(129, 129, 2);
  for (bool skip : {false, true})
    for (int64_t bs : {16, 64, 4096})
      expect_same_bits(ops::block_absmax(m, bs, skip), ops::block_absmax(m.to(at::kCUDA), bs, skip),
                       "block_absmax block " + std::to_string(bs));
  at::Tensor scales = at::rand({3, 300}) * at::pow(10.0, at::linspace(-3, 2, 3)).unsqueeze(1);
  scales[0].narrow(0, 0, 40).zero_();
  scales[1][7] = scales[1][9] = 50.f;
  const at::Tensor& table = scale_codebook();
  const auto [codes_cpu, max_cpu] = ops::quantize_scales(scales, table);
  const auto [codes_gpu, max_gpu] = ops::quantize_scales(scales.to(at::kCUDA), table.to(at::kCUDA));
  expect_same_bits(codes_cpu, codes_gpu, "scale codes");
  expect_same_bits(max_cpu, max_gpu, "group max");
  expect_same_bits(ops::dequantize_scales(codes_cpu, max_cpu, table),
                   ops::dequantize_scales(codes_gpu, max_gpu, table.to(at::kCUDA)), "dequantized scales");
}

TEST_F(CudaCodec, ErrorsMatchCpuAndWriteNothing) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    at::Tensor m = at::randn({4, 100});
    m[2][75] = bad;
    m[3][10] = bad;  // a later one: the first is reported
    const at::Tensor g = m.to(at::kCUDA);
    expect_error([&] { QuantizedMatrix::quantize(g); }, "input contains NaN or Inf");
    expect_error([&] { QuantizedMatrix::quantize(g); }, "first at [2, 75]; nothing was written");
    QuantOptions dq;
    dq.double_quant_scales = true;
    expect_error([&] { QuantizedMatrix::quantize(g, dq); }, "first at [2, 75]");
    expect_error([&] { ops::block_absmax(g, 64, false); }, "lowbit::block_absmax: input contains NaN");
  }
  at::Tensor square = at::randn({8, 8});
  square[3][3] = std::numeric_limits<float>::quiet_NaN();  // the kept diagonal is checked too
  QuantOptions diag;
  diag.keep_diagonal = true;
  expect_error([&] { QuantizedMatrix::quantize(square.to(at::kCUDA), diag); }, "first at [3, 3]");

  at::Tensor scales = at::ones({2, 300}, at::TensorOptions().device(cuda));
  scales[1][5] = -1.f;
  expect_error([&] { ops::quantize_scales(scales, scale_codebook()); },
               "scales must be finite and non-negative; entry 305 is -1");

  // Argument errors are the CPU's, and the output is left as it was.
  const QuantizedMatrix q = QuantizedMatrix::quantize(at::randn({10, 70}).to(at::kCUDA));
  at::Tensor wrong = at::full({10, 71}, 7.0, at::TensorOptions().device(cuda));
  expect_error([&] { q.dequantize_into(wrong); }, "out must have shape [10, 70]");
  EXPECT_TRUE(at::equal(wrong, at::full_like(wrong, 7.0)));
  at::Tensor host_out = at::full({10, 70}, 7.0);
  expect_error([&] {
    ops::dequantize_blockwise_out(q.codes(), q.scales(), codebook(Mapping::Linear2, 4), c10::nullopt,
                                  4, 64, host_out);
  }, "codes is on cuda:0 but the operation runs on cpu");
  EXPECT_TRUE(at::equal(host_out, at::full_like(host_out, 7.0)));
}

// FiniteInput::Assumed (check_finite=False) only skips the host read of the NaN/Inf flag:
// finite input is coded bit for bit as when checked (and as on the CPU), and non-finite input
// gives valid codes without an error or a fault (the engine sanitizes before it codes).
TEST_F(CudaCodec, AssumedFiniteInputSkipsOnlyTheCheck) {
  QuantOptions plain, dq;
  dq.double_quant_scales = true;
  for (const QuantOptions& o : {plain, dq}) {
    const at::Tensor m = at::randn({33, 1057});
    const QuantizedMatrix cpu = QuantizedMatrix::quantize(m, o);
    const at::Tensor stack = m.to(cuda).unsqueeze(0).repeat({2, 1, 1});
    expect_same_quantization(cpu, QuantizedMatrix::quantize(m.to(cuda), o, FiniteInput::Assumed),
                             describe(33, 1057, o) + " assumed finite");
    for (const QuantizedMatrix& q : QuantizedMatrix::quantize_stack(stack, o, FiniteInput::Assumed))
      expect_same_quantization(cpu, q, describe(33, 1057, o) + " stack, assumed finite");
    at::Tensor bad = m.to(cuda);
    bad[2][75] = std::numeric_limits<float>::quiet_NaN();
    bad[5][3] = std::numeric_limits<float>::infinity();
    const QuantizedMatrix unchecked = QuantizedMatrix::quantize(bad, o, FiniteInput::Assumed);
    const at::Tensor codes = unchecked.codes().cpu();
    EXPECT_EQ(codes.sizes(), cpu.codes().sizes());
    expect_error([&] { QuantizedMatrix::quantize(bad, o); }, "first at [2, 75]");
  }
}

// Kashin (mapping "kashin") is made of ATen ops, so it runs on a GPU as on the CPU, but its
// fp32 reductions may round in another order, so codes are not compared bit for bit. A state
// made on the GPU decodes there as on the CPU: each fp32 decode is s (c_u + Q c_v), within
// (len + 2) eps s max|c| (1 + sqrt(len)) of the exact value (kashin_test), so within twice that
// of each other. A zero block decodes to exactly zero on both.
TEST_F(CudaCodec, KashinStatesMadeOnTheGpuDecodeAsOnTheCpu) {
  QuantOptions o;
  o.mapping = Mapping::Kashin;
  at::Tensor m = at::randn({33, 1057}) * at::rand({33, 1}) * 10;
  m[4].zero_();
  const QuantizedMatrix gpu = QuantizedMatrix::quantize(m.to(cuda), o);
  ASSERT_TRUE(gpu.codes().is_cuda());
  const at::Tensor on_gpu = gpu.dequantize(at::kDouble).cpu(), on_cpu = gpu.to(at::kCPU).dequantize(at::kDouble);
  const double len = static_cast<double>(o.block_size), eps = std::numeric_limits<float>::epsilon() / 2;
  const double tol = 2 * (len + 2) * eps * gpu.scales().abs().max().item<double>() *
                     gpu.centroids().abs().max().item<double>() * (1 + std::sqrt(len));
  EXPECT_LE((on_gpu - on_cpu).abs().max().item<double>(), tol);
  EXPECT_TRUE(at::equal(on_gpu[4], at::zeros_like(on_gpu[4])));
  EXPECT_TRUE(on_gpu.isfinite().all().item<bool>());
}

}  // namespace
}  // namespace lowbit
