// `lowbit train`: train a model with one optimizer and print a summary. With no arguments
// it is the README's main job: a small CNN on Fashion-MNIST with 4-bit Shampoo.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "cli/train_options.h"
#include "train/result_json.h"

namespace lowbit::cli {
namespace {

std::string megabytes(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f MB", bytes / 1e6);
  return text;
}

void print_summary(const train::TrainConfig& c, const train::TrainResult& r) {
  std::printf("\nsummary\n");
  std::printf("  data                 %s (%s)%s\n", r.dataset.c_str(), r.dataset_source.c_str(),
              r.synthetic ? "  [synthetic: the real dataset was not found]" : "");
  std::printf("  model / optimizer    %s / %s\n", c.model.c_str(), c.optimizer.c_str());
  std::printf("  test accuracy        %.4f\n", r.test_accuracy);
  std::printf("  final train loss     %.4f\n", r.final_train_loss);
  std::printf("  optimizer state      %s (preconditioner %s, first-order %s)\n", megabytes(r.state.total()).c_str(),
              megabytes(r.state.preconditioner).c_str(), megabytes(r.state.first_order).c_str());
  std::printf("  optimizer step       %.2f ms mean (whole batch %.2f ms)\n", r.step_ms_mean, r.batch_ms_mean);
  if (c.optimizer.rfind("shampoo", 0) == 0)
    std::printf("  root updates         %lld (T1 = %lld, T2 = %lld)\n", static_cast<long long>(r.root_updates),
                static_cast<long long>(c.shampoo.stat_interval()), static_cast<long long>(c.shampoo.root_interval()));
  std::printf("  wall time            %.1f s (%lld steps, %d threads)\n", r.wall_s, static_cast<long long>(r.steps),
              at::get_num_threads());
}

}  // namespace

void add_train(CLI::App& app) {
  auto config = std::make_shared<train::TrainConfig>();
  auto json_path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("train", "Train a model with one optimizer (no arguments: the README's main job)");
  const OptimizerOptionsFor options_for = add_train_options(*cmd, *config, /*with_optimizer=*/true);
  cmd->add_option("--json", *json_path, "Write the run's results (summary and history) to this JSON file");
  cmd->callback([config, json_path, options_for] {
    config->shampoo = options_for(config->optimizer);
    std::printf("lowbit train: %s on %s with %s, %lld epochs, batch %lld, lr %g (%s)\n", config->model.c_str(),
                config->dataset.c_str(), config->optimizer.c_str(), static_cast<long long>(config->epochs),
                static_cast<long long>(config->batch_size), config->shampoo.lr(), config->schedule.c_str());
    std::fflush(stdout);
    const train::TrainResult result = train::run_training(*config, std::cout);
    print_summary(*config, result);
    if (!json_path->empty()) {
      std::ofstream out(*json_path);
      TORCH_CHECK(out, "--json: cannot write ", *json_path);
      out << train::to_json(*config, result).dump(2) << "\n";
      std::printf("  results              %s\n", json_path->c_str());
    }
  });
}

}  // namespace lowbit::cli
