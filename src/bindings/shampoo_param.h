// The Python package's Shampoo state as torch custom classes (torch.classes.lowbit.*):
// a param group's validated options, and one parameter's state with its step and plain
// tensor state_dict.
#pragma once

#include <torch/custom_class.h>

#include <string>
#include <vector>

#include "bindings/options_dict.h"
#include "optim/shampoo_internal.h"

namespace lowbit::bindings {

constexpr const char* kPreconditionerPrefix = "preconditioner.";

// Validated options, built once per change of a param group's options (not per step).
struct ShampooConfig : torch::CustomClassHolder {
  explicit ShampooConfig(const c10::Dict<std::string, c10::IValue>& dict) : options(options_from_dict(dict)) {}
  c10::Dict<std::string, c10::IValue> to_dict() const { return options_to_dict(options); }
  // The overflow rule (shampoo_internal.h): whether these options bound an fp32 / bf16
  // parameter's update, and the health::consequence key of a gradient beyond the rule.
  bool update_bounded() const { return shampoo_update_bounded(options); }
  std::string overflow_key(const at::Tensor& p) const { return shampoo_overflow_key(p, options); }
  ShampooOptions options;
};

// One parameter's Shampoo state. Options come with every step, so lr schedules and group
// edits take effect; options that decide the state layout may not change, the other
// preconditioner settings (stat_decay, epsilon, ...) rebuild the preconditioner around
// its saved state.
class ShampooParam : public torch::CustomClassHolder {
 public:
  ShampooParam(const at::Tensor& p, const c10::intrusive_ptr<ShampooConfig>& config)
      : options_(config->options), shape_(p.sizes().vec()), device_(p.device()),
        state_(make_param_state(p, options_, {})) {}

  void step(at::Tensor p, const at::Tensor& grad, const c10::intrusive_ptr<ShampooConfig>& config) {
    ShampooParamState& state = prepare(p, config);
    at::NoGradGuard no_grad;
    shampoo_param_step(p, grad, state, config->options);
  }

  // The step of p tried on copies (shampoo_trial_step), this state and p left as they are:
  // "" when everything stays finite, else what would overflow.
  std::string trial_step(const at::Tensor& p, const at::Tensor& grad, const c10::intrusive_ptr<ShampooConfig>& config) {
    check_param(p);
    check_layout(config->options);
    at::NoGradGuard no_grad;
    return shampoo_trial_step(p, grad, &state_, config->options, {});
  }

  // The state, ready for a step of p with these options: layout checked, preconditioner
  // rebuilt for changed settings, state moved to p's device.
  // The state, when a step of p with config needs no preparation (same device, same
  // preconditioner options); nullptr otherwise.
  ShampooParamState* ready(const at::Tensor& p, const c10::intrusive_ptr<ShampooConfig>& config) {
    if (p.device() != device_ || p.sizes() != c10::IntArrayRef(shape_) ||
        !structural_differences(options_, config->options).empty() ||
        !preconditioner_differences(options_, config->options).empty())
      return nullptr;
    return &state_;
  }

  ShampooParamState& prepare(const at::Tensor& p, const c10::intrusive_ptr<ShampooConfig>& config) {
    check_param(p);
    const ShampooOptions& o = config->options;
    check_layout(o);
    if (!preconditioner_differences(options_, o).empty()) reconfigure(p, o);
    if (p.device() != device_) install(state_dict(), p, kWho, "the state moving to " + p.device().str());
    return state_;
  }

  c10::Dict<std::string, at::Tensor> state_dict() const {
    c10::Dict<std::string, at::Tensor> d;
    d.insert("step", at::scalar_tensor(state_.step(), at::kLong));
    d.insert("root_updates", at::scalar_tensor(state_.root_updates(), at::kLong));
    if (state_.soap_v_start() > 0) d.insert("soap_v_start", at::scalar_tensor(state_.soap_v_start(), at::kLong));
    if (state_.momentum_buffer().defined()) d.insert("momentum_buffer", state_.momentum_buffer());
    if (state_.exp_avg().defined()) d.insert("exp_avg", state_.exp_avg());
    if (state_.exp_avg_sq().defined()) d.insert("exp_avg_sq", state_.exp_avg_sq());
    for (const auto& [name, tensor] : low_bit_moments(state_))
      if (tensor->defined()) d.insert(name, *tensor);
    if (state_.preconditioner) {
      precond::TensorMap entries;
      state_.preconditioner->save(entries);
      for (const auto& [name, tensor] : entries) d.insert(kPreconditionerPrefix + name, tensor);
    }
    return d;
  }

  // Validates everything (entry names, counts, shapes, dtypes, the preconditioner layout)
  // before replacing the state; on error nothing changes. Messages start with `who` and
  // call the parameter `what`.
  void load_state_dict(const at::Tensor& p, const c10::Dict<std::string, at::Tensor>& d, const std::string& who,
                       const std::string& what) {
    check_param(p);
    install(d, p, who, what);
  }

