#include "train/lr_schedule.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace lowbit::train {

void LrSchedule::validate() const {
  TORCH_CHECK(kind == "constant" || kind == "cosine" || kind == "multistep",
              "--schedule must be constant, cosine or multistep; got \"", kind, "\"");
  TORCH_CHECK(base_lr > 0, "--lr must be > 0; got ", base_lr);
  TORCH_CHECK(warmup_steps >= 0, "warm-up must be >= 0 steps; got ", warmup_steps);
  TORCH_CHECK(total_steps >= 1, "a run needs at least one step");
  TORCH_CHECK(gamma > 0, "--gamma must be > 0; got ", gamma);
  for (size_t i = 1; i < milestones.size(); ++i)
    TORCH_CHECK(milestones[i] > milestones[i - 1], "--milestones must be increasing");
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps) return base_lr * static_cast<double>(step + 1) / warmup_steps;
  if (kind == "cosine") {
    const double span = std::max<int64_t>(1, total_steps - warmup_steps);
    const double progress = std::min(1.0, (step - warmup_steps) / span);
    return 0.5 * base_lr * (1 + std::cos(M_PI * progress));
  }
  if (kind == "multistep") {
    const auto passed = std::upper_bound(milestones.begin(), milestones.end(), step) - milestones.begin();
    return base_lr * std::pow(gamma, static_cast<double>(passed));
  }
  return base_lr;
}

}  // namespace lowbit::train
