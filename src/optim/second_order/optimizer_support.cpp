#include "optim/second_order/optimizer_support.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cfloat>
#include <cmath>

#include "optim/gradient_health.h"
#include "optim/shampoo_internal.h"

namespace lowbit::support {

std::string describe(const std::string& who, size_t group, size_t index) {
  return who + " " + std::to_string(index) + " of group " + std::to_string(group);
}

void check_gradients(const torch::optim::Optimizer& optimizer, const std::string& who) {
  for (size_t gi = 0; gi < optimizer.param_groups().size(); ++gi) {
    const auto& group = optimizer.param_groups()[gi];
    for (size_t pi = 0; pi < group.params().size(); ++pi) {
      const torch::Tensor& p = group.params()[pi];
      const torch::Tensor& g = p.grad();
      if (!g.defined()) continue;
      const std::string what = describe("parameter", gi, pi);
      TORCH_CHECK(!g.is_sparse(), who, ": ", what, " has a sparse gradient; expected a dense one");
      TORCH_CHECK(at::isFloatingType(g.scalar_type()), who, ": ", what, " has a ", g.scalar_type(),
                  " gradient; expected a floating type");
      TORCH_CHECK(g.sizes() == p.sizes(), who, ": ", what, " has shape ", p.sizes(), " but its gradient has shape ",
                  g.sizes());
    }
  }
}

std::vector<SteppedParam> stepped_params(const torch::optim::Optimizer& optimizer) {
  std::vector<SteppedParam> out;
  for (size_t gi = 0; gi < optimizer.param_groups().size(); ++gi) {
    const auto& params = optimizer.param_groups()[gi].params();
    for (size_t pi = 0; pi < params.size(); ++pi)
      if (params[pi].grad().defined()) out.push_back({gi, pi, params[pi]});
  }
  return out;
}

int64_t position(const torch::optim::Optimizer& optimizer, const SteppedParam& param) {
  int64_t position = static_cast<int64_t>(param.index);
  for (size_t g = 0; g < param.group; ++g) position += static_cast<int64_t>(optimizer.param_groups()[g].params().size());
  return position;
}

bool refuse(bool skip, const std::string& who, const std::string& problem) {
  TORCH_CHECK(skip, who, ": ", problem, "; nothing was updated (set skip_nonfinite to skip such steps)");
  return false;
}

bool accept(const std::vector<SteppedParam>& params, const std::vector<torch::Tensor>& tensors,
            const std::string& who, const std::function<std::string(const SteppedParam&)>& key,
            const std::function<bool(size_t group)>& skips) {
  const health::Offence o = health::first_offence(health::squared_norms(tensors));
  if (!o.found()) return true;
  const SteppedParam& p = params[static_cast<size_t>(o.index)];
  return refuse(skips(p.group), who,
                health::offence_message(describe("parameter", p.group, p.index), health::consequence(key(p)),
                                        o.squared_norm));
}

bool accept_gradients(const torch::optim::Optimizer& optimizer, const std::string& who,
                      const std::function<std::string(const SteppedParam&)>& key,
                      const std::function<bool(size_t group)>& skips) {
  const std::vector<SteppedParam> params = stepped_params(optimizer);
  std::vector<torch::Tensor> grads;
  for (const SteppedParam& p : params) grads.push_back(p.param.grad());
  return accept(params, grads, who, key, skips);
}

bool accept_trial(const SteppedParam& param, const std::vector<torch::Tensor>& writes,
                  const std::vector<std::string>& names,
                  const std::function<void(std::vector<torch::Tensor>& copies)>& update, const std::string& who,
                  bool skip) {
  const health::Trial t = health::trial_update(writes, update);
  if (!t.failed()) return true;
  return refuse(skip, who,
                describe("parameter", param.group, param.index) + ": " +
                    health::overflow_problem(names[static_cast<size_t>(t.index)], t.dtype));
}

torch::Tensor evaluate(const torch::optim::Optimizer::LossClosure& closure) {
  if (!closure) return {};
  torch::AutoGradMode enable_grad(true);
  return closure();
}

void check_adam_options(const std::string& p, double lr, const std::tuple<double, double>& betas, double eps,
                        double weight_decay) {
  TORCH_CHECK(lr >= 0, p, "lr must be >= 0; got ", lr);
  const auto [beta1, beta2] = betas;
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, p, "betas[0] must be in [0, 1); got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, p, "betas[1] must be in [0, 1); got ", beta2);
  TORCH_CHECK(eps > 0, p, "eps must be > 0; got ", eps);
  TORCH_CHECK(weight_decay >= 0, p, "weight_decay must be >= 0; got ", weight_decay);
  // (Checkpoints carry options too: an infinite one would make every step NaN/Inf.)
  check_finite_options(p, {{"lr", lr}, {"eps", eps}, {"weight_decay", weight_decay}});
}

void check_finite_options(const std::string& prefix, std::initializer_list<std::pair<const char*, double>> options) {
  // The options are applied to fp32 (or narrower) tensors as scalars; c10 converts a double
  // beyond FLT_MAX with a std::runtime_error in the middle of a step, so refuse it here.
  for (const auto& [name, value] : options)
    TORCH_CHECK(std::isfinite(value) && std::abs(value) <= FLT_MAX, prefix, name,
                " must be finite and within float32 range (|x| <= 3.4e38); got ", value);
}

void check_one_of(const std::string& who, const char* name, const std::string& value,
                  std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "\"" : ", \"") + std::string(a) + "\"";
  }
  TORCH_CHECK(false, who, name, " must be one of ", list, "; got \"", value, "\"");
}

torch::Tensor checked_like(const torch::Tensor& t, const torch::Tensor& p, const char* name, const std::string& what,
                           bool non_negative) {
  TORCH_CHECK(t.defined(), what, " has no \"", name, "\" state");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), what, ": state \"", name, "\" must be a floating tensor; got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes(), what, ": state \"", name, "\" has shape ", t.sizes(),
              " but the parameter has shape ", p.sizes());
  const torch::Tensor out = t.to(p.options());
  // Checked in the parameter's dtype: a float64 value beyond its range would become Inf.
  check_finite_state(out, name, what, non_negative);
  return out;
}

void check_finite_state(const torch::Tensor& t, const char* name, const std::string& what, bool non_negative) {
  if (!t.defined() || t.numel() == 0) return;
  TORCH_CHECK(all_finite(t), what, ": state \"", name, "\" holds NaN or Inf values; the checkpoint is corrupt");
  TORCH_CHECK(!non_negative || t.ge(0).all().item<bool>(), what, ": state \"", name,
              "\" holds negative values (it is a running mean of squares); the checkpoint is corrupt");
}

std::optional<int64_t> read_step_counter(torch::serialize::InputArchive& archive, const char* name,
                                         const std::string& who) {
  try {
    c10::IValue v;
    if (!archive.try_read(name, v)) return std::nullopt;
    TORCH_CHECK(v.isInt(), "the entry \"", name, "\" must be an integer; got ", checkpoint::kind_of(v));
    checkpoint::check_count(v.toInt(), "the checkpoint", name);
    return v.toInt();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, who, ": cannot load the checkpoint: ", e.what_without_backtrace(), "; nothing was loaded");
  }
}

int64_t bytes_of(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

}  // namespace lowbit::support
