// `lowbit train`: train a model with one optimizer and print a summary. With no arguments
// it is the README's main job: a small CNN on Fashion-MNIST with 4-bit Shampoo.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "cli/json_output.h"
#include "cli/launch.h"
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
  std::printf("  arithmetic           %s: layers kept %s for backward per batch (fp32: %s)\n",
              arith::describe(c.arithmetic).c_str(), megabytes(r.activation_bytes_kept).c_str(),
              megabytes(r.activation_bytes_fp32).c_str());
  if (c.arith_fp32_epochs > 0 && c.arithmetic.mode != arith::Mode::Fp32)
    std::printf("                       then fp32 for the last %lld epoch(s) (high-precision fine-tuning)\n",
                static_cast<long long>(c.arith_fp32_epochs));
  if (train::is_shampoo_family(c.optimizer))
    std::printf("  root updates         %lld (T1 = %lld, T2 = %lld)\n", static_cast<long long>(r.root_updates),
                static_cast<long long>(c.shampoo.stat_interval()), static_cast<long long>(c.shampoo.root_interval()));
  std::printf("  wall time            %.1f s (%lld steps, %d threads)\n", r.wall_s, static_cast<long long>(r.steps),
              at::get_num_threads());
  if (r.world_size > 1)
    std::printf("  data parallel        %d processes (Gloo, loopback); parameters bit-identical on every rank: %s\n"
                "  communication        preconditioner state %s in %lld exchanges, gradients %s (rank 0)\n",
                r.world_size, r.ranks_agree ? "yes" : "NO", megabytes(r.communication.state_bytes).c_str(),
                static_cast<long long>(r.communication.exchanges), megabytes(r.communication.gradient_bytes).c_str());
}

}  // namespace

void add_train(CLI::App& app) {
  auto config = std::make_shared<train::TrainConfig>();
  auto json_path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("train", "Train a model with one optimizer (no arguments: the README's main job)");
  const OptimizerOptionsFor options_for = add_train_options(*cmd, *config, /*with_optimizer=*/true);
  cmd->add_option("--json", *json_path, "Write the run's results (summary and history) to this JSON file");
  train::DistributedRun& dist = config->distributed;
  cmd->add_option("--nproc", dist.world_size, "Data-parallel over N local processes (Gloo on loopback; Shampoo "
                  "optimizers share the preconditioner work)")->check(CLI::Range(1, 64))->capture_default_str();
  cmd->add_option("--dist-timeout", dist.timeout_s, "Seconds a rank waits for the others before failing")
      ->check(CLI::PositiveNumber)->capture_default_str();
  // Set by the launcher on the rank processes it starts.
  CLI::Option* rank = cmd->add_option("--rank", dist.rank)->group("");
  cmd->add_option("--port", dist.port)->group("");
  cmd->callback([config, json_path, options_for, rank] {
    config->shampoo = options_for(config->optimizer);
    const train::DistributedRun& dist = config->distributed;
    if (dist.world_size > 1 && rank->count() == 0) {
      config->validate();  // refuse bad options once, before starting any rank
      std::printf("lowbit train: starting %d rank processes\n", dist.world_size);
      std::fflush(stdout);
      const int status = run_local_ranks(dist.world_size, dist.timeout_s);
      if (status != 0) throw std::runtime_error("a rank process failed (see above)");
      return;
    }
    TORCH_CHECK(dist.rank >= 0 && dist.rank < dist.world_size, "--rank must be in [0, ", dist.world_size, "); got ",
                dist.rank);
    if (dist.rank != 0) {
      train::run_training(*config, std::cout);  // rank 0 reports for everyone
      return;
    }
    std::printf("lowbit train: %s on %s with %s, %lld epochs, batch %lld, lr %g (%s)\n", config->model.c_str(),
                config->dataset.c_str(), config->optimizer.c_str(), static_cast<long long>(config->epochs),
                static_cast<long long>(config->batch_size), config->shampoo.lr(), config->schedule.c_str());
    std::fflush(stdout);
    const train::TrainResult result = train::run_training(*config, std::cout);
    print_summary(*config, result);
    if (!json_path->empty()) {
      write_json(*json_path, train::to_json(*config, result));
      std::printf("  results              %s\n", json_path->c_str());
    }
  });
}

}  // namespace lowbit::cli
