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

// Throws (naming `who`, the parameter and group) if a gradient is sparse, not floating or
// shaped unlike its parameter. Called before any update, so a bad gradient leaves the
// optimizer and the parameters untouched. Values are judged by accept_gradients.
void check_gradients(const torch::optim::Optimizer& optimizer, const std::string& who);

// A parameter that has a gradient, with its place.
struct SteppedParam {
  size_t group, index;
  torch::Tensor param;
};
std::vector<SteppedParam> stepped_params(const torch::optim::Optimizer& optimizer);
// Its position over all groups.
int64_t position(const torch::optim::Optimizer& optimizer, const SteppedParam& param);

// A step that must not happen: throws "<who>: <problem>; nothing was updated (set
// skip_nonfinite to skip such steps)", or, with `skip`, returns false (the caller counts the
// skipped step and returns without writing).
bool refuse(bool skip, const std::string& who, const std::string& problem);

// The rule of optim/gradient_health.h on `tensors` (gradients, or Hessian estimates), one per
// entry of `params`: true when every one passes; otherwise refuse() for the first offender,
// with the message of health::consequence(key(param)) and `skips(group)` its group's
// skip_nonfinite.
bool accept(const std::vector<SteppedParam>& params, const std::vector<torch::Tensor>& tensors,
            const std::string& who, const std::function<std::string(const SteppedParam&)>& key,
            const std::function<bool(size_t group)>& skips);

// accept() on the gradients of every stepped parameter.
bool accept_gradients(const torch::optim::Optimizer& optimizer, const std::string& who,
                      const std::function<std::string(const SteppedParam&)>& key,
                      const std::function<bool(size_t group)>& skips);

// A group's skip_nonfinite.
template <typename Options>
std::function<bool(size_t)> skip_option(const torch::optim::Optimizer& optimizer) {
  return [&optimizer](size_t g) {
    return static_cast<const Options&>(optimizer.param_groups()[g].options()).skip_nonfinite();
  };
}

// The parameter's step tried on copies first (health::trial_update; for fp16 parameters and
// options that bound nothing: optim/gradient_health.h): true when every copy stayed finite,
// else refuse() naming the first of `names` whose copy did not. `writes` are the tensors the
// update writes, in the order of `names`.
bool accept_trial(const SteppedParam& param, const std::vector<torch::Tensor>& writes,
                  const std::vector<std::string>& names,
                  const std::function<void(std::vector<torch::Tensor>& copies)>& update, const std::string& who,
                  bool skip);

// LibTorch's Optimizer keeps a param group's own options only for its own optimizer types
// (Optimizer::_try_merge_all_optimizers) and gives any other type the defaults: this puts
// the own options of `groups`, which became the optimizer's groups from `first` on, back.
template <typename Options>
void keep_group_options(torch::optim::Optimizer& optimizer,
                        const std::vector<torch::optim::OptimizerParamGroup>& groups, const std::string& who,
                        size_t first = 0) {
  for (size_t i = 0; i < groups.size(); ++i) {
    if (!groups[i].has_options()) continue;
    const auto* options = dynamic_cast<const Options*>(&groups[i].options());
    TORCH_CHECK(options != nullptr, who, ": a parameter group's options must be of the optimizer's options type");
    optimizer.param_groups()[first + i].set_options(std::make_unique<Options>(*options));
  }
}

// What every lowbit optimizer's add_param_group does: the group's own options (if it has
// any) must be `Options` (named `options_name` in the error) and valid; the group is added
// and keeps them (see keep_group_options).
template <typename Options>
void add_validated_group(torch::optim::Optimizer& optimizer, const torch::optim::OptimizerParamGroup& group,
                         const std::string& who, const char* options_name) {
  if (group.has_options()) {
    const auto* options = dynamic_cast<const Options*>(&group.options());
    TORCH_CHECK(options != nullptr, who, ": a parameter group's options must be ", options_name);
    options->validate();
  }
  optimizer.torch::optim::Optimizer::add_param_group(group);
  keep_group_options<Options>(optimizer, {group}, who, optimizer.param_groups().size() - 1);
}

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

// Throws naming the first option of `options` that is NaN, +-Inf or beyond float32 range.
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
