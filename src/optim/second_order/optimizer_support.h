// What lowbit's torch::optim::Optimizer subclasses (beside Shampoo) share: gradient checks
// before anything changes, option checks with named errors, and checkpoint loading that
// validates everything before it replaces the state.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "optim/checkpoint_reader.h"

namespace lowbit::support {

// Throws (naming `who`, the parameter and group) if a gradient is sparse, not floating,
// shaped unlike its parameter, or holds NaN/Inf. Called before any update, so a bad
// gradient leaves the optimizer and the parameters untouched.
void check_gradients(const torch::optim::Optimizer& optimizer, const std::string& who);

// Checks each group's options with `validate` (which throws naming the option).
template <typename Options>
void validate_groups(const torch::optim::Optimizer& optimizer) {
  for (const auto& group : optimizer.param_groups()) static_cast<const Options&>(group.options()).validate();
}

// The loss from `closure` evaluated with autograd on (an undefined tensor without one).
torch::Tensor evaluate(const torch::optim::Optimizer::LossClosure& closure);

// The options every Adam-style rule has: lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0.
void check_adam_options(const std::string& prefix, double lr, const std::tuple<double, double>& betas, double eps,
                        double weight_decay);

// Throws naming the first option of `options` that is NaN or +-Inf.
void check_finite_options(const std::string& prefix, std::initializer_list<std::pair<const char*, double>> options);

void check_one_of(const std::string& who, const char* name, const std::string& value,
                  std::initializer_list<const char*> allowed);

// `who`: parameter i of group g.
std::string describe(const std::string& who, size_t group, size_t index);

// Tensor state read from a checkpoint: defined, floating, shaped like p, finite (and >= 0 when
// `non_negative`); moved to p's device/dtype.
torch::Tensor checked_like(const torch::Tensor& t, const torch::Tensor& p, const char* name, const std::string& what,
                           bool non_negative = false);

// Throws naming `what` and `name` unless every element of t is finite (and >= 0 when
// `non_negative`): a checkpoint's state must be one that steps could have produced.
void check_finite_state(const torch::Tensor& t, const char* name, const std::string& what, bool non_negative = false);

// An optional step counter saved beside the LibTorch layout (e.g. "lowbit_steps"), read and
// checked before anything is loaded; nullopt when absent (older checkpoints).
std::optional<int64_t> read_step_counter(torch::serialize::InputArchive& archive, const char* name,
                                         const std::string& who);

int64_t bytes_of(const torch::Tensor& t);

// The seed of the random probes of step `step`: a function of (seed, step) only, so a
// resumed run draws the probes an uninterrupted one would.
inline uint64_t probe_seed(int64_t seed, int64_t step) {
  return static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 0xBF58476D1CE4E5B9ull + 1;
}

// Loads `archive` (LibTorch's optimizer layout, read by checkpoint::read_optimizer_archive) into
// `optimizer`, then runs `check` on every (parameter, state, options); if reading or a check
// throws, the previous state and options are restored and the error is rethrown as a
// c10::Error prefixed with `who`.
template <typename State, typename Options>
void load_checked(torch::optim::Optimizer& optimizer, torch::serialize::InputArchive& archive, const std::string& who,
                  const std::function<void(const torch::Tensor& p, State& state, const Options& options,
                                           const std::string& what)>& check) {
  using torch::optim::OptimizerParamState;
  ska::flat_hash_map<void*, std::unique_ptr<OptimizerParamState>> saved_state;
  for (const auto& [key, state] : optimizer.state()) saved_state[key] = state->clone();
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> saved_options;
  for (const auto& group : optimizer.param_groups()) saved_options.push_back(group.options().clone());
  try {
    optimizer.state().clear();
    checkpoint::read_optimizer_archive<State, Options>(archive, optimizer);
    for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
      auto& group = optimizer.param_groups()[g];
      const auto& options = static_cast<const Options&>(group.options());
      options.validate();
      for (size_t i = 0; i < group.params().size(); ++i) {
        const torch::Tensor& p = group.params()[i];
        auto found = optimizer.state().find(p.unsafeGetTensorImpl());
        if (found == optimizer.state().end()) continue;
        check(p, static_cast<State&>(*found->second), options, describe("parameter", g, i));
      }
    }
  } catch (const std::exception& e) {
    // Any exception (not only c10::Error: a std::bad_alloc, say) restores what was there.
    optimizer.state() = std::move(saved_state);
    for (size_t g = 0; g < saved_options.size(); ++g)
      optimizer.param_groups()[g].set_options(std::move(saved_options[g]));
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, who, ": cannot load the checkpoint: ", c10_error ? c10_error->what_without_backtrace() : e.what(),
                "; nothing was loaded");
  }
}

}  // namespace lowbit::support
