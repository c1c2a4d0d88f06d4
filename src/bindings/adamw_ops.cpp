// Low-bit AdamW for Python: torch ops over the rule the C++ lowbit::AdamW runs
// (optim/adamw_rule.h). python/lowbit/adamw.py keeps the state as plain tensors in
// optimizer.state[p] and passes it here.
//
//   adamw_options(options)                     C++ defaults + options, validated -> the full dict
//   adamw_state(param, bits, mapping, second_moment_mapping, block_size, min_quant_numel)
//                                              zero moments of the layout the options give
//   adamw_check_state(param, state, ..., who)  a loaded state against that layout
//   adamw_update_(param, grad, moments..., step, ...)   one step of one parameter
#include <torch/library.h>

#include <ATen/ATen.h>

#include <lowbit/adamw.h>

#include <string>

#include "bindings/options_dict.h"
#include "optim/adamw_rule.h"

namespace lowbit::bindings {
namespace {

constexpr const char* kAdamW = "lowbit.AdamW: ";

c10::Dict<std::string, c10::IValue> adamw_options(const c10::Dict<std::string, c10::IValue>& given) {
  AdamWOptions o;
  const char* names =
      "lr, betas, eps, weight_decay, bits, mapping, second_moment_mapping, block_size, min_quant_numel, rounding, seed, "
      "skip_nonfinite";
  for (const auto& e : given) {
    const std::string& n = e.key();
    const c10::IValue& v = e.value();
    if (n == "lr") o.lr(as_number(n, v, kAdamW));
    else if (n == "betas") {
      const auto b = as_pair(n, v, kAdamW);
      o.betas(std::make_tuple(as_number(n + "[0]", b[0], kAdamW), as_number(n + "[1]", b[1], kAdamW)));
    } else if (n == "eps") o.eps(as_number(n, v, kAdamW));
    else if (n == "weight_decay") o.weight_decay(as_number(n, v, kAdamW));
    else if (n == "bits") o.bits(as_int(n, v, kAdamW));
    else if (n == "mapping") o.mapping(as_string(n, v, kAdamW));
    else if (n == "second_moment_mapping") o.second_moment_mapping(as_string(n, v, kAdamW));
    else if (n == "block_size") o.block_size(as_int(n, v, kAdamW));
    else if (n == "min_quant_numel") o.min_quant_numel(as_int(n, v, kAdamW));
    else if (n == "rounding") o.rounding(as_string(n, v, kAdamW));
    else if (n == "seed") o.seed(as_int(n, v, kAdamW));
    else if (n == "skip_nonfinite") o.skip_nonfinite(as_bool(n, v, kAdamW));
    else TORCH_CHECK(false, kAdamW, "unknown option \"", n, "\"; the options are ", names);
  }
  try {
    o.validate();
  } catch (const c10::Error& e) {
    std::string message = e.what_without_backtrace();
    const std::string prefix = "AdamWOptions.";
    if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
    TORCH_CHECK(false, kAdamW, message);
  }
  auto d = c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get());
  d.insert("lr", o.lr());
  d.insert("betas", c10::ivalue::Tuple::create(std::get<0>(o.betas()), std::get<1>(o.betas())));
  d.insert("eps", o.eps());
  d.insert("weight_decay", o.weight_decay());
  d.insert("bits", o.bits());
  d.insert("mapping", o.mapping());
  d.insert("second_moment_mapping", o.second_moment_mapping());
  d.insert("block_size", o.block_size());
  d.insert("min_quant_numel", o.min_quant_numel());
  d.insert("rounding", o.rounding());
  d.insert("seed", o.seed());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return c10::impl::toTypedDict<std::string, c10::IValue>(std::move(d));
}

std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

adamw::MomentLayout layout(const char* op, const at::Tensor& param, int64_t bits, c10::string_view mapping,
                           c10::string_view second_moment_mapping, int64_t block_size, int64_t min_quant_numel) {
  TORCH_CHECK(param.defined() && at::isFloatingType(param.scalar_type()), "lowbit::", op,
              ": the parameter must be a floating tensor");
  // The option checks of AdamWOptions::validate, so the op cannot be driven past them.
  AdamWOptions o;
  o.bits(bits).mapping(str(mapping)).second_moment_mapping(str(second_moment_mapping)).block_size(block_size);
  o.min_quant_numel(min_quant_numel);
  o.validate();
  return adamw::layout_for(param.numel(), bits, o.mapping(), o.second_moment_mapping(), block_size, min_quant_numel);
}

adamw::Moments moments(const c10::optional<at::Tensor>& exp_avg, const c10::optional<at::Tensor>& exp_avg_sq,
                       const c10::optional<at::Tensor>& exp_avg_codes, const c10::optional<at::Tensor>& exp_avg_scales,
                       const c10::optional<at::Tensor>& exp_avg_sq_codes,
                       const c10::optional<at::Tensor>& exp_avg_sq_scales,
                       const c10::optional<at::Tensor>& exp_avg_centroids) {
  adamw::Moments m;
  m.exp_avg = exp_avg.value_or(at::Tensor());
  m.exp_avg_sq = exp_avg_sq.value_or(at::Tensor());
  m.exp_avg_codes = exp_avg_codes.value_or(at::Tensor());
  m.exp_avg_scales = exp_avg_scales.value_or(at::Tensor());
  m.exp_avg_sq_codes = exp_avg_sq_codes.value_or(at::Tensor());
  m.exp_avg_sq_scales = exp_avg_sq_scales.value_or(at::Tensor());
  m.exp_avg_centroids = exp_avg_centroids.value_or(at::Tensor());
  return m;
}

at::Tensor entry(const c10::Dict<std::string, at::Tensor>& d, const char* name) {
  const auto it = d.find(name);
  return it == d.end() ? at::Tensor() : it->value();
}

c10::Dict<std::string, at::Tensor> adamw_state(const at::Tensor& param, int64_t bits, c10::string_view mapping,
                                               c10::string_view second_moment_mapping, int64_t block_size,
                                               int64_t min_quant_numel) {
  const adamw::MomentLayout l =
      layout("adamw_state", param, bits, mapping, second_moment_mapping, block_size, min_quant_numel);
  const adamw::Moments m = adamw::make_moments(l, param.detach());
  c10::Dict<std::string, at::Tensor> d;
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"exp_avg", &m.exp_avg},          {"exp_avg_sq", &m.exp_avg_sq},
      {"exp_avg_codes", &m.exp_avg_codes}, {"exp_avg_scales", &m.exp_avg_scales},
      {"exp_avg_sq_codes", &m.exp_avg_sq_codes}, {"exp_avg_sq_scales", &m.exp_avg_sq_scales},
      {"exp_avg_centroids", &m.exp_avg_centroids}};
  for (const auto& [name, t] : all)
    if (t->defined()) d.insert(name, *t);
  return d;
}

