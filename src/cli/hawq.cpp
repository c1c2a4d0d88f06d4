// `lowbit hawq`: Hessian-aware mixed-precision quantization of a model saved by
// `lowbit train --save-model`: per-layer Hessian traces (Hutchinson, with confidence
// intervals), the exact allocation under each byte budget, and the test accuracy of the
// quantized model without retraining, next to the uniform and size-only allocations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>

#include <lowbit/hawq.h>

#include "cli/commands.h"
#include "cli/json_output.h"
#include "data/dataset.h"
#include "models/models.h"
#include "train/trainer.h"

namespace lowbit::cli {
namespace {

struct HawqArgs {
  std::string model = "cnn", checkpoint, dataset = "fashion-mnist", data_dir, json_path, scaling = "block";
  std::string mapping = "linear";
  std::vector<double> budgets_mb;
  std::vector<int64_t> widths{3, 4, 8};
  std::vector<std::string> methods{"hawq"};
  int64_t block_size = 64, batches = 4, batch_size = 128, max_test = -1, min_probes = 16, max_probes = 256;
  double rel_tol = 0.1, confidence = 0.95;
  bool pin_edges = true, eigenvalues = false;
  uint64_t seed = 0;
  int threads = 0;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

nlohmann::json allocation_json(const hawq::Allocation& a, double accuracy) {
  nlohmann::json layers = nlohmann::json::array();
  for (const hawq::LayerChoice& c : a.layers)
    layers.push_back({{"name", c.name}, {"numel", c.numel}, {"trace", std::isnan(c.trace) ? nlohmann::json() : nlohmann::json(c.trace)},
                      {"bits", c.bits}, {"bytes", c.bytes}, {"omega", std::isnan(c.omega) ? nlohmann::json() : nlohmann::json(c.omega)}});
  return {{"method", a.method}, {"budget_bytes", a.budget_bytes}, {"total_bytes", a.total_bytes()},
          {"weight_bytes", a.weight_bytes()}, {"fixed_bytes", a.fixed_bytes}, {"test_accuracy", accuracy},
          {"layers", layers}};
}

void print_allocation(const hawq::Allocation& a, double accuracy) {
  std::printf("\n%s, budget %lld bytes: total %lld bytes (weights %lld + unquantized %lld), test accuracy %.4f\n",
              a.method.c_str(), static_cast<long long>(a.budget_bytes), static_cast<long long>(a.total_bytes()),
              static_cast<long long>(a.weight_bytes()), static_cast<long long>(a.fixed_bytes), accuracy);
  std::printf("  %-28s %9s %12s %4s %10s %11s\n", "layer", "params", "trace", "bits", "bytes", "omega");
  for (const hawq::LayerChoice& c : a.layers)
    std::printf("  %-28s %9lld %12.4g %4lld %10lld %11.4g\n", c.name.c_str(), static_cast<long long>(c.numel), c.trace,
                static_cast<long long>(c.bits), static_cast<long long>(c.bytes), c.omega);
}

void run(const HawqArgs& args) {
  const auto start = std::chrono::steady_clock::now();
  if (args.threads > 0) at::set_num_threads(args.threads);
  TORCH_CHECK(!args.budgets_mb.empty(), "--budget-mb: give at least one budget in MB (1 MB = 1e6 bytes)");
  for (double mb : args.budgets_mb)
    TORCH_CHECK(mb > 0 && std::isfinite(mb), "--budget-mb: each budget must be a positive number of MB; got ", mb);
  for (const std::string& m : args.methods) {
    const auto& known = hawq::allocation_methods();
    TORCH_CHECK(std::count(known.begin(), known.end(), m) > 0, "--methods: ", m, " is not one of hawq, size, "
                "weight-error, uniform");
  }
  TORCH_CHECK(args.batches >= 1 && args.batch_size >= 1, "--batches and --batch-size must be >= 1; got ",
              args.batches, " and ", args.batch_size);
  hawq::PlanOptions plan_options;
  plan_options.widths = args.widths;
  plan_options.pin_edges = args.pin_edges;
  plan_options.scaling = args.scaling;
  plan_options.block_size = args.block_size;
  plan_options.mapping = parse_mapping(args.mapping);
  plan_options.validate();
  hawq::TraceOptions trace_options;
  trace_options.rel_tol = args.rel_tol;
  trace_options.confidence = args.confidence;
  trace_options.min_probes = args.min_probes;
  trace_options.max_probes = args.max_probes;
  trace_options.seed = args.seed;
  trace_options.validate();

  std::ostringstream data_log;
  const data::DatasetSplit data = data::load_dataset(args.dataset, args.data_dir, data_log, -1, args.max_test);
  std::cout << data_log.str();
  auto model = models::make_model(args.model, data.train.images.size(1), data.train.images.size(2), data.num_classes);
  train::load_trained_model(args.checkpoint, args.model, args.dataset, *model);
  model->eval();  // the curvature of the loss the quantized model is judged by (BatchNorm's running statistics)
  const double fp32_accuracy = train::evaluate_accuracy(*model, data.test);
  model->eval();
  std::printf("lowbit hawq: %s from %s on %s; fp32 test accuracy %.4f (%lld test images)\n", args.model.c_str(),
              args.checkpoint.c_str(), data.name.c_str(), fp32_accuracy, static_cast<long long>(data.test.size()));

  // Refuse a budget below the smallest model before the (slow) curvature.
  hawq::Plan plan = hawq::make_plan(*model, plan_options);
  for (double mb : args.budgets_mb)
    TORCH_CHECK(std::llround(mb * 1e6) >= plan.minimum_bytes(), "--budget-mb ", mb, " is below the smallest model ",
                "these options can make, ", plan.minimum_bytes() / 1e6, " MB (", plan.minimum_bytes(), " bytes: every "
                "layer at ", plan.widths.front(), " bits", args.pin_edges ? ", first and last at 8" : "", ", plus ",
                plan.fixed_bytes, " bytes of unquantized parameters)");

  std::printf("smallest model %lld bytes; uniform widths:", static_cast<long long>(plan.minimum_bytes()));
  for (size_t j = 0; j < plan.widths.size(); ++j) {
    int64_t total = plan.fixed_bytes;
    for (size_t i = 0; i < plan.names.size(); ++i) {
      const auto allowed = plan.options_of(i);
      total += plan.bytes[i][std::count(allowed.begin(), allowed.end(), static_cast<int>(j)) ? j : allowed.front()];
    }
    std::printf(" %lld bits %lld bytes;", static_cast<long long>(plan.widths[j]), static_cast<long long>(total));
  }
  std::printf(" fp32 %lld bytes\n", static_cast<long long>([&] {
                int64_t total = plan.fixed_bytes;
                for (int64_t n : plan.numel) total += 4 * n;
                return total;
              }()));
  std::fflush(stdout);  // the curvature takes minutes: show what is known so far

  // The curvature batches: the first --batches of a seeded shuffle of the training set.
  std::vector<data::Batch> batches;
  data::BatchIterator it(data.train, args.batch_size, /*shuffle=*/true, args.seed);
  for (data::Batch b; static_cast<int64_t>(batches.size()) < args.batches && it.next(b);) batches.push_back(b);
  const hawq::BatchLoss loss = [&](int64_t b) {
    return torch::nn::functional::cross_entropy(model->forward(batches[b].images), batches[b].labels);
  };
  std::vector<at::Tensor> weights;
  std::vector<std::string> names;
  for (const hawq::QuantizableLayer& layer : hawq::quantizable_layers(*model)) {
    weights.push_back(layer.weight);
    names.push_back(layer.name);
  }
  const auto trace_start = std::chrono::steady_clock::now();
  const std::vector<hawq::LayerTrace> traces =
      hawq::layer_traces(weights, names, static_cast<int64_t>(batches.size()), loss, trace_options);
  const double trace_seconds = seconds_since(trace_start);
  for (const hawq::LayerTrace& t : traces) plan.traces.push_back(t.trace);

  std::printf("\nHessian traces (Hutchinson, %lld probes over %zu batches of %lld, %.0f%% intervals, %s; %.1f s)\n",
              static_cast<long long>(traces.front().probes), batches.size(), static_cast<long long>(args.batch_size),
              100 * args.confidence, traces.front().converged ? "converged" : "NOT converged: --max-probes reached",
              trace_seconds);
  std::printf("  %-28s %9s %12s %25s %12s\n", "layer", "params", "trace", "interval", "trace/n");
  nlohmann::json trace_json = nlohmann::json::array();
  for (const hawq::LayerTrace& t : traces) {
    std::printf("  %-28s %9lld %12.4g [%11.4g, %11.4g] %12.4g\n", t.name.c_str(), static_cast<long long>(t.numel),
                t.trace, t.low, t.high, t.trace / t.numel);
    trace_json.push_back({{"name", t.name}, {"numel", t.numel}, {"trace", t.trace}, {"stderr", t.stderr_of_mean},
                          {"low", t.low}, {"high", t.high}, {"probes", t.probes}, {"converged", t.converged}});
  }
  nlohmann::json eigen_json = nlohmann::json::array();
  if (args.eigenvalues) {
    const auto eigen_start = std::chrono::steady_clock::now();
    const auto eig = hawq::top_eigenvalues(weights, names, static_cast<int64_t>(batches.size()), loss, 1e-3, 100,
                                           args.seed);
    std::printf("\ntop Hessian eigenvalues (HAWQ-V1, power iteration; %.1f s)\n", seconds_since(eigen_start));
    for (const auto& e : eig) {
      std::printf("  %-28s %12.4g  (residual %.2g, %lld iterations)\n", e.name.c_str(), e.value, e.residual,
                  static_cast<long long>(e.iterations));
      eigen_json.push_back({{"name", e.name}, {"value", e.value}, {"residual", e.residual}, {"iterations", e.iterations}});
    }
  }
  // Each allocation is applied to a copy of the trained weights, restored afterwards.
  std::vector<at::Tensor> originals;
  for (const at::Tensor& w : weights) originals.push_back(w.detach().clone());
  nlohmann::json results = nlohmann::json::array();
  for (double mb : args.budgets_mb) {
    const int64_t budget = std::llround(mb * 1e6);
    for (const std::string& method : args.methods) {
      const hawq::Allocation a = plan.allocate(budget, method);
      hawq::apply(*model, a, plan_options);
      const double accuracy = train::evaluate_accuracy(*model, data.test);
      model->eval();
      print_allocation(a, accuracy);
      std::fflush(stdout);
      results.push_back(allocation_json(a, accuracy));
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < weights.size(); ++i) weights[i].copy_(originals[i]);
    }
  }
  std::printf("\nwall time %.1f s (%d threads)\n", seconds_since(start), at::get_num_threads());
  if (!args.json_path.empty()) {
    write_json(args.json_path,
               {{"command", "hawq"}, {"model", args.model}, {"checkpoint", args.checkpoint}, {"dataset", data.name},
                {"fp32_test_accuracy", fp32_accuracy}, {"widths", plan.widths}, {"scaling", args.scaling},
                {"block_size", args.block_size}, {"mapping", args.mapping}, {"pin_edges", args.pin_edges},
                {"batches", batches.size()}, {"batch_size", args.batch_size}, {"trace_seconds", trace_seconds},
                {"minimum_bytes", plan.minimum_bytes()}, {"traces", trace_json}, {"eigenvalues", eigen_json},
                {"allocations", results}});
    std::printf("results: %s\n", args.json_path.c_str());
  }
}

}  // namespace

void add_hawq(CLI::App& app) {
  auto a = std::make_shared<HawqArgs>();
  CLI::App* cmd = app.add_subcommand("hawq", "Hessian-aware mixed-precision quantization of a trained model "
                                     "(HAWQ-V2): per-layer widths under a byte budget, and the test accuracy");
  cmd->add_option("--model", a->model, "mlp | cnn | resnet20 | vit (as trained)")->capture_default_str();
  cmd->add_option("--checkpoint", a->checkpoint, "The model file of `lowbit train --save-model`")->required();
  cmd->add_option("--budget-mb", a->budgets_mb, "Model size budgets in MB (1e6 bytes; comma-separated): quantized "
                  "weights plus the unquantized parameters")->required()->delimiter(',');
  cmd->add_option("--json", a->json_path, "Write traces and allocations (layer, trace, bits, bytes, accuracy) here");
  cmd->add_option("--methods", a->methods, "Allocations to make and evaluate: hawq (Tr(H)/n * ||Q(W)-W||^2), size "
                  "(layer size alone), weight-error (||Q(W)-W||^2), uniform")->delimiter(',')->capture_default_str();
  cmd->add_option("--widths", a->widths, "Candidate bit widths (the codec's: 3, 4, 8)")->delimiter(',')
      ->capture_default_str();
  cmd->add_flag("!--no-pin-edges", a->pin_edges, "Let the first and last layer take any width (default: 8 bits)");
  cmd->add_option("--scaling", a->scaling, "block (one fp32 absmax per --block-size elements of a row) | channel "
                  "(one per output channel)")->capture_default_str();
  cmd->add_option("--block-size", a->block_size, "Elements per scale with --scaling block")->capture_default_str();
  cmd->add_option("--mapping", a->mapping, "Code table: linear | linear2 | dynamic")->capture_default_str();
  cmd->add_option("--dataset", a->dataset, "Dataset the model was trained on")->capture_default_str();
  cmd->add_option("--data-dir", a->data_dir, "Directory of the dataset files");
  cmd->add_option("--max-test", a->max_test, "Evaluate on the first N test examples only");
  cmd->add_option("--batches", a->batches, "Training batches the Hessian traces average over")->capture_default_str();
  cmd->add_option("--batch-size", a->batch_size, "Their size")->capture_default_str();
  cmd->add_option("--rel-tol", a->rel_tol, "Stop probing when every interval's half-width is within this fraction "
                  "of its trace")->capture_default_str();
  cmd->add_option("--confidence", a->confidence, "Level of the trace intervals")->capture_default_str();
  cmd->add_option("--min-probes", a->min_probes, "Hutchinson probes at least")->capture_default_str();
  cmd->add_option("--max-probes", a->max_probes, "Hutchinson probes at most")->capture_default_str();
  cmd->add_flag("--eigenvalues", a->eigenvalues, "Also report each layer's top Hessian eigenvalue (HAWQ-V1, power "
                "iteration)");
  cmd->add_option("--seed", a->seed, "Seed of the probes and of the batch choice")->capture_default_str();
  cmd->add_option("--threads", a->threads, "CPU threads (0: LibTorch's default)")->capture_default_str();
  cmd->callback([a] { run(*a); });
}

}  // namespace lowbit::cli
