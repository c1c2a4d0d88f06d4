// A one-line progress bar with rate and ETA, drawn on stderr when it is a terminal.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace lowbit::train {

class ProgressBar {
 public:
  ProgressBar(int64_t total, std::string label, bool enabled);
  void update(int64_t done, double loss);
  void finish();

 private:
  int64_t total_;
  std::string label_;
  bool enabled_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace lowbit::train
