// `lowbit bench codec`: quantize / dequantize throughput of the codec, reported as GB/s
// of fp32 matrix processed and as a ratio to a same-run device copy of that matrix (on CUDA,
// a device-to-device copy of the same bytes).
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/randn.h>
#include <torch/cuda.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <lowbit/quantized_matrix.h>

#include "cli/commands.h"
#include "cli/json_output.h"
#include "cli/timing.h"

namespace lowbit::cli {
namespace {

struct BenchCodecArgs {
  std::vector<int64_t> orders{256, 1200, 4096};
  int bits = 4;
  std::string mapping = "linear2";
  int64_t block_size = 64;
  int repeats = 20;
  std::string device = "cpu";
  std::string json_path;
};

// The device to measure on, after checking that the codec can run there.
at::Device bench_device(const std::string& name) {
  if (name == "cpu") return at::Device(at::kCPU);
  TORCH_CHECK(torch::cuda::is_available(), "--device cuda: no CUDA device is available (",
              at::hasCUDA() ? "this LibTorch has CUDA but sees no GPU" : "this LibTorch was built without CUDA",
              ")");
  TORCH_CHECK(c10::Dispatcher::singleton()
                  .findSchemaOrThrow("lowbit::quantize_blockwise", "")
                  .hasKernelForDispatchKey(c10::DispatchKey::CUDA),
              "--device cuda: this lowbit library was built without its CUDA kernels");
  return at::Device(at::kCUDA, 0);
}

// Median seconds per call of fn. CUDA work is queued asynchronously, so there each timed
// sample queues several calls and then waits for the device: the wait (and launch latency)
// is spread over the calls instead of dominating small matrices.
template <typename Fn>
double seconds_per_call(Fn&& fn, const at::Device& device, int repeats) {
  if (!device.is_cuda()) return median_seconds(fn, repeats);
  constexpr int kCallsPerSample = 10;
  auto sample = [&] {
    for (int i = 0; i < kCallsPerSample; ++i) fn();
    torch::cuda::synchronize(device.index());
  };
  return median_seconds(sample, repeats) / kCallsPerSample;
}

nlohmann::json measure(int64_t order, const BenchCodecArgs& args, const at::Device& device) {
  QuantOptions options;
  options.bits = args.bits;
  options.mapping = parse_mapping(args.mapping);
  options.block_size = args.block_size;
  const at::Tensor matrix = at::randn({order, order}, at::TensorOptions().device(device));
  at::Tensor copy_target = at::empty_like(matrix);
  at::Tensor dequant_target = at::empty_like(matrix);
  const QuantizedMatrix q = QuantizedMatrix::quantize(matrix, options);

  const double copy_s = seconds_per_call([&] { copy_target.copy_(matrix); }, device, args.repeats);
  const double quant_s =
      seconds_per_call([&] { QuantizedMatrix::quantize(matrix, options); }, device, args.repeats);
  // What Shampoo's refresh calls: no read-back of the NaN/Inf flag (on a GPU, a host round trip).
  const double assumed_s = seconds_per_call(
      [&] { QuantizedMatrix::quantize(matrix, options, FiniteInput::Assumed); }, device, args.repeats);
  const double dequant_s = seconds_per_call([&] { q.dequantize_into(dequant_target); }, device, args.repeats);
  const double gb = static_cast<double>(matrix.numel()) * sizeof(float) / 1e9;
  return {{"order", order},
          {"device", device.str()},
          {"bits", args.bits},
          {"mapping", args.mapping},
          {"block_size", args.block_size},
          {"threads", at::get_num_threads()},
          {"copy_gbps", gb / copy_s},
          {"quantize_gbps", gb / quant_s},
          {"dequantize_gbps", gb / dequant_s},
          {"quantize_vs_copy", copy_s / quant_s},
          {"quantize_assumed_finite_vs_copy", copy_s / assumed_s},
          {"dequantize_vs_copy", copy_s / dequant_s},
          {"stored_bytes", q.nbytes()},
          {"fp32_bytes", matrix.numel() * 4}};
}

void run(const BenchCodecArgs& args) {
  const at::Device device = bench_device(args.device);
  std::printf("lowbit bench codec on %s: %d-bit %s, block %lld, %d threads, median of %d runs\n",
              device.str().c_str(), args.bits, args.mapping.c_str(),
              static_cast<long long>(args.block_size), at::get_num_threads(), args.repeats);
  std::printf("GB/s counts the fp32 matrix processed; ratios are against copying it (same run)\n\n");
  std::printf("%7s %11s %13s %8s %14s %15s %8s %12s\n", "order", "copy GB/s", "quantize GB/s", "ratio",
              "ratio, finite", "dequantize GB/s", "ratio", "bytes/fp32");
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t order : args.orders) {
    nlohmann::json r = measure(order, args, device);
    std::printf("%7lld %11.2f %13.2f %7.0f%% %13.0f%% %15.2f %7.0f%% %12.4f\n", static_cast<long long>(order),
                r["copy_gbps"].get<double>(), r["quantize_gbps"].get<double>(),
                100 * r["quantize_vs_copy"].get<double>(), 100 * r["quantize_assumed_finite_vs_copy"].get<double>(),
                r["dequantize_gbps"].get<double>(),
                100 * r["dequantize_vs_copy"].get<double>(),
                r["stored_bytes"].get<double>() / r["fp32_bytes"].get<double>());
    rows.push_back(std::move(r));
  }
  if (!args.json_path.empty()) {
    write_json(args.json_path, {{"benchmark", "codec"}, {"results", rows}});
    std::printf("\nwrote %s\n", args.json_path.c_str());
  }
}

}  // namespace

void add_bench_codec(CLI::App& bench) {
  auto args = std::make_shared<BenchCodecArgs>();
  CLI::App* cmd = bench.add_subcommand("codec", "Quantize/dequantize throughput vs a memcpy baseline");
  cmd->add_option("--orders", args->orders, "Matrix orders (square matrices)")->capture_default_str();
  cmd->add_option("--bits", args->bits, "Bits per code")->check(CLI::IsMember({3, 4, 8}))->capture_default_str();
  cmd->add_option("--mapping", args->mapping, "linear2 | dynamic | linear")
      ->check(CLI::IsMember({"linear2", "dynamic", "linear"}))->capture_default_str();
  cmd->add_option("--block-size", args->block_size, "Elements per block scale")->capture_default_str();
  cmd->add_option("--repeats", args->repeats, "Timed runs per measurement")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--device", args->device, "cpu | cuda (the first GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--json", args->json_path, "Also write the results to this JSON file");
  cmd->callback([args] { run(*args); });
}

}  // namespace lowbit::cli
