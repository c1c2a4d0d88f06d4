#include <lowbit/sophia.h>

#include <lowbit/hessian.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/grad_mode.h>

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
}

bool operator==(const SophiaOptions& a, const SophiaOptions& b) {
  return a.lr() == b.lr() && a.betas() == b.betas() && a.rho() == b.rho() && a.eps() == b.eps() &&
         a.weight_decay() == b.weight_decay() && a.estimator() == b.estimator() &&
         a.hessian_interval() == b.hessian_interval() && a.seed() == b.seed();
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
  support::validate_groups<SophiaOptions>(*this);
}

Sophia::Sophia(std::vector<torch::Tensor> params, SophiaOptions defaults)
    : Sophia({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

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
  // Hessian refresh first (it needs the graph), then the update without autograd.
  std::vector<torch::Tensor> params, grads;
  std::vector<double> beta2s;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const SophiaOptions&>(group.options());
    if (o.estimator() != "hutchinson" || steps_ % o.hessian_interval() != 0) continue;
    for (auto& p : group.params())
      if (p.grad().defined()) {
        params.push_back(p);
        grads.push_back(p.grad());
        beta2s.push_back(std::get<1>(o.betas()));
      }
  }
  if (!params.empty()) {
    // Probes are a function of (seed, step), so a resumed run draws the same ones.
    const int64_t seed = static_cast<const SophiaOptions&>(param_groups()[0].options()).seed();
    generator_.set_current_seed(support::probe_seed(seed, steps_));
    const std::vector<torch::Tensor> estimates = hutchinson_diagonal(grads, params, 1, generator_);
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < params.size(); ++k) {
      torch::Tensor h = state_for(params[k]).hessian();
      rules::ema(h, estimates[k], beta2s[k]);
    }
  }
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const SophiaOptions&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const torch::Tensor grad = p.grad().detach();
      // Release the double-backward graph the closure built through the gradient.
      if (p.grad().requires_grad()) p.mutable_grad() = grad;
      SophiaParamState& s = state_for(p);
      s.step(s.step() + 1);
      torch::Tensor exp_avg = s.exp_avg();
      torch::Tensor param = p;
      rules::sophia_update(param, grad, exp_avg, s.hessian(), o.lr(), std::get<0>(o.betas()), o.rho(), o.eps(),
                           o.weight_decay());
    }
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
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const SophiaOptions&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const torch::Tensor g = p.grad().detach();
      torch::Tensor h = state_for(p).hessian();
      rules::ema(h, g * g * static_cast<double>(batch_size), std::get<1>(o.betas()));
    }
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
