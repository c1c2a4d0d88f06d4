#include <lowbit/nag_gs.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/second_order/update_rules.h"

namespace lowbit {
namespace {
constexpr const char* kWho = "lowbit::NagGS";
}  // namespace

NagGSOptions::NagGSOptions(double lr) : lr_(lr) {}

void NagGSOptions::validate() const {
  const std::string p = "NagGSOptions.";
  TORCH_CHECK(lr() > 0, p, "lr (alpha) must be > 0; got ", lr());
  TORCH_CHECK(mu() >= 0, p, "mu must be >= 0; got ", mu());
  TORCH_CHECK(gamma() > 0, p, "gamma must be > 0; got ", gamma());
  support::check_finite_options(p, {{"lr", lr()}, {"mu", mu()}, {"gamma", gamma()}});
}

void NagGSOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mu);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gamma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
}

void NagGSOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(double, mu);
  LOWBIT_DESERIALIZE_ARG(double, gamma);
  // Absent from checkpoints made before the option existed: those used the default.
  skip_nonfinite_ = checkpoint::read_field_or<bool>(archive, "skip_nonfinite", false);
}

bool operator==(const NagGSOptions& a, const NagGSOptions& b) {
  return a.lr() == b.lr() && a.mu() == b.mu() && a.gamma() == b.gamma() && a.skip_nonfinite() == b.skip_nonfinite();
}

double NagGSOptions::get_lr() const { return lr(); }
void NagGSOptions::set_lr(const double lr) { this->lr(lr); }

void NagGSParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gamma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(velocity);
}

void NagGSParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(double, gamma);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, velocity);
}

NagGS::NagGS(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, NagGSOptions defaults)
    : Optimizer(param_groups, std::make_unique<NagGSOptions>(defaults)) {
  support::keep_group_options<NagGSOptions>(*this, param_groups, kWho);
  support::validate_groups<NagGSOptions>(*this);
}

NagGS::NagGS(std::vector<torch::Tensor> params, NagGSOptions defaults)
    : NagGS({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void NagGS::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  support::add_validated_group<NagGSOptions>(*this, param_group, kWho, "lowbit::NagGSOptions");
}

torch::Tensor NagGS::step(LossClosure closure) {
  support::validate_groups<NagGSOptions>(*this);
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  torch::NoGradGuard no_grad;
  // The overflow rule (optim/gradient_health.h): gradients, then NAG-GS's state, which the
  // gradient does not bound (rules::nag_gs_step_bounded): from the largest magnitudes of
  // parameters, velocities and gradients (one read), and where that bound fails, a trial on
  // copies. Nothing is written before every check passed.
  const auto skips = support::skip_option<NagGSOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "nag_gs"; }, skips)) {
    ++skipped_steps_;
    return loss;
  }
  const std::vector<support::SteppedParam> stepped = support::stepped_params(*this);
  std::vector<torch::Tensor> magnitudes_of;  // per parameter: x, v (x again when it has none yet), g
  std::vector<const NagGSParamState*> states;
  for (const support::SteppedParam& sp : stepped) {
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    states.push_back(found == state().end() ? nullptr : static_cast<const NagGSParamState*>(found->second.get()));
    magnitudes_of.insert(magnitudes_of.end(),
                         {sp.param, states.back() ? states.back()->velocity() : sp.param, sp.param.grad()});
  }
  const at::Tensor magnitudes = health::max_magnitudes(magnitudes_of).cpu();
  const double* m = magnitudes.data_ptr<double>();
  for (size_t k = 0; k < stepped.size(); ++k) {
    const support::SteppedParam& sp = stepped[k];
    const auto& o = static_cast<const NagGSOptions&>(param_groups()[sp.group].options());
    const double gamma = states[k] ? states[k]->gamma() : o.gamma();
    if (rules::nag_gs_step_bounded(m[3 * k], m[3 * k + 1], m[3 * k + 2], gamma, o.lr(), o.mu(), sp.param.scalar_type()))
      continue;
    const torch::Tensor grad = sp.param.grad().detach();
    const auto update = [&](std::vector<torch::Tensor>& c) { rules::nag_gs_update(c[0], grad, c[1], gamma, o.lr(), o.mu()); };
    if (!support::accept_trial(sp, {sp.param, states[k] ? states[k]->velocity() : sp.param},
                               {"values", "velocity"}, update, kWho, skips(sp.group))) {
      ++skipped_steps_;
      return loss;
    }
  }
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const NagGSOptions&>(param_groups()[sp.group].options());
    torch::Tensor p = sp.param;
    auto& slot = state()[p.unsafeGetTensorImpl()];
    if (!slot) {
      auto s = std::make_unique<NagGSParamState>();
      s->velocity(p.detach().clone());
      s->gamma(o.gamma());
      slot = std::move(s);
    }
    auto& s = static_cast<NagGSParamState&>(*slot);
    torch::Tensor velocity = s.velocity();
    s.gamma(rules::nag_gs_update(p, p.grad().detach(), velocity, s.gamma(), o.lr(), o.mu()));
    s.step(s.step() + 1);
  }
  return loss;
}

void NagGS::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<NagGSParamState, NagGSOptions>(archive, *this);
}

void NagGS::load(torch::serialize::InputArchive& archive) {
  support::load_checked<NagGSParamState, NagGSOptions>(
      *this, archive, kWho, [](const torch::Tensor& p, NagGSParamState& s, const NagGSOptions&, const std::string& what) {
        checkpoint::check_count(s.step(), what, "step");
        TORCH_CHECK(std::isfinite(s.gamma()) && s.gamma() > 0, what, ": gamma must be finite and > 0; got ", s.gamma());
        s.velocity(support::checked_like(s.velocity(), p, "velocity", what));
      });
}

StateBytes NagGS::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state())
    bytes.first_order += support::bytes_of(static_cast<const NagGSParamState&>(*base).velocity());
  return bytes;
}

}  // namespace lowbit
