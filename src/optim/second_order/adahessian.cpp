#include <lowbit/adahessian.h>

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
constexpr const char* kWho = "lowbit::AdaHessian";
}  // namespace

AdaHessianOptions::AdaHessianOptions(double lr) : lr_(lr) {}

void AdaHessianOptions::validate() const {
  const std::string p = "AdaHessianOptions.";
  support::check_adam_options(p, lr(), betas(), eps(), weight_decay());
  TORCH_CHECK(hessian_power() > 0 && hessian_power() <= 1, p, "hessian_power must be in (0, 1]; got ",
              hessian_power());
  TORCH_CHECK(hessian_interval() >= 1, p, "hessian_interval must be >= 1; got ", hessian_interval());
  TORCH_CHECK(seed() >= 0, p, "seed must be >= 0; got ", seed());
}

void AdaHessianOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian_power);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian_interval);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
}

void AdaHessianOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(betas_t, betas);
  LOWBIT_DESERIALIZE_ARG(double, eps);
  LOWBIT_DESERIALIZE_ARG(double, weight_decay);
  LOWBIT_DESERIALIZE_ARG(double, hessian_power);
  LOWBIT_DESERIALIZE_ARG(int64_t, hessian_interval);
  LOWBIT_DESERIALIZE_ARG(int64_t, seed);
  // Absent from checkpoints made before the option existed: those used the default.
  skip_nonfinite_ = checkpoint::read_field_or<bool>(archive, "skip_nonfinite", false);
}

bool operator==(const AdaHessianOptions& a, const AdaHessianOptions& b) {
  return a.lr() == b.lr() && a.betas() == b.betas() && a.eps() == b.eps() && a.weight_decay() == b.weight_decay() &&
         a.hessian_power() == b.hessian_power() && a.hessian_interval() == b.hessian_interval() &&
         a.seed() == b.seed() && a.skip_nonfinite() == b.skip_nonfinite();
}

double AdaHessianOptions::get_lr() const { return lr(); }
void AdaHessianOptions::set_lr(const double lr) { this->lr(lr); }

void AdaHessianParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_hessian_diag_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian_diag);
}

void AdaHessianParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_hessian_diag_sq);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, hessian_diag);
}

AdaHessian::AdaHessian(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdaHessianOptions defaults)
    : Optimizer(param_groups, std::make_unique<AdaHessianOptions>(defaults)),
      generator_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(defaults.seed()))) {
  support::keep_group_options<AdaHessianOptions>(*this, param_groups, kWho);
  support::validate_groups<AdaHessianOptions>(*this);
}

AdaHessian::AdaHessian(std::vector<torch::Tensor> params, AdaHessianOptions defaults)
    : AdaHessian({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void AdaHessian::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  support::add_validated_group<AdaHessianOptions>(*this, param_group, kWho, "lowbit::AdaHessianOptions");
}

bool AdaHessian::has_diagonal(const torch::Tensor& p) const {
  const auto found = state().find(p.unsafeGetTensorImpl());
  return found != state().end() && static_cast<const AdaHessianParamState&>(*found->second).hessian_diag().defined();
}

AdaHessianParamState& AdaHessian::state_for(const torch::Tensor& p) {
  auto& slot = state()[p.unsafeGetTensorImpl()];
  if (!slot) {
    auto s = std::make_unique<AdaHessianParamState>();
    s->exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve).detach());
    s->exp_hessian_diag_sq(torch::zeros_like(p, at::MemoryFormat::Preserve).detach());
    slot = std::move(s);
  }
  return static_cast<AdaHessianParamState&>(*slot);
}

