// The training loop behind `lowbit train` and `lowbit compare`.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include <lowbit/arith.h>
#include <lowbit/shampoo.h>

#include "train/data_parallel.h"
#include "train/lr_schedule.h"
#include "train/optimizer_factory.h"

namespace lowbit::data {
struct Dataset;
}
namespace lowbit::models {
struct Classifier;
}

namespace lowbit::train {

struct TrainConfig {
  std::string dataset = "fashion-mnist";
  std::string data_dir;               // empty: the dataset's default location
  int64_t max_train = -1, max_test = -1;  // use only the first examples (quick runs, tests)
  std::string model = "cnn";
  std::string optimizer = "shampoo4";
  ShampooOptions shampoo;             // lr, momentum, betas, weight decay and Shampoo's options
  SecondOrderSettings second_order;   // Sophia, AdaHessian, M-FAC and NAG-GS knobs
  arith::ArithOptions arithmetic;     // the layers' arithmetic (fp32, luq4, fqt1, rmm); its seed comes from `seed`
  int64_t arith_fp32_epochs = 0;      // the last N epochs in fp32 arithmetic (LUQ's high-precision fine-tuning)
  int64_t epochs = 2;
  int64_t batch_size = 128;
  std::string schedule = "cosine";    // constant | cosine | multistep
  double warmup_epochs = 0.0;
  std::vector<int64_t> milestones;    // multistep, in epochs
  double gamma = 0.1;
  uint64_t seed = 0;
  int threads = 0;                    // 0: LibTorch's default
  std::string checkpoint_dir;         // save model + optimizer + progress after every epoch
  bool resume = false;                // continue from checkpoint_dir
  int64_t stop_after_epoch = 0;       // end the run early (the schedule still spans `epochs`); 0: no
  bool progress = true;               // progress bar on a terminal
  std::string dump_preconditioner;    // save the largest preconditioner statistic here
  std::string save_model;             // save the trained model here (save_trained_model's file)
  DistributedRun distributed;         // this process's place in `--nproc` data-parallel training

  void validate() const;
};

struct EpochRecord {
  int64_t epoch = 0;
  double train_loss = 0, test_accuracy = 0, seconds = 0, lr = 0;
  int64_t steps = 0;
};

struct TrainResult {
  std::string dataset, dataset_source;
  bool synthetic = false;
  std::vector<EpochRecord> history;
  std::vector<double> step_losses;    // training loss of every step of this run
  double test_accuracy = 0, final_train_loss = 0;
  StateBytes state;
  double step_ms_mean = 0;            // optimizer.step() alone
  double batch_ms_mean = 0;           // forward + backward + step
  // Activations the linear and conv layers kept for backward in the largest batch, and what
  // fp32 layers would have kept (lowbit/arith.h).
  int64_t activation_bytes_kept = 0, activation_bytes_fp32 = 0;
  double wall_s = 0;
  int64_t steps = 0, root_updates = 0, resumed_from_epoch = 0;
  int world_size = 1;
  CommunicationStats communication;   // this rank's optimizer traffic (distributed runs)
  bool ranks_agree = true;            // every rank ended with bit-identical parameters
};

// The trained model's file (`lowbit train --save-model`): the model's parameters and buffers
// (torch::nn::Module::save) plus "lowbit_model" / "lowbit_dataset" strings, which
// load_trained_model checks against what the caller builds.
void save_trained_model(const std::string& path, const TrainConfig& config, models::Classifier& model);
void load_trained_model(const std::string& path, const std::string& model_name, const std::string& dataset,
                        models::Classifier& model);

// Top-1 accuracy of `model` on `test` in eval mode (the model is left in train mode).
double evaluate_accuracy(models::Classifier& model, const data::Dataset& test);

// Trains, printing one line per epoch (and a progress bar on a terminal) to `log`. In a
// distributed run every rank calls it; only rank 0 logs, evaluates and saves checkpoints.
TrainResult run_training(const TrainConfig& config, std::ostream& log);

}  // namespace lowbit::train
