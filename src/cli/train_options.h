// Command-line options of a training run, shared by `lowbit train` and `lowbit compare`.
#pragma once

#include <CLI/CLI.hpp>

#include "train/trainer.h"

namespace lowbit::cli {

// Registers every TrainConfig option on `cmd` (the optimizer name only when asked:
// `compare` takes a list instead). After parsing, the returned function gives the
// optimizer options for an optimizer name: the learning rate defaults to 0.05 when the
// first-order rule is SGD with momentum and to 1e-3 for AdamW.
using OptimizerOptionsFor = std::function<ShampooOptions(const std::string& optimizer)>;
OptimizerOptionsFor add_train_options(CLI::App& cmd, train::TrainConfig& config, bool with_optimizer);

}  // namespace lowbit::cli