torch::Tensor AdaHessian::step(LossClosure closure) {
  support::validate_groups<AdaHessianOptions>(*this);
  TORCH_CHECK(closure, kWho, ": step() needs a closure that computes the loss and calls "
              "loss.backward(create_graph=true) (Python: loss.backward(create_graph=True))");
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  // The overflow rule (optim/gradient_health.h), before anything is written: gradients, this
  // step's Hessian diagonals D (squared into v), then a trial of the parameters whose update
  // no bound guarantees (fp16, extreme options).
  const auto skips = support::skip_option<AdaHessianOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "adahessian"; }, skips)) {
    ++skipped_steps_;
    return loss;
  }
  const std::vector<support::SteppedParam> stepped = support::stepped_params(*this);
  std::vector<support::SteppedParam> due;
  std::vector<torch::Tensor> params, grads;
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const AdaHessianOptions&>(param_groups()[sp.group].options());
    if (steps_ % o.hessian_interval() == 0 || !has_diagonal(sp.param)) {
      due.push_back(sp);
      params.push_back(sp.param);
      grads.push_back(sp.param.grad());
    }
  }
  std::map<c10::TensorImpl*, torch::Tensor> diagonals;  // this step's D of the due parameters
  if (!params.empty()) {
    const int64_t seed = static_cast<const AdaHessianOptions&>(param_groups()[0].options()).seed();
    generator_.set_current_seed(support::probe_seed(seed, steps_));
    const std::vector<torch::Tensor> estimates = hutchinson_diagonal(grads, params, 1, generator_);
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> computed;
    for (const torch::Tensor& e : estimates) computed.push_back(rules::adahessian_diagonal(e));
    if (!support::accept(due, computed, kWho, [](const auto&) { return "adahessian.hutchinson"; }, skips)) {
      ++skipped_steps_;
      return loss;
    }
    for (size_t k = 0; k < params.size(); ++k) diagonals[params[k].unsafeGetTensorImpl()] = computed[k];
  }
  torch::NoGradGuard no_grad;
  const auto diagonal_of = [&](const torch::Tensor& p) {
    const auto found = diagonals.find(p.unsafeGetTensorImpl());
    if (found != diagonals.end()) return found->second;
    return static_cast<const AdaHessianParamState&>(*state().at(p.unsafeGetTensorImpl())).hessian_diag();
  };
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const AdaHessianOptions&>(param_groups()[sp.group].options());
    const auto [beta1, beta2] = o.betas();
    const bool needed = health::reduced_range(sp.param.scalar_type()) ||
                        !rules::adahessian_update_bounded(o.lr(), beta1, o.eps(), o.weight_decay());
    if (!needed) continue;
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    const bool fresh = found == state().end();
    const auto* s = fresh ? nullptr : static_cast<const AdaHessianParamState*>(found->second.get());
    const torch::Tensor zeros = torch::zeros_like(sp.param, at::MemoryFormat::Preserve).detach();
    const torch::Tensor grad = sp.param.grad().detach(), diagonal = diagonal_of(sp.param);
    const int64_t step = fresh ? 1 : s->step() + 1;
    const auto update = [&](std::vector<torch::Tensor>& c) {
      rules::adahessian_update(c[0], grad, c[1], c[2], diagonal, step, o.lr(), beta1, beta2, o.eps(), o.weight_decay(),
                               o.hessian_power());
    };
    if (!support::accept_trial(sp,
                               {sp.param, fresh ? zeros : s->exp_avg(), fresh ? zeros : s->exp_hessian_diag_sq()},
                               {"values", "exp_avg", "exp_hessian_diag_sq"}, update, kWho, skips(sp.group))) {
      ++skipped_steps_;
      return loss;
    }
  }
  for (size_t k = 0; k < params.size(); ++k)
    state_for(params[k]).hessian_diag(diagonals.at(params[k].unsafeGetTensorImpl()));
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const AdaHessianOptions&>(param_groups()[sp.group].options());
    torch::Tensor p = sp.param;
    const torch::Tensor grad = p.grad().detach();
    if (p.grad().requires_grad()) p.mutable_grad() = grad;  // release the double-backward graph
    AdaHessianParamState& s = state_for(p);
    s.step(s.step() + 1);
    torch::Tensor exp_avg = s.exp_avg(), exp_sq = s.exp_hessian_diag_sq();
    const auto [beta1, beta2] = o.betas();
    rules::adahessian_update(p, grad, exp_avg, exp_sq, s.hessian_diag(), s.step(), o.lr(), beta1, beta2, o.eps(),
                             o.weight_decay(), o.hessian_power());
  }
  ++steps_;
  return loss;
}

void AdaHessian::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdaHessianParamState, AdaHessianOptions>(archive, *this);
  archive.write("lowbit_steps", c10::IValue(steps_));
}

void AdaHessian::load(torch::serialize::InputArchive& archive) {
  // Read (and checked) first: the state is replaced only when everything is valid.
  const std::optional<int64_t> steps = support::read_step_counter(archive, "lowbit_steps", kWho);
  support::load_checked<AdaHessianParamState, AdaHessianOptions>(
      *this, archive, kWho,
      [](const torch::Tensor& p, AdaHessianParamState& s, const AdaHessianOptions&, const std::string& what) {
        checkpoint::check_count(s.step(), what, "step");
        s.exp_avg(support::checked_like(s.exp_avg(), p, "exp_avg", what));
        s.exp_hessian_diag_sq(
            support::checked_like(s.exp_hessian_diag_sq(), p, "exp_hessian_diag_sq", what, /*non_negative=*/true));
        if (s.hessian_diag().defined()) s.hessian_diag(support::checked_like(s.hessian_diag(), p, "hessian_diag", what));
      });
  if (steps) steps_ = *steps;
}

StateBytes AdaHessian::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state()) {
    const auto& s = static_cast<const AdaHessianParamState&>(*base);
    bytes.first_order += support::bytes_of(s.exp_avg());
    bytes.preconditioner += support::bytes_of(s.exp_hessian_diag_sq()) + support::bytes_of(s.hessian_diag());
  }
  return bytes;
}

}  // namespace lowbit
