#include <lowbit/sophia.h>

#include <lowbit/hessian.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <map>

#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/second_order/update_rules.h"

namespace lowbit {
namespace {
constexpr const char* kWho = "lowbit::Sophia";
}  // namespace

SophiaOptions::SophiaOptions(double lr) : lr_(lr) {}

void SophiaOptions::validate() const {
  const std::string p = "SophiaOptions.";
  support::check_adam_options(p, lr(), betas(), eps(), weight_decay());
  TORCH_CHECK(rho() > 0, p, "rho must be > 0; got ", rho());
  support::check_one_of(p, "estimator", estimator(), {"gnb", "hutchinson"});
  TORCH_CHECK(hessian_interval() >= 1, p, "hessian_interval must be >= 1; got ", hessian_interval());
  TORCH_CHECK(seed() >= 0, p, "seed must be >= 0; got ", seed());
  support::check_finite_options(p, {{"rho", rho()}});
}

void SophiaOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rho);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(estimator);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian_interval);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
}

void SophiaOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(betas_t, betas);
  LOWBIT_DESERIALIZE_ARG(double, rho);
  LOWBIT_DESERIALIZE_ARG(double, eps);
  LOWBIT_DESERIALIZE_ARG(double, weight_decay);
  LOWBIT_DESERIALIZE_ARG(std::string, estimator);
  LOWBIT_DESERIALIZE_ARG(int64_t, hessian_interval);
  LOWBIT_DESERIALIZE_ARG(int64_t, seed);
  // Absent from checkpoints made before the option existed: those used the default.
  skip_nonfinite_ = checkpoint::read_field_or<bool>(archive, "skip_nonfinite", false);
}

bool operator==(const SophiaOptions& a, const SophiaOptions& b) {
  return a.lr() == b.lr() && a.betas() == b.betas() && a.rho() == b.rho() && a.eps() == b.eps() &&
         a.weight_decay() == b.weight_decay() && a.estimator() == b.estimator() &&
         a.hessian_interval() == b.hessian_interval() && a.seed() == b.seed() &&
         a.skip_nonfinite() == b.skip_nonfinite();
}

double SophiaOptions::get_lr() const { return lr(); }
void SophiaOptions::set_lr(const double lr) { this->lr(lr); }

void SophiaParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian);
}

void SophiaParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, hessian);
}

Sophia::Sophia(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaOptions defaults)
    : Optimizer(param_groups, std::make_unique<SophiaOptions>(defaults)),
      generator_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(defaults.seed()))) {
  support::keep_group_options<SophiaOptions>(*this, param_groups, kWho);
  support::validate_groups<SophiaOptions>(*this);
}

Sophia::Sophia(std::vector<torch::Tensor> params, SophiaOptions defaults)
    : Sophia({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void Sophia::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  support::add_validated_group<SophiaOptions>(*this, param_group, kWho, "lowbit::SophiaOptions");
}

SophiaParamState& Sophia::state_for(const torch::Tensor& p) {
  auto& slot = state()[p.unsafeGetTensorImpl()];
  if (!slot) {
    auto s = std::make_unique<SophiaParamState>();
    s->exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve).detach());
    s->hessian(torch::zeros_like(p, at::MemoryFormat::Preserve).detach());
    slot = std::move(s);
  }
  return static_cast<SophiaParamState&>(*slot);
}

bool Sophia::hessian_due() const {
  for (const auto& group : param_groups())
    if (steps_ % static_cast<const SophiaOptions&>(group.options()).hessian_interval() == 0) return true;
  return false;
}

torch::Tensor Sophia::step(LossClosure closure) {
  support::validate_groups<SophiaOptions>(*this);
  bool hutchinson = false;  // some group refreshes its Hessian inside step()
  for (const auto& group : param_groups())
    hutchinson |= static_cast<const SophiaOptions&>(group.options()).estimator() == "hutchinson";
  TORCH_CHECK(!hutchinson || closure, kWho,
              "(estimator=\"hutchinson\"): step() needs a closure that computes the loss and calls "
              "loss.backward(create_graph=true) (Python: loss.backward(create_graph=True))");
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  // The overflow rule (optim/gradient_health.h), before anything is written: gradients, the
  // Hessian estimates of this step, then a trial of the parameters whose update no bound
  // guarantees (fp16, extreme options).
  const auto skips = support::skip_option<SophiaOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "sophia"; }, skips)) {
    ++skipped_steps_;
    return loss;
  }
  // Hessian refresh first (it needs the graph), then the update without autograd.
  const std::vector<support::SteppedParam> stepped = support::stepped_params(*this);
  std::vector<support::SteppedParam> due;
  std::vector<torch::Tensor> params, grads;
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[sp.group].options());
    if (o.estimator() != "hutchinson" || steps_ % o.hessian_interval() != 0) continue;
    due.push_back(sp);
    params.push_back(sp.param);
    grads.push_back(sp.param.grad());
  }
  std::map<c10::TensorImpl*, torch::Tensor> estimates;  // this step's h_hat of the due parameters
  if (!params.empty()) {
    // Probes are a function of (seed, step), so a resumed run draws the same ones.
    const int64_t seed = static_cast<const SophiaOptions&>(param_groups()[0].options()).seed();
    generator_.set_current_seed(support::probe_seed(seed, steps_));
    const std::vector<torch::Tensor> computed = hutchinson_diagonal(grads, params, 1, generator_);
    if (!support::accept(due, computed, kWho, [](const auto&) { return "sophia.hutchinson"; }, skips)) {
      ++skipped_steps_;
      return loss;
    }
    for (size_t k = 0; k < params.size(); ++k) estimates[params[k].unsafeGetTensorImpl()] = computed[k];
  }
  torch::NoGradGuard no_grad;
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[sp.group].options());
    const bool needed = health::reduced_range(sp.param.scalar_type()) || !rules::sophia_update_bounded(o.lr(), o.weight_decay());
    if (!needed) continue;
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    const bool fresh = found == state().end();
    const auto* s = fresh ? nullptr : static_cast<const SophiaParamState*>(found->second.get());
    const torch::Tensor zeros = torch::zeros_like(sp.param, at::MemoryFormat::Preserve).detach();
    const auto estimate = estimates.find(sp.param.unsafeGetTensorImpl());
    const torch::Tensor grad = sp.param.grad().detach();
    const auto update = [&](std::vector<torch::Tensor>& c) {
      if (estimate != estimates.end()) rules::ema(c[2], estimate->second, std::get<1>(o.betas()));
      rules::sophia_update(c[0], grad, c[1], c[2], o.lr(), std::get<0>(o.betas()), o.rho(), o.eps(), o.weight_decay());
    };
    if (!support::accept_trial(sp, {sp.param, fresh ? zeros : s->exp_avg(), fresh ? zeros : s->hessian()},
                               {"values", "exp_avg", "hessian"}, update, kWho, skips(sp.group))) {
      ++skipped_steps_;
      return loss;
    }
  }
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[due[k].group].options());
    torch::Tensor h = state_for(params[k]).hessian();
    rules::ema(h, estimates.at(params[k].unsafeGetTensorImpl()), std::get<1>(o.betas()));
  }
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[sp.group].options());
    torch::Tensor p = sp.param;
    const torch::Tensor grad = p.grad().detach();
    // Release the double-backward graph the closure built through the gradient.
    if (p.grad().requires_grad()) p.mutable_grad() = grad;
    SophiaParamState& s = state_for(p);
    s.step(s.step() + 1);
    torch::Tensor exp_avg = s.exp_avg();
    rules::sophia_update(p, grad, exp_avg, s.hessian(), o.lr(), std::get<0>(o.betas()), o.rho(), o.eps(),
                         o.weight_decay());
  }
  ++steps_;
  return loss;
}

