#include <lowbit/shampoo.h>

#include <ATen/ATen.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <functional>

#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/shampoo_engine.h"
#include "optim/shampoo_internal.h"

namespace lowbit {
namespace {
constexpr const char* kWho = "lowbit::Shampoo";
}  // namespace

using torch::optim::OptimizerParamGroup;

namespace {

const ShampooOptions& shampoo_options_of(const OptimizerParamGroup& group) {
  const auto* options = dynamic_cast<const ShampooOptions*>(&group.options());
  TORCH_CHECK(options != nullptr, "lowbit::Shampoo: a parameter group's options must be lowbit::ShampooOptions");
  return *options;
}

}  // namespace

Shampoo::Shampoo(const std::vector<OptimizerParamGroup>& param_groups, ShampooOptions defaults)
    : Optimizer(param_groups, std::make_unique<ShampooOptions>(defaults)), engine_(std::make_shared<ShampooEngine>()) {
  defaults.validate();
  // LibTorch's add_param_group only merges options of its own optimizer types and gives
  // any other group the defaults; put each group's own options back.
  for (size_t i = 0; i < param_groups.size(); ++i)
    if (param_groups[i].has_options())
      this->param_groups()[i].set_options(std::make_unique<ShampooOptions>(shampoo_options_of(param_groups[i])));
  for (const auto& group : this->param_groups()) shampoo_options_of(group).validate();
}

void Shampoo::add_param_group(const OptimizerParamGroup& param_group) {
  if (param_group.has_options()) shampoo_options_of(param_group).validate();
  Optimizer::add_param_group(param_group);
  if (param_group.has_options())
    param_groups().back().set_options(std::make_unique<ShampooOptions>(shampoo_options_of(param_group)));
}

Shampoo::Shampoo(std::vector<torch::Tensor> params, ShampooOptions defaults)
    : Shampoo({OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void Shampoo::check_gradients() const {
  for (size_t gi = 0; gi < param_groups().size(); ++gi) {
    const auto& group = param_groups()[gi];
    static_cast<const ShampooOptions&>(group.options()).validate();
    for (size_t pi = 0; pi < group.params().size(); ++pi) {
      const torch::Tensor& p = group.params()[pi];
      const torch::Tensor& g = p.grad();
      if (!g.defined()) continue;
      TORCH_CHECK(!g.is_sparse(), "lowbit::Shampoo: parameter ", pi, " of group ", gi,
                  " has a sparse gradient; Shampoo needs dense gradients");
      TORCH_CHECK(at::isFloatingType(g.scalar_type()), "lowbit::Shampoo: parameter ", pi, " of group ", gi,
                  " has a ", g.scalar_type(), " gradient; expected a floating type");
      TORCH_CHECK(g.sizes() == p.sizes(), "lowbit::Shampoo: parameter ", pi, " of group ", gi,
                  " has shape ", p.sizes(), " but its gradient has shape ", g.sizes());
    }
  }
}

namespace {

// The step's parameters with gradients, their states (from `state_of`) and positions.
std::vector<ParamStepRef> step_refs(
    torch::optim::Optimizer& optimizer,
    const std::function<ShampooParamState*(const torch::Tensor&, const ShampooOptions&)>& state_of) {
  std::vector<ParamStepRef> refs;
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    auto& group = optimizer.param_groups()[g];
    const auto& o = static_cast<const ShampooOptions&>(group.options());
    for (size_t i = 0; i < group.params().size(); ++i) {
      auto& p = group.params()[i];
      if (p.grad().defined())
        refs.push_back({p, p.grad(), state_of(p, o), &o, static_cast<int64_t>(g), static_cast<int64_t>(i)});
    }
  }
  return refs;
}

}  // namespace

bool Shampoo::accepts_step() const {
  // The overflow rule (optim/gradient_health.h): every gradient, then a trial on copies of
  // the parameters whose update no bound guarantees (fp16, extreme options).
  constexpr const char* who = kWho;
  const auto options_of = [this](size_t g) -> const ShampooOptions& {
    return static_cast<const ShampooOptions&>(param_groups()[g].options());
  };
  const auto skips = [&](size_t g) { return options_of(g).skip_nonfinite(); };
  const auto key = [&](const support::SteppedParam& sp) { return shampoo_overflow_key(sp.param, options_of(sp.group)); };
  if (!support::accept_gradients(*this, who, key, skips)) return false;
  for (const support::SteppedParam& sp : support::stepped_params(*this)) {
    const ShampooOptions& o = options_of(sp.group);
    if (!health::reduced_range(sp.param.scalar_type()) && shampoo_update_bounded(o)) continue;
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    const auto* s = found == state().end() ? nullptr : static_cast<const ShampooParamState*>(found->second.get());
    const std::string problem = shampoo_trial_step(sp.param, sp.param.grad(), s, o, eigh_);
    if (!problem.empty())
      return support::refuse(o.skip_nonfinite(), who, support::describe("parameter", sp.group, sp.index) + ": " + problem);
  }
  return true;
}

ShampooParamState& Shampoo::state_for(const torch::Tensor& p, const ShampooOptions& options) {
  auto& slot = state()[p.unsafeGetTensorImpl()];
  if (!slot) slot = std::make_unique<ShampooParamState>(make_param_state(p, options, eigh_));
  return static_cast<ShampooParamState&>(*slot);
}

torch::Tensor Shampoo::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  // Every check happens before the first write: a rejected step changes nothing.
  check_gradients();
  const auto& settings = static_cast<const ShampooOptions&>(defaults());
  engine_->set_workspace_bytes(static_cast<int64_t>(settings.workspace_mb() * (1 << 20)));
  if (distributed()) {
    distributed_step();
    return loss;
  }
  if (step_deferred(settings.gradient_check())) return loss;
  engine_->settle(kWho);  // the verdict of earlier deferred steps, before this one writes
  if (!accepts_step()) {
    ++skipped_steps_;
    return loss;
  }
  engine_->step(step_refs(*this, [this](const torch::Tensor& p, const ShampooOptions& o) { return &state_for(p, o); }));
  return loss;
}

bool Shampoo::step_deferred(const std::string& gradient_check) {
  if (gradient_check == "immediate") return false;
  bool every_state = true;  // else a first step: checked immediately
  const std::vector<ParamStepRef> refs =
      step_refs(*this, [this, &every_state](const torch::Tensor& p, const ShampooOptions&) -> ShampooParamState* {
        const auto found = state().find(p.unsafeGetTensorImpl());
        if (found != state().end()) return static_cast<ShampooParamState*>(found->second.get());
        every_state = false;
        return nullptr;
      });
  if (!every_state || !engine_->can_defer(refs, gradient_check)) return false;
  engine_->step_deferred(refs);
  return true;
}

void Shampoo::settle() { engine_->settle(kWho); }

StateBytes Shampoo::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state()) {
    const auto& s = static_cast<const ShampooParamState&>(*base);
    if (s.preconditioner) bytes.preconditioner += s.preconditioner->state_bytes();
    bytes.first_order += first_order_bytes(s);
  }
  return bytes;
}

int64_t Shampoo::root_failures() const {
  int64_t total = 0;
  for (const auto& [key, base] : state()) {
    const auto& s = static_cast<const ShampooParamState&>(*base);
    if (s.preconditioner) total += s.preconditioner->failures();
  }
  return total;
}

int64_t Shampoo::root_updates() const {
  int64_t most = 0;
  for (const auto& [key, base] : state())
    most = std::max(most, static_cast<const ShampooParamState&>(*base).root_updates());
  return most;
}

void Shampoo::set_eigh_solver(EighSolver solver) {
  // Preconditioners take the solver when they are created, at a parameter's first step.
  TORCH_CHECK(state().empty(), "lowbit::Shampoo::set_eigh_solver must be called before the first step");
  eigh_ = std::move(solver);
}

}  // namespace lowbit