  std::tuple<int64_t, int64_t> state_bytes() const {
    return {state_.preconditioner ? state_.preconditioner->state_bytes() : 0, first_order_bytes(state_)};
  }
  int64_t steps() const { return state_.step(); }
  int64_t root_updates() const { return state_.root_updates(); }
  int64_t root_failures() const {
    return earlier_failures_ + (state_.preconditioner ? state_.preconditioner->failures() : 0);
  }
  bool preconditioned() const { return state_.preconditioner != nullptr; }
  c10::Dict<std::string, c10::IValue> options() const { return options_to_dict(options_); }

 private:
  static std::vector<std::pair<const char*, const at::Tensor*>> low_bit_moments(const ShampooParamState& s) {
    return {{"exp_avg_codes", &s.exp_avg_codes()},
            {"exp_avg_scales", &s.exp_avg_scales()},
            {"exp_avg_sq_codes", &s.exp_avg_sq_codes()},
            {"exp_avg_sq_scales", &s.exp_avg_sq_scales()}};
  }

  void check_layout(const ShampooOptions& o) const {
    const std::vector<std::string> layout = structural_differences(options_, o);
    TORCH_CHECK(layout.empty(), kWho, "cannot change ", join(layout),
                " after the first step (they decide the layout of the state); make a new optimizer, or "
                "load a checkpoint into one built with the new options");
  }

  void check_param(const at::Tensor& p) const {
    TORCH_CHECK(p.sizes() == at::IntArrayRef(shape_), kWho, "the parameter has shape ", p.sizes(),
                " but its state was made for shape ", at::IntArrayRef(shape_));
  }

  static int64_t read_count(const at::Tensor& t, const char* name, const std::string& who, const std::string& what) {
    TORCH_CHECK(t.defined() && t.numel() == 1 && !at::isFloatingType(t.scalar_type()) &&
                    !at::isComplexType(t.scalar_type()) && t.scalar_type() != at::kBool,
                who, what, ": checkpoint entry \"", name, "\" must be a one-element integer tensor; got ",
                t.defined() ? t.toString() : "undefined", " of shape ", t.defined() ? t.sizes() : at::IntArrayRef{});
    return t.item<int64_t>();
  }

  // Replaces the state by the one in `d`, checked against p and this object's options.
  void install(const c10::Dict<std::string, at::Tensor>& d, const at::Tensor& p, const std::string& who,
               const std::string& what) {
    ShampooParamState staged;
    bool has_step = false, has_roots = false;
    for (const auto& entry : d) {
      const std::string& key = entry.key();
      const at::Tensor& t = entry.value();
      if (key == "step") {
        staged.step(read_count(t, "step", who, what));
        has_step = true;
      } else if (key == "root_updates") {
        staged.root_updates(read_count(t, "root_updates", who, what));
        has_roots = true;
      } else if (key == "soap_v_start") {
        staged.soap_v_start(read_count(t, "soap_v_start", who, what));
      } else if (key == "momentum_buffer") {
        staged.momentum_buffer(t);
      } else if (key == "exp_avg") {
        staged.exp_avg(t);
      } else if (key == "exp_avg_sq") {
        staged.exp_avg_sq(t);
      } else if (key == "exp_avg_codes") {
        staged.exp_avg_codes(t);
      } else if (key == "exp_avg_scales") {
        staged.exp_avg_scales(t);
      } else if (key == "exp_avg_sq_codes") {
        staged.exp_avg_sq_codes(t);
      } else if (key == "exp_avg_sq_scales") {
        staged.exp_avg_sq_scales(t);
      } else if (key.rfind(kPreconditionerPrefix, 0) == 0) {
        staged.loaded_preconditioner[key.substr(std::string(kPreconditionerPrefix).size())] = t;
      } else {
        TORCH_CHECK(false, who, what, ": checkpoint entry \"", key, "\" is not part of a Shampoo state (expected step, "
                    "root_updates, soap_v_start, momentum_buffer, exp_avg, exp_avg_sq, exp_avg[_sq]_codes / _scales, "
                    "preconditioner.*)");
      }
    }
    TORCH_CHECK(has_step && has_roots, who, "the checkpoint of ", what, " has no \"",
                has_step ? "root_updates" : "step", "\" entry");
    install_checkpoint_state(staged, p, options_, {}, who, what);
    state_ = std::move(staged);
    device_ = p.device();
    earlier_failures_ = 0;
  }

  // New preconditioner settings: a preconditioner built with them, holding the saved state.
  void reconfigure(const at::Tensor& p, const ShampooOptions& o) {
    if (state_.preconditioner) {
      precond::TensorMap entries;
      state_.preconditioner->save(entries);
      auto rebuilt = std::make_shared<precond::ParameterPreconditioner>(p.sizes(), p.options(),
                                                                        preconditioner_config(o, {}));
      rebuilt->load(entries);
      earlier_failures_ += state_.preconditioner->failures();
      state_.preconditioner = std::move(rebuilt);
    }
    options_ = o;
  }

  ShampooOptions options_;  // those the state was built with (layout and preconditioner config)
  std::vector<int64_t> shape_;
  at::Device device_;
  ShampooParamState state_;
  int64_t earlier_failures_ = 0;  // root failures of preconditioners replaced by reconfigure()
};

}  // namespace lowbit::bindings
