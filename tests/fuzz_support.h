// Seeded case generation for the fuzz tests (codec_fuzz_test.cpp, checkpoint_fuzz_test.cpp).
//
// Case i of a run draws everything from its own seed, splitmix64(base + i), so a case is
// reproduced from its seed alone, whatever ran before it:
//   LOWBIT_FUZZ_SEED=0x...   run only the case with that seed (as printed by a failure)
//   LOWBIT_FUZZ_CASES=n      run n cases instead of the test's default (longer local runs)
// A failing case names its seed in the gtest failure (SCOPED_TRACE); a case that crashes
// (signal, sanitizer report) prints it from a handler before the process dies.
#pragma once

#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <unistd.h>

// Under AddressSanitizer (GCC's macro, or Clang's feature test) a report ends the process
// through the sanitizer's death callback rather than a signal.
#if defined(__SANITIZE_ADDRESS__)
#define LOWBIT_FUZZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LOWBIT_FUZZ_ASAN 1
#endif
#endif
#ifdef LOWBIT_FUZZ_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace lowbit::testing {

#ifdef LOWBIT_FUZZ_ASAN
constexpr bool kUnderAddressSanitizer = true;
#else
constexpr bool kUnderAddressSanitizer = false;
#endif

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// The random source of one case, with the few draws the generators need.
class CaseRng {
 public:
  explicit CaseRng(uint64_t seed) : engine_(seed) {}
  int64_t between(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(engine_);
  }
  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(engine_) < p; }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(engine_); }
  uint64_t bits() { return engine_(); }
  template <typename T>
  const T& one_of(const std::vector<T>& v) {
    return v[static_cast<size_t>(between(0, static_cast<int64_t>(v.size()) - 1))];
  }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

namespace fuzz_detail {
// The line a crash handler prints: written before each case, read in a signal handler.
inline char crash_line[160] = "fuzz: no case running\n";
inline void print_crash_line() {
  const ssize_t unused = ::write(2, crash_line, std::strlen(crash_line));
  (void)unused;
}
inline void on_signal(int sig) {
  print_crash_line();
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
inline void install_crash_handlers() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  for (int sig : {SIGSEGV, SIGABRT, SIGFPE, SIGBUS, SIGILL}) std::signal(sig, on_signal);
#ifdef LOWBIT_FUZZ_ASAN
  __sanitizer_set_death_callback(print_crash_line);
#endif
}
inline const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}
}  // namespace fuzz_detail

// One intra-op thread for the life of the guard (see run_fuzz).
class OneThread {
 public:
  OneThread() : threads_(at::get_num_threads()) { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(threads_); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int threads_;
};

// Failures (and other test part results) recorded so far in the running test.
inline int failure_parts() {
  return ::testing::UnitTest::GetInstance()->current_test_info()->result()->total_part_count();
}

// Runs `body(seed)` for `default_cases` seeded cases (or as the environment says), each
// under a SCOPED_TRACE naming its seed, stopping early after `max_failing` failing cases.
// Prints and records (gtest property "cases") how many ran. Returns that number.
// The cases run on one intra-op thread: their tensors are tiny, and with more threads the
// time goes to OpenMP workers spin-waiting between regions (8x slower on a busy machine).
inline int64_t run_fuzz(const char* name, uint64_t base_seed, int64_t default_cases,
                        const std::function<void(uint64_t seed)>& body, int max_failing = 5) {
  fuzz_detail::install_crash_handlers();
  int64_t cases = default_cases;
  if (const char* n = fuzz_detail::env("LOWBIT_FUZZ_CASES")) cases = std::strtoll(n, nullptr, 0);
  const char* only = fuzz_detail::env("LOWBIT_FUZZ_SEED");
  const OneThread one_thread;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t ran = 0;
  int failing = 0;
  for (int64_t i = 0; i < (only ? 1 : cases); ++i) {
    const uint64_t seed = only ? std::strtoull(only, nullptr, 0) : splitmix64(base_seed + static_cast<uint64_t>(i));
    std::snprintf(fuzz_detail::crash_line, sizeof fuzz_detail::crash_line,
                  "\nfuzz: %s crashed in case %lld, seed %s (rerun: LOWBIT_FUZZ_SEED=%s)\n", name,
                  static_cast<long long>(i), hex(seed).c_str(), hex(seed).c_str());
    SCOPED_TRACE(std::string(name) + " case " + std::to_string(i) + ", seed " + hex(seed) +
                 " (rerun: LOWBIT_FUZZ_SEED=" + hex(seed) + ")");
    const int parts_before = failure_parts();
    try {
      body(seed);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "unexpected exception escaped the case: " << e.what();
    }
    ++ran;
    if (failure_parts() > parts_before && ++failing >= max_failing) {
      ADD_FAILURE() << name << ": stopping after " << failing << " failing cases";
      break;
    }
  }
  std::snprintf(fuzz_detail::crash_line, sizeof fuzz_detail::crash_line, "fuzz: no case running\n");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << name << ": " << ran << " cases (base seed " << hex(base_seed) << ", " << seconds << " s)" << std::endl;
  ::testing::Test::RecordProperty("cases", std::to_string(ran));
  return ran;
}

// What a case that expects an error got: the message of the c10::Error, or why there was
// none. Any other exception type is reported as a failure by the caller.
struct Outcome {
  bool threw = false;
  bool c10 = false;
  std::string message;
};

inline Outcome outcome_of(const std::function<void()>& fn) {
  Outcome o;
  try {
    fn();
  } catch (const c10::Error& e) {
    o.threw = o.c10 = true;
    o.message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    o.threw = true;
    o.message = e.what();
  }
  return o;
}

}  // namespace lowbit::testing
