// Learning-rate schedules for `lowbit train`: a pure function of the step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lowbit::train {

struct LrSchedule {
  std::string kind = "cosine";        // "constant" | "cosine" | "multistep"
  double base_lr = 1e-3;
  int64_t warmup_steps = 0;           // linear ramp from base_lr / warmup_steps
  int64_t total_steps = 1;            // cosine decays to 0 at total_steps
  std::vector<int64_t> milestones;    // multistep: steps where lr is multiplied by gamma
  double gamma = 0.1;

  void validate() const;
  // Learning rate for step (0-based) of the run.
  double at(int64_t step) const;
};

}  // namespace lowbit::train
