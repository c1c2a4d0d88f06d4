// `lowbit bench memory`: the peak resident memory a Shampoo optimizer adds to a process, 4-bit
// against fp32, with the default allocator. Each variant runs in a fresh process (this
// program again, with --variant), because freed memory stays in the allocator: a variant
// measured after another would inherit its heap.
//
// In the child: parameters and gradients are made, the peak resident set (VmHWM) is reset to
// the current one (/proc/self/clear_refs), the optimizer takes `steps` steps that refresh
// every state, and the peak's growth over the resident set before the optimizer is what the
// optimizer added (its state, its workspace, and every temporary of its steps).
#include <ATen/Parallel.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <lowbit/shampoo.h>

#include "cli/commands.h"
#include "cli/json_output.h"

namespace lowbit::cli {
namespace {

// The goal: 4-bit adds at least this share of (fp32 state - 4-bit state) less than fp32.
constexpr double kGoalSavedShare = 0.60;

struct BenchMemoryArgs {
  int64_t parameters = 4;
  int64_t order = 2048;
  int64_t max_preconditioner_dim = 1200;
  int steps = 3;
  double workspace_mb = 0;
  std::string variant;  // set: run this one variant here and print one JSON line
  std::string json_path;
};

// A field of /proc/self/status in bytes (VmRSS, VmHWM).
int64_t status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream in(line.substr(field.size() + 1));
      int64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
  TORCH_CHECK(false, "lowbit bench memory: /proc/self/status has no ", field, " (needs Linux)");
}

void reset_peak() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";  // resets VmHWM to the current resident set
  TORCH_CHECK(clear.good(), "lowbit bench memory: cannot reset the peak resident set (/proc/self/clear_refs)");
}

ShampooOptions options_for(int64_t bits, const BenchMemoryArgs& a) {
  return ShampooOptions(1e-3).bits(bits).stat_interval(1).root_interval(1)
      .max_preconditioner_dim(a.max_preconditioner_dim).workspace_mb(a.workspace_mb);
}

int64_t bits_of(const std::string& variant) {
  TORCH_CHECK(variant == "fp32" || variant == "4bit", "--variant must be fp32 or 4bit; got ", variant);
  return variant == "fp32" ? 32 : 4;
}

// One variant, in this process.
nlohmann::json measure(const BenchMemoryArgs& a) {
  at::manual_seed(0);
  std::vector<at::Tensor> params;
  for (int64_t i = 0; i < a.parameters; ++i) {
    params.push_back(at::randn({a.order, a.order}).requires_grad_(true));
    params.back().mutable_grad() = at::randn({a.order, a.order});
  }
  reset_peak();
  const int64_t before = status_bytes("VmRSS");
  StateBytes state;
  {
    Shampoo opt(params, options_for(bits_of(a.variant), a));
    for (int s = 0; s < a.steps; ++s) opt.step();
    state = opt.state_bytes();
  }
  const int64_t peak = status_bytes("VmHWM");
  return {{"variant", a.variant}, {"added_peak_bytes", peak - before}, {"preconditioner_bytes", state.preconditioner},
          {"first_order_bytes", state.first_order}};
}

nlohmann::json run_child(const BenchMemoryArgs& a, const std::string& variant) {
  std::ostringstream command;
  // This program's own path, resolved here: in the shell popen starts, /proc/self/exe would be the shell.
  std::error_code error;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", error).string();
  TORCH_CHECK(!error, "lowbit bench memory: cannot resolve /proc/self/exe: ", error.message());
  command << "'" << self << "' bench memory --variant " << variant << " --parameters " << a.parameters << " --order "
          << a.order << " --max-preconditioner-dim " << a.max_preconditioner_dim << " --steps " << a.steps
          << " --workspace-mb " << a.workspace_mb;
  FILE* pipe = popen(command.str().c_str(), "r");
  TORCH_CHECK(pipe != nullptr, "lowbit bench memory: cannot start ", command.str());
  std::string output;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
  TORCH_CHECK(pclose(pipe) == 0, "lowbit bench memory: the ", variant, " run failed:\n", output);
  return nlohmann::json::parse(output.substr(output.rfind('{')));
}

void run(const BenchMemoryArgs& a) {
  if (!a.variant.empty()) {
    std::printf("%s\n", measure(a).dump().c_str());
    return;
  }
  std::printf("lowbit bench memory: %lld parameters of %lld x %lld, max order %lld, %d steps refreshing every state "
              "(T1 = T2 = 1), %d threads, default allocator\n",
              static_cast<long long>(a.parameters), static_cast<long long>(a.order), static_cast<long long>(a.order),
              static_cast<long long>(a.max_preconditioner_dim), a.steps, at::get_num_threads());
  const nlohmann::json fp32 = run_child(a, "fp32"), four = run_child(a, "4bit");
  const double mib = 1 << 20;
  for (const auto* r : {&fp32, &four})
    std::printf("  %-5s added peak %8.1f MiB   state: preconditioner %7.1f MiB, first-order %7.1f MiB\n",
                (*r)["variant"].get<std::string>().c_str(), (*r)["added_peak_bytes"].get<double>() / mib,
                (*r)["preconditioner_bytes"].get<double>() / mib, (*r)["first_order_bytes"].get<double>() / mib);
  const double theory = fp32["preconditioner_bytes"].get<double>() - four["preconditioner_bytes"].get<double>();
  const double saved = fp32["added_peak_bytes"].get<double>() - four["added_peak_bytes"].get<double>();
  const double share = saved / theory;
  std::printf("  4-bit adds %.1f MiB less than fp32: %.0f%% of the %.1f MiB its state saves in theory (goal >= %.0f%%): %s\n",
              saved / mib, 100 * share, theory / mib, 100 * kGoalSavedShare, share >= kGoalSavedShare ? "PASS" : "MISS");
  if (!a.json_path.empty()) {
    write_json(a.json_path, {{"benchmark", "bench memory"},
                             {"parameters", a.parameters},
                             {"order", a.order},
                             {"max_preconditioner_dim", a.max_preconditioner_dim},
                             {"steps", a.steps},
                             {"threads", at::get_num_threads()},
                             {"results", {fp32, four}},
                             {"saved_share", share},
                             {"goal_saved_share", kGoalSavedShare}});
    std::printf("wrote %s\n", a.json_path.c_str());
  }
}

}  // namespace

void add_bench_memory(CLI::App& bench) {
  auto args = std::make_shared<BenchMemoryArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "memory", "Peak resident memory a Shampoo optimizer adds, 4-bit vs fp32 (each in a fresh process)");
  cmd->add_option("--parameters", args->parameters, "Number of square parameters")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--order", args->order, "Their order")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--max-preconditioner-dim", args->max_preconditioner_dim, "Largest factor order")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--steps", args->steps, "Steps, each refreshing every state")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--workspace-mb", args->workspace_mb, "The optimizer's workspace_mb (0: automatic)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option("--variant", args->variant, "Measure only this variant, here (fp32 or 4bit); prints one JSON line");
  cmd->add_option("--json", args->json_path, "Also write the results to this JSON file");
  cmd->callback([args] { run(*args); });
}

}  // namespace lowbit::cli