void adamw_check_state(const at::Tensor& param, const c10::Dict<std::string, at::Tensor>& state, int64_t bits,
                       c10::string_view mapping, c10::string_view second_moment_mapping, int64_t block_size,
                       int64_t min_quant_numel, c10::string_view who) {
  const adamw::MomentLayout l =
      layout("adamw_check_state", param, bits, mapping, second_moment_mapping, block_size, min_quant_numel);
  adamw::Moments m;
  m.exp_avg = entry(state, "exp_avg");
  m.exp_avg_sq = entry(state, "exp_avg_sq");
  m.exp_avg_codes = entry(state, "exp_avg_codes");
  m.exp_avg_scales = entry(state, "exp_avg_scales");
  m.exp_avg_sq_codes = entry(state, "exp_avg_sq_codes");
  m.exp_avg_sq_scales = entry(state, "exp_avg_sq_scales");
  m.exp_avg_centroids = entry(state, "exp_avg_centroids");
  adamw::check_moments(m, l, param, str(who));
}

void adamw_update_(const at::Tensor& param, const at::Tensor& grad, const c10::optional<at::Tensor>& exp_avg,
                   const c10::optional<at::Tensor>& exp_avg_sq, const c10::optional<at::Tensor>& exp_avg_codes,
                   const c10::optional<at::Tensor>& exp_avg_scales, const c10::optional<at::Tensor>& exp_avg_sq_codes,
                   const c10::optional<at::Tensor>& exp_avg_sq_scales,
                   const c10::optional<at::Tensor>& exp_avg_centroids, const at::Tensor& step, double lr, double beta1,
                   double beta2, double eps, double weight_decay, int64_t bits, c10::string_view mapping,
                   c10::string_view second_moment_mapping, int64_t block_size, int64_t min_quant_numel,
                   c10::string_view rounding, int64_t seed, int64_t param_index) {
  constexpr const char* op = "adamw_update_";
  const adamw::MomentLayout l = layout(op, param, bits, mapping, second_moment_mapping, block_size, min_quant_numel);
  TORCH_CHECK(grad.defined() && at::isFloatingType(grad.scalar_type()) && grad.sizes() == param.sizes() &&
                  grad.device() == param.device(),
              "lowbit::adamw_update_: grad must be a floating tensor shaped like the parameter, on its device");
  TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kLong,
              "lowbit::adamw_update_: step must be a one-element int64 tensor");
  adamw::Moments m = moments(exp_avg, exp_avg_sq, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
                             exp_avg_centroids);
  adamw::check_moments(m, l, param, "lowbit::adamw_update_");
  AdamWOptions o;
  o.rounding(str(rounding)).seed(seed);
  o.validate();
  TORCH_CHECK(param_index >= 0, "lowbit::adamw_update_: param_index must be >= 0; got ", param_index);
  adamw::Encoding encoding;
  encoding.stochastic = o.rounding() == "stochastic";
  encoding.seed = seed;
  encoding.param_index = param_index;
  at::NoGradGuard no_grad;
  step.add_(1);
  at::Tensor p = param;
  adamw::update(p, grad.detach(), m, l, step.item<int64_t>(), lr, beta1, beta2, eps, weight_decay, encoding);
}

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using namespace lowbit::bindings;
  m.def("adamw_options(Dict(str, Any) options) -> Dict(str, Any)", &adamw_options);
  m.def(
      "adamw_state(Tensor param, int bits, str mapping, str second_moment_mapping, int block_size, "
      "int min_quant_numel) -> Dict(str, Tensor)",
      &adamw_state);
  m.def(
      "adamw_check_state(Tensor param, Dict(str, Tensor) state, int bits, str mapping, str second_moment_mapping, "
      "int block_size, int min_quant_numel, str who) -> ()",
      &adamw_check_state);
  m.def(
      "adamw_update_(Tensor(a!) param, Tensor grad, Tensor(b!)? exp_avg, Tensor(c!)? exp_avg_sq, "
      "Tensor(d!)? exp_avg_codes, Tensor(e!)? exp_avg_scales, Tensor(f!)? exp_avg_sq_codes, "
      "Tensor(g!)? exp_avg_sq_scales, Tensor(i!)? exp_avg_centroids, Tensor(h!) step, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int bits, str mapping, str second_moment_mapping, int block_size, "
      "int min_quant_numel, str rounding=\"nearest\", int seed=0, int param_index=0) -> ()",
      &adamw_update_);
}
