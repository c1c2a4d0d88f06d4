// `lowbit bench step`: mean optimizer step time over a whole inverse-root cycle (T2 steps)
// and preconditioner state bytes, 4-bit Shampoo against fp32 Shampoo in the same process.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <lowbit/shampoo.h>

#include "cli/commands.h"
#include "cli/json_output.h"

namespace lowbit::cli {
namespace {

// Goals of the 4-bit Shampoo issue, as ratios to fp32 Shampoo on the same shape.
constexpr double kGoalStateRatio = 0.16;          // 4-bit preconditioner state
constexpr double kGoalStateRatioDoubleQ = 0.14;   // ... with double-quantized block scales
constexpr double kGoalTimeRatio = 1.10;           // 4-bit mean step time over a T2 cycle
// The paper's intervals, for the extrapolated column.
constexpr int64_t kPaperStatInterval = 100;
constexpr int64_t kPaperRootInterval = 500;
// Distinct gradients reused round-robin; 7 is coprime to the default T1 = 10, so
// successive statistics updates see different gradients.
constexpr int64_t kGradientPool = 7;

struct BenchStepArgs {
  std::string shapes = "1024x1024,4096x1024,256x256x3x3";
  int64_t stat_interval = 10;   // T1 (paper: 100)
  int64_t root_interval = 50;   // T2 (paper: 500)
  int64_t max_preconditioner_dim = 1200;
  int repeats = 3;              // timed T2 cycles per variant, after one warm-up cycle
  uint64_t seed = 0;
  bool eigen_form = false;      // also time root_storage = "eigen" (issue 20's fidelity option)
  std::string json_path;
};

struct Variant {
  std::string name;
  int64_t bits;
  std::string quantize;
  bool double_quant_scales;
  bool timed;  // naive 4-bit is in the memory column only
  std::string root_storage = "quantized";
};

// The variants of a run: fp32 first (the baseline of every ratio); with --eigen-form also the
// eigen-form roots (no stored root; U diag(lambda^-1/4) U^T made from the stored U at every
// step), at 4 bits and at 8 bits (the latter stores as many bytes as the paper's 4-bit).
std::vector<const Variant*> variants(const BenchStepArgs& args) {
  static const std::vector<Variant> all{{"fp32", 32, "eigenvectors", false, true},
                                        {"4bit", 4, "eigenvectors", false, true},
                                        {"4bit-dq", 4, "eigenvectors", true, true},
                                        {"naive-4bit", 4, "matrix", false, false},
                                        {"4bit-eigen", 4, "eigenvectors", false, true, "eigen"},
                                        {"8bit-eigen", 8, "eigenvectors", false, true, "eigen"}};
  std::vector<const Variant*> out;
  for (const Variant& v : all)
    if (v.root_storage == "quantized" || args.eigen_form) out.push_back(&v);
  return out;
}

ShampooOptions options_for(const Variant& v, const BenchStepArgs& a) {
  ShampooOptions o(1e-3);
  o.graft("adamw")
      .bits(v.bits)
      .quantize(v.quantize)
      .double_quant_scales(v.double_quant_scales)
      .root_storage(v.root_storage)
      .stat_interval(a.stat_interval)
      .root_interval(a.root_interval)
      .max_preconditioner_dim(a.max_preconditioner_dim);
  return o;
}

std::vector<std::vector<int64_t>> parse_shapes(const std::string& text) {
  std::vector<std::vector<int64_t>> shapes;
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) {
    std::vector<int64_t> shape;
    std::stringstream dims(item);
    std::string d;
    while (std::getline(dims, d, 'x')) {
      size_t used = 0;
      long long value = 0;
      try {
        value = std::stoll(d, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      TORCH_CHECK(used == d.size() && !d.empty() && value > 0, "--shapes: \"", item,
                  "\" is not a shape like 1024x1024 or 256x256x3x3 (positive sizes joined by 'x')");
      shape.push_back(value);
    }
    TORCH_CHECK(shape.size() >= 2, "--shapes: \"", item, "\" has fewer than two dimensions");
    shapes.push_back(std::move(shape));
  }
  TORCH_CHECK(!shapes.empty(), "--shapes: no shape given");
  return shapes;
}

std::string shape_name(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

// The 2-D view Shampoo preconditions: (d0, product of the rest), size-1 dims dropped.
std::pair<int64_t, int64_t> matrix_view(const std::vector<int64_t>& shape) {
  std::vector<int64_t> dims;
  for (int64_t d : shape)
    if (d != 1) dims.push_back(d);
  if (dims.size() < 2) return {0, 0};
  int64_t cols = 1;
  for (size_t i = 1; i < dims.size(); ++i) cols *= dims[i];
  return {dims[0], cols};
}

torch::Tensor make_parameter(const std::vector<int64_t>& shape) {
  return (at::randn(shape) * 0.02).set_requires_grad(true);
}

// Preconditioner and first-order state bytes of `variant` for one parameter of `shape`,
// measured after a single step (every factor is created, at its full storage size, at the
// parameter's first step; later refreshes replace tensors of the same sizes). No timing.
StateBytes state_bytes_for(const std::vector<int64_t>& shape, const Variant& variant, const BenchStepArgs& args) {
  torch::Tensor p = make_parameter(shape);
  Shampoo optimizer({p}, options_for(variant, args));
  p.mutable_grad() = at::randn(shape);
  optimizer.step();
  return optimizer.state_bytes();
}

struct Timing {
  std::vector<double> cycle_ms_per_step;  // one entry per timed cycle
  double total_s = 0;
  int64_t steps = 0;
  // Mean step time by kind of step: preconditioning only, + statistics update (every T1),
  // + inverse-root update (every T2; such a step also updates statistics when T1 divides T2).
  double plain_s = 0, stat_s = 0, root_s = 0;
  int64_t plain_n = 0, stat_n = 0, root_n = 0;
  double ms_per_step() const { return 1e3 * total_s / static_cast<double>(steps); }
  static double mean_ms(double s, int64_t n) { return n ? 1e3 * s / static_cast<double>(n) : 0.0; }
};

struct Run {
  const Variant* variant;
  torch::Tensor param;
  std::unique_ptr<Shampoo> optimizer;
  int64_t step = 0;
  Timing timing;
};

// One optimizer step of `run` with the next pooled gradient; returns its wall seconds.
double timed_step(Run& run, const std::vector<at::Tensor>& pool) {
  run.param.mutable_grad() = pool[(run.step + 1) % kGradientPool];
  const auto start = std::chrono::steady_clock::now();
  run.optimizer->step();
  ++run.step;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void record(Timing& t, int64_t k, double s, const BenchStepArgs& args) {
  if (k % args.root_interval == 0) {
    t.root_s += s;
    ++t.root_n;
  } else if (k % args.stat_interval == 0) {
    t.stat_s += s;
    ++t.stat_n;
  } else {
    t.plain_s += s;
    ++t.plain_n;
  }
}

// Runs one cycle of T2 steps of every variant, interleaved step by step (the order rotating
// each step) so that load from elsewhere on the machine, or a cold cache, hits every variant
// alike. With `timed` set, records each step's wall time.
void run_cycle(std::vector<Run>& runs, const std::vector<at::Tensor>& pool, const BenchStepArgs& args, bool timed) {
  std::vector<double> cycle_s(runs.size(), 0.0);
  for (int64_t i = 0; i < args.root_interval; ++i) {
    for (size_t j = 0; j < runs.size(); ++j) {
      const size_t v = (static_cast<size_t>(i) + j) % runs.size();
      Run& run = runs[v];
      const double s = timed_step(run, pool);
      if (!timed) continue;
      cycle_s[v] += s;
      record(run.timing, run.step, s, args);
    }
  }
  if (!timed) return;
  for (size_t v = 0; v < runs.size(); ++v) {
    Timing& t = runs[v].timing;
    t.total_s += cycle_s[v];
    t.steps += args.root_interval;
    t.cycle_ms_per_step.push_back(1e3 * cycle_s[v] / static_cast<double>(args.root_interval));
  }
}

// Mean ms/step with the refresh costs measured here amortized over other intervals:
// plain + (stat step - plain) / T1 + (root step - plain - stat extra if it included one) / T2.
double projected_ms(const Timing& t, const BenchStepArgs& a, int64_t stat_interval, int64_t root_interval) {
  const double plain = Timing::mean_ms(t.plain_s, t.plain_n);
  const double stat_extra = t.stat_n ? Timing::mean_ms(t.stat_s, t.stat_n) - plain : 0.0;
  const bool root_has_stat = a.root_interval % a.stat_interval == 0;
  const double root_extra = Timing::mean_ms(t.root_s, t.root_n) - plain - (root_has_stat ? stat_extra : 0.0);
  return plain + stat_extra / static_cast<double>(stat_interval) + root_extra / static_cast<double>(root_interval);
}

const char* mark(bool pass) { return pass ? "PASS" : "MISS"; }

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

nlohmann::json bench_shape(const std::vector<int64_t>& shape, const BenchStepArgs& args, std::vector<std::string>& goals) {
  const auto [rows, cols] = matrix_view(shape);
  const int64_t d = args.max_preconditioner_dim;
  const int64_t blocks = ((rows + d - 1) / d) * ((cols + d - 1) / d);
  const std::string name = shape_name(shape);
  std::printf("\n== %s (matrix %lld x %lld, %lld block%s of at most %lld) ==\n", name.c_str(),
              static_cast<long long>(rows), static_cast<long long>(cols), static_cast<long long>(blocks),
              blocks == 1 ? "" : "s", static_cast<long long>(d));
  std::fflush(stdout);

  std::vector<at::Tensor> pool;
  for (int64_t i = 0; i < kGradientPool; ++i) pool.push_back(at::randn(shape));

  // Same initial parameter and gradients for every variant.
  const torch::Tensor init = make_parameter(shape).detach();
  std::vector<Run> runs;
  for (const Variant* v : variants(args)) {
    if (!v->timed) continue;
    Run r;
    r.variant = v;
    r.param = init.clone().set_requires_grad(true);
    r.optimizer = std::make_unique<Shampoo>(std::vector<torch::Tensor>{r.param}, options_for(*v, args));
    runs.push_back(std::move(r));
  }
  run_cycle(runs, pool, args, false);  // warm-up: every factor created and refreshed once
  for (int rep = 0; rep < args.repeats; ++rep) run_cycle(runs, pool, args, true);

  nlohmann::json out = nlohmann::json::array();
  const StateBytes fp32_bytes = state_bytes_for(shape, *variants(args).front(), args);
  const double fp32_ms = runs[0].timing.ms_per_step();
  std::printf("%-11s %9s %7s %-11s %14s %7s %-11s %12s\n", "variant", "ms/step", "x fp32", "time goal",
              "precond bytes", "x fp32", "state goal", "1st-order B");
  for (const Variant* variant : variants(args)) {
    const Variant& v = *variant;
    const Run* run = nullptr;
    for (const Run& r : runs)
      if (r.variant == &v) run = &r;
    const StateBytes bytes = state_bytes_for(shape, v, args);
    if (run && run->optimizer->state_bytes().preconditioner != bytes.preconditioner)
      std::printf("warning: %s state bytes changed during the run (%lld -> %lld)\n", v.name.c_str(),
                  static_cast<long long>(bytes.preconditioner),
                  static_cast<long long>(run->optimizer->state_bytes().preconditioner));
    const double state_ratio = static_cast<double>(bytes.preconditioner) / static_cast<double>(fp32_bytes.preconditioner);
    const double ms = run ? run->timing.ms_per_step() : 0.0;
    const double time_ratio = ms / fp32_ms;

    std::string time_goal, state_goal;
    if (v.name == "4bit") {
      const bool t = time_ratio <= kGoalTimeRatio, s = state_ratio <= kGoalStateRatio;
      time_goal = std::string("<=1.10 ") + mark(t);
      state_goal = std::string("<=0.16 ") + mark(s);
      char line[160];
      std::snprintf(line, sizeof line, "%-16s 4-bit step time  %.3f x fp32 (goal <= %.2f)  %s", name.c_str(),
                    time_ratio, kGoalTimeRatio, mark(t));
      goals.emplace_back(line);
      std::snprintf(line, sizeof line, "%-16s 4-bit state      %.4f x fp32 (goal <= %.2f)  %s", name.c_str(),
                    state_ratio, kGoalStateRatio, mark(s));
      goals.emplace_back(line);
    } else if (v.name == "4bit-dq") {
      const bool s = state_ratio <= kGoalStateRatioDoubleQ;
      state_goal = std::string("<=0.14 ") + mark(s);
      char line[160];
      std::snprintf(line, sizeof line, "%-16s 4-bit-dq state   %.4f x fp32 (goal <= %.2f)  %s", name.c_str(),
                    state_ratio, kGoalStateRatioDoubleQ, mark(s));
      goals.emplace_back(line);
    }
    if (run) {
      std::printf("%-11s %9.2f %7.3f %-11s %14s %7.4f %-11s %12s\n", v.name.c_str(), ms, time_ratio,
                  time_goal.c_str(), with_commas(bytes.preconditioner).c_str(), state_ratio, state_goal.c_str(),
                  with_commas(bytes.first_order).c_str());
    } else {
      std::printf("%-11s %9s %7s %-11s %14s %7.4f %-11s %12s\n", v.name.c_str(), "-", "-", "(not timed)",
                  with_commas(bytes.preconditioner).c_str(), state_ratio, state_goal.c_str(),
                  with_commas(bytes.first_order).c_str());
    }

    nlohmann::json row{{"shape", name},
                       {"matrix", {rows, cols}},
                       {"blocks", blocks},
                       {"variant", v.name},
                       {"bits", v.bits},
                       {"quantize", v.quantize},
                       {"double_quant_scales", v.double_quant_scales},
                       {"root_storage", v.root_storage},
                       {"preconditioner_bytes", bytes.preconditioner},
                       {"first_order_bytes", bytes.first_order},
                       {"preconditioner_ratio_vs_fp32", state_ratio},
                       {"timed", run != nullptr}};
    if (run) {
      const Timing& t = run->timing;
      row["ms_per_step"] = ms;
      row["time_ratio_vs_fp32"] = time_ratio;
      row["cycle_ms_per_step"] = t.cycle_ms_per_step;
      row["plain_step_ms"] = Timing::mean_ms(t.plain_s, t.plain_n);
      row["stat_step_ms"] = Timing::mean_ms(t.stat_s, t.stat_n);
      row["root_step_ms"] = Timing::mean_ms(t.root_s, t.root_n);
      row["projected_ms_per_step_paper_intervals"] =
          projected_ms(t, args, kPaperStatInterval, kPaperRootInterval);
      row["root_updates"] = run->optimizer->root_updates();
      row["root_failures"] = run->optimizer->root_failures();
    } else {
      row["ms_per_step"] = nullptr;
      row["time_ratio_vs_fp32"] = nullptr;
    }
    out.push_back(std::move(row));
  }

  // Where the time goes: mean time of each kind of step, and the mean per step with those
  // costs amortized over the paper's intervals instead (an extrapolation, not a measurement).
  std::printf("\n%-11s %11s %11s %11s %20s %7s\n", "variant", "plain ms", "+stats ms", "+root ms",
              "at T1=100,T2=500 ms", "x fp32");
  const double fp32_projected = projected_ms(runs[0].timing, args, kPaperStatInterval, kPaperRootInterval);
  for (const Run& r : runs) {
    const Timing& t = r.timing;
    const double projected = projected_ms(t, args, kPaperStatInterval, kPaperRootInterval);
    std::printf("%-11s %11.2f %11.2f %11.2f %20.2f %7.3f\n", r.variant->name.c_str(),
                Timing::mean_ms(t.plain_s, t.plain_n), Timing::mean_ms(t.stat_s, t.stat_n),
                Timing::mean_ms(t.root_s, t.root_n), projected, projected / fp32_projected);
    if (r.optimizer->root_failures() > 0)
      std::printf("warning: %s kept %lld failed root updates\n", r.variant->name.c_str(),
                  static_cast<long long>(r.optimizer->root_failures()));
  }
  std::fflush(stdout);
  return out;
}

void run(const BenchStepArgs& args) {
  TORCH_CHECK(args.stat_interval >= 1, "--stat-interval must be at least 1; got ", args.stat_interval);
  TORCH_CHECK(args.root_interval >= 1, "--root-interval must be at least 1; got ", args.root_interval);
  TORCH_CHECK(args.max_preconditioner_dim >= 1, "--max-preconditioner-dim must be at least 1; got ",
              args.max_preconditioner_dim);
  const std::vector<std::vector<int64_t>> shapes = parse_shapes(args.shapes);  // before any work
  at::manual_seed(args.seed);

  std::printf("lowbit bench step: Shampoo + AdamW graft, one parameter per shape, %d threads\n",
              at::get_num_threads());
  std::printf("T1 = %lld (statistics), T2 = %lld (inverse roots); the paper uses T1 = 100, T2 = 500.\n",
              static_cast<long long>(args.stat_interval), static_cast<long long>(args.root_interval));
  std::printf("Intervals are shortened so a CPU run finishes: compare the ratio to fp32, not absolute ms.\n");
  std::printf("ms/step: mean over %d full T2 cycle%s after one warm-up cycle (every factor refreshed once);\n",
              args.repeats, args.repeats == 1 ? "" : "s");
  std::printf("Variants run interleaved step by step; gradients come from a pool of %lld random tensors\n"
              "made before timing; max preconditioner dim %lld.\n",
              static_cast<long long>(kGradientPool), static_cast<long long>(args.max_preconditioner_dim));
  std::printf("Goals: 4-bit state <= %.2f x fp32, <= %.2f with double-quantized scales; 4-bit time <= %.2f x fp32.\n",
              kGoalStateRatio, kGoalStateRatioDoubleQ, kGoalTimeRatio);

  std::vector<std::string> goals;
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& shape : shapes)
    for (auto& row : bench_shape(shape, args, goals)) rows.push_back(std::move(row));

  std::printf("\nGoals:\n");
  for (const std::string& g : goals) std::printf("  %s\n", g.c_str());

  if (!args.json_path.empty()) {
    write_json(args.json_path, nlohmann::json{{"benchmark", "step"},
                                              {"graft", "adamw"},
                                              {"stat_interval", args.stat_interval},
                                              {"root_interval", args.root_interval},
                                              {"paper_stat_interval", kPaperStatInterval},
                                              {"paper_root_interval", kPaperRootInterval},
                                              {"max_preconditioner_dim", args.max_preconditioner_dim},
                                              {"repeats", args.repeats},
                                              {"seed", args.seed},
                                              {"threads", at::get_num_threads()},
                                              {"goals",
                                               {{"state_ratio_4bit", kGoalStateRatio},
                                                {"state_ratio_4bit_dq", kGoalStateRatioDoubleQ},
                                                {"time_ratio_4bit", kGoalTimeRatio}}},
                                              {"results", rows}});
    std::printf("\nwrote %s\n", args.json_path.c_str());
  }
}

}  // namespace

void add_bench_step(CLI::App& bench) {
  auto args = std::make_shared<BenchStepArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "step", "Shampoo step time over a T2 cycle and preconditioner memory, 4-bit vs fp32");
  cmd->add_option("--shapes", args->shapes, "Comma-separated parameter shapes, e.g. 1024x1024,256x256x3x3")
      ->capture_default_str();
  cmd->add_option("--stat-interval", args->stat_interval, "T1: steps between statistics updates (paper: 100)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--root-interval", args->root_interval, "T2: steps between inverse-root updates (paper: 500)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--max-preconditioner-dim", args->max_preconditioner_dim, "Largest factor order (paper: 1200)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--repeats", args->repeats, "Timed T2 cycles per variant (after one warm-up cycle)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the parameters and gradients")->capture_default_str();
  cmd->add_flag("--eigen-form", args->eigen_form,
                "Also time 4- and 8-bit eigenvectors with eigen-form roots (root_storage = \"eigen\")");
  cmd->add_option("--json", args->json_path, "Also write the results to this JSON file");
  cmd->callback([args] { run(*args); });
}

}  // namespace lowbit::cli
