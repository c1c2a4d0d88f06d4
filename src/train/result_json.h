// The JSON record of a training run (shared by `lowbit train` and `lowbit compare`).
#pragma once

#include <nlohmann/json.hpp>

#include "train/trainer.h"

namespace lowbit::train {

nlohmann::json to_json(const TrainConfig& config, const TrainResult& result);

}  // namespace lowbit::train