void Sophia::update_hessian(int64_t batch_size) {
  TORCH_CHECK(batch_size >= 1, kWho, ".update_hessian: batch_size must be >= 1; got ", batch_size);
  support::validate_groups<SophiaOptions>(*this);
  support::check_gradients(*this, kWho);
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const SophiaOptions&>(group.options());
    TORCH_CHECK(o.estimator() == "gnb", kWho, ".update_hessian is the Gauss-Newton-Bartlett estimator; this group's "
                "estimator is \"", o.estimator(), "\", which refreshes inside step()");
  }
  // The overflow rule (optim/gradient_health.h) on the gradients and on the estimates
  // B * g * g, then a trial of fp16 Hessians; nothing is written before.
  const auto skips = support::skip_option<SophiaOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "sophia.gnb"; }, skips)) {
    ++skipped_steps_;
    return;
  }
  const std::vector<support::SteppedParam> stepped = support::stepped_params(*this);
  std::vector<torch::Tensor> estimates;
  for (const support::SteppedParam& sp : stepped) {
    const torch::Tensor g = sp.param.grad().detach();
    estimates.push_back(g * g * static_cast<double>(batch_size));
  }
  if (!support::accept(stepped, estimates, kWho, [](const auto&) { return "sophia.gnb_estimate"; }, skips)) {
    ++skipped_steps_;
    return;
  }
  for (size_t k = 0; k < stepped.size(); ++k) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[stepped[k].group].options());
    if (!health::reduced_range(stepped[k].param.scalar_type())) continue;
    const auto found = state().find(stepped[k].param.unsafeGetTensorImpl());
    const torch::Tensor h = found == state().end()
                                ? torch::zeros_like(stepped[k].param, at::MemoryFormat::Preserve)
                                : static_cast<const SophiaParamState&>(*found->second).hessian();
    const auto update = [&](std::vector<torch::Tensor>& c) { rules::ema(c[0], estimates[k], std::get<1>(o.betas())); };
    if (!support::accept_trial(stepped[k], {h}, {"hessian"}, update, kWho, skips(stepped[k].group))) {
      ++skipped_steps_;
      return;
    }
  }
  for (size_t k = 0; k < stepped.size(); ++k) {
    const auto& o = static_cast<const SophiaOptions&>(param_groups()[stepped[k].group].options());
    torch::Tensor h = state_for(stepped[k].param).hessian();
    rules::ema(h, estimates[k], std::get<1>(o.betas()));
  }
}

void Sophia::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SophiaParamState, SophiaOptions>(archive, *this);
  archive.write("lowbit_steps", c10::IValue(steps_));
}

void Sophia::load(torch::serialize::InputArchive& archive) {
  // Read (and checked) first: the state is replaced only when everything is valid.
  const std::optional<int64_t> steps = support::read_step_counter(archive, "lowbit_steps", kWho);
  support::load_checked<SophiaParamState, SophiaOptions>(
      *this, archive, kWho, [](const torch::Tensor& p, SophiaParamState& s, const SophiaOptions&, const std::string& what) {
        checkpoint::check_count(s.step(), what, "step");
        s.exp_avg(support::checked_like(s.exp_avg(), p, "exp_avg", what));
        s.hessian(support::checked_like(s.hessian(), p, "hessian", what));
      });
  if (steps) steps_ = *steps;
}

StateBytes Sophia::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state()) {
    const auto& s = static_cast<const SophiaParamState&>(*base);
    bytes.first_order += support::bytes_of(s.exp_avg());
    bytes.preconditioner += support::bytes_of(s.hessian());
  }
  return bytes;
}

}  // namespace lowbit
