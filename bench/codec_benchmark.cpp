// Google Benchmark micro-benchmarks of the codec, each next to a copy of the same matrix
// (BM_Copy) so that results read as ratios within one run.
#include <ATen/ops/empty_like.h>
#include <ATen/ops/randn.h>
#include <benchmark/benchmark.h>

#include <lowbit/quantized_matrix.h>

namespace {

lowbit::QuantOptions options_for(int bits) {
  lowbit::QuantOptions o;
  o.bits = bits;
  return o;
}

void set_fp32_bytes(benchmark::State& state, int64_t order) {
  state.SetBytesProcessed(state.iterations() * order * order * static_cast<int64_t>(sizeof(float)));
}

void BM_Copy(benchmark::State& state) {
  const int64_t order = state.range(0);
  const at::Tensor m = at::randn({order, order});
  at::Tensor out = at::empty_like(m);
  for (auto _ : state) out.copy_(m);
  set_fp32_bytes(state, order);
}

void BM_Quantize(benchmark::State& state) {
  const int64_t order = state.range(0);
  const at::Tensor m = at::randn({order, order});
  const auto options = options_for(static_cast<int>(state.range(1)));
  for (auto _ : state) benchmark::DoNotOptimize(lowbit::QuantizedMatrix::quantize(m, options));
  set_fp32_bytes(state, order);
}

void BM_Dequantize(benchmark::State& state) {
  const int64_t order = state.range(0);
  const at::Tensor m = at::randn({order, order});
  const auto q = lowbit::QuantizedMatrix::quantize(m, options_for(static_cast<int>(state.range(1))));
  at::Tensor out = at::empty_like(m);
  for (auto _ : state) q.dequantize_into(out);
  set_fp32_bytes(state, order);
}

}  // namespace

BENCHMARK(BM_Copy)->Arg(256)->Arg(1200)->Arg(4096)->UseRealTime();
BENCHMARK(BM_Quantize)->ArgsProduct({{256, 1200, 4096}, {3, 4, 8}})->UseRealTime();
BENCHMARK(BM_Dequantize)->ArgsProduct({{256, 1200, 4096}, {3, 4, 8}})->UseRealTime();
