#include <lowbit/nag_gs.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

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
}

void NagGSOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(double, mu);
  LOWBIT_DESERIALIZE_ARG(double, gamma);
}

bool operator==(const NagGSOptions& a, const NagGSOptions& b) {
  return a.lr() == b.lr() && a.mu() == b.mu() && a.gamma() == b.gamma();
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
  support::validate_groups<NagGSOptions>(*this);
}

NagGS::NagGS(std::vector<torch::Tensor> params, NagGSOptions defaults)
    : NagGS({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

torch::Tensor NagGS::step(LossClosure closure) {
  support::validate_groups<NagGSOptions>(*this);
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const NagGSOptions&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto s = std::make_unique<NagGSParamState>();
        s->velocity(p.detach().clone());
        s->gamma(o.gamma());
        slot = std::move(s);
      }
      auto& s = static_cast<NagGSParamState&>(*slot);
      torch::Tensor param = p, velocity = s.velocity();
      s.gamma(rules::nag_gs_update(param, p.grad().detach(), velocity, s.gamma(), o.lr(), o.mu()));
      s.step(s.step() + 1);
    }
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
