// Wall-clock timing for the `lowbit bench` commands: the median of repeated runs.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace lowbit::cli {

// Runs `fn` `warmup` times untimed, then `repeats` times, and returns the median seconds.
template <typename Fn>
double median_seconds(Fn&& fn, int repeats, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> seconds;
  seconds.reserve(repeats);
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(seconds.begin(), seconds.begin() + seconds.size() / 2, seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace lowbit::cli
