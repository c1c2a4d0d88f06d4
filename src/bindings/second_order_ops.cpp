// Sophia, AdaHessian, M-FAC and NAG-GS for Python: torch ops (torch.ops.lowbit.*) over the
// per-parameter rules the C++ optimizers use (optim/second_order/update_rules.h and
// gradient_window.h), so both front ends run one implementation of the arithmetic. The
// Python package (python/lowbit/second_order.py) keeps the state as plain tensors in
// optimizer.state[p] and passes it here; every op that writes says so in its schema.
//
//   second_order_options(name, options)      C++ defaults + options, validated -> the full dict
//   probe_seed(seed, step)                   seed of the Hutchinson probes of a step
//   ema_(avgs, xs, beta)                     avg = beta avg + (1 - beta) x (Hessian EMA)
//   sophia_gnb_hessian_(hessians, grads, B, beta2)   h = EMA of B * g * g
//   sophia_update_ / adahessian_update_ / nag_gs_update_   one step of a param group
//   adahessian_diagonal(estimate)            D from a Hutchinson estimate
//   mfac_window / mfac_check_window / mfac_update_     M-FAC's gradient window
//
// The ops check what they are given (lengths, shapes, devices, dtypes, the window layout)
// and name the offending tensor; option values are checked once by second_order_options.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <lowbit/adahessian.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/quant_options.h>
#include <lowbit/sophia.h>

#include <algorithm>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bindings/options_dict.h"
#include "optim/gradient_health.h"
#include "optim/second_order/gradient_window.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/second_order/update_rules.h"

namespace lowbit::bindings {
namespace {

// ------------------------------------------------------------------ options

template <typename Options>
using OptionSetter = std::function<void(Options&, const std::string&, const c10::IValue&)>;

c10::IValue pair(const std::tuple<double, double>& t) {
  return c10::ivalue::Tuple::create(std::get<0>(t), std::get<1>(t));
}

std::tuple<double, double> number_pair(const std::string& n, const c10::IValue& v, const char* who) {
  const auto b = as_pair(n, v, who);
  return std::make_tuple(as_number(n + "[0]", b[0], who), as_number(n + "[1]", b[1], who));
}

// Options = the C++ defaults overridden by `given` (unknown names and wrong types are
// rejected by name), then Options::validate, whose messages ("SophiaOptions.lr must be ...")
// are rethrown as "<who>lr must be ...".
template <typename Options>
Options options_from(const c10::Dict<std::string, c10::IValue>& given, const char* who, const std::string& prefix,
                     const std::map<std::string, OptionSetter<Options>>& setters) {
  Options o;
  for (const auto& entry : given) {
    const auto it = setters.find(entry.key());
    if (it == setters.end()) {
      std::string names;
      for (const auto& [name, setter] : setters) names += (names.empty() ? "" : ", ") + name;
      TORCH_CHECK(false, who, "unknown option \"", entry.key(), "\"; the options are ", names);
    }
    it->second(o, entry.key(), entry.value());
  }
  try {
    o.validate();
  } catch (const c10::Error& e) {
    std::string message = e.what_without_backtrace();
    if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
    TORCH_CHECK(false, who, message);
  }
  return o;
}

c10::Dict<std::string, c10::IValue> typed(c10::impl::GenericDict d) {
  return c10::impl::toTypedDict<std::string, c10::IValue>(std::move(d));
}

c10::impl::GenericDict empty_dict() { return c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()); }

c10::Dict<std::string, c10::IValue> sophia_options(const c10::Dict<std::string, c10::IValue>& given) {
  constexpr const char* who = "lowbit.Sophia: ";
  static const std::map<std::string, OptionSetter<SophiaOptions>> setters = {
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v, who)); }},
      {"lr", [](auto& o, auto& n, auto& v) { o.lr(as_number(n, v, who)); }},
      {"betas", [](auto& o, auto& n, auto& v) { o.betas(number_pair(n, v, who)); }},
      {"rho", [](auto& o, auto& n, auto& v) { o.rho(as_number(n, v, who)); }},
      {"eps", [](auto& o, auto& n, auto& v) { o.eps(as_number(n, v, who)); }},
      {"weight_decay", [](auto& o, auto& n, auto& v) { o.weight_decay(as_number(n, v, who)); }},
      {"estimator", [](auto& o, auto& n, auto& v) { o.estimator(as_string(n, v, who)); }},
      {"hessian_interval", [](auto& o, auto& n, auto& v) { o.hessian_interval(as_int(n, v, who)); }},
      {"seed", [](auto& o, auto& n, auto& v) { o.seed(as_int(n, v, who)); }},
  };
  const SophiaOptions o = options_from<SophiaOptions>(given, who, "SophiaOptions.", setters);
  auto d = empty_dict();
  d.insert("lr", o.lr());
  d.insert("betas", pair(o.betas()));
  d.insert("rho", o.rho());
  d.insert("eps", o.eps());
  d.insert("weight_decay", o.weight_decay());
  d.insert("estimator", o.estimator());
  d.insert("hessian_interval", o.hessian_interval());
  d.insert("seed", o.seed());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return typed(std::move(d));
}

c10::Dict<std::string, c10::IValue> adahessian_options(const c10::Dict<std::string, c10::IValue>& given) {
  constexpr const char* who = "lowbit.AdaHessian: ";
  static const std::map<std::string, OptionSetter<AdaHessianOptions>> setters = {
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v, who)); }},
      {"lr", [](auto& o, auto& n, auto& v) { o.lr(as_number(n, v, who)); }},
      {"betas", [](auto& o, auto& n, auto& v) { o.betas(number_pair(n, v, who)); }},
      {"eps", [](auto& o, auto& n, auto& v) { o.eps(as_number(n, v, who)); }},
      {"weight_decay", [](auto& o, auto& n, auto& v) { o.weight_decay(as_number(n, v, who)); }},
      {"hessian_power", [](auto& o, auto& n, auto& v) { o.hessian_power(as_number(n, v, who)); }},
      {"hessian_interval", [](auto& o, auto& n, auto& v) { o.hessian_interval(as_int(n, v, who)); }},
      {"seed", [](auto& o, auto& n, auto& v) { o.seed(as_int(n, v, who)); }},
  };
  const AdaHessianOptions o = options_from<AdaHessianOptions>(given, who, "AdaHessianOptions.", setters);
  auto d = empty_dict();
  d.insert("lr", o.lr());
  d.insert("betas", pair(o.betas()));
  d.insert("eps", o.eps());
  d.insert("weight_decay", o.weight_decay());
  d.insert("hessian_power", o.hessian_power());
  d.insert("hessian_interval", o.hessian_interval());
  d.insert("seed", o.seed());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return typed(std::move(d));
}

c10::Dict<std::string, c10::IValue> mfac_options(const c10::Dict<std::string, c10::IValue>& given) {
  constexpr const char* who = "lowbit.MFAC: ";
  static const std::map<std::string, OptionSetter<MFACOptions>> setters = {
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v, who)); }},
      {"lr", [](auto& o, auto& n, auto& v) { o.lr(as_number(n, v, who)); }},
      {"momentum", [](auto& o, auto& n, auto& v) { o.momentum(as_number(n, v, who)); }},
      {"weight_decay", [](auto& o, auto& n, auto& v) { o.weight_decay(as_number(n, v, who)); }},
      {"window", [](auto& o, auto& n, auto& v) { o.window(as_int(n, v, who)); }},
      {"damping", [](auto& o, auto& n, auto& v) { o.damping(as_number(n, v, who)); }},
      {"bits", [](auto& o, auto& n, auto& v) { o.bits(as_int(n, v, who)); }},
      {"mapping", [](auto& o, auto& n, auto& v) { o.mapping(as_string(n, v, who)); }},
      {"quant_block_size", [](auto& o, auto& n, auto& v) { o.quant_block_size(as_int(n, v, who)); }},
  };
  const MFACOptions o = options_from<MFACOptions>(given, who, "MFACOptions.", setters);
  auto d = empty_dict();
  d.insert("lr", o.lr());
  d.insert("momentum", o.momentum());
  d.insert("weight_decay", o.weight_decay());
  d.insert("window", o.window());
  d.insert("damping", o.damping());
  d.insert("bits", o.bits());
  d.insert("mapping", o.mapping());
  d.insert("quant_block_size", o.quant_block_size());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return typed(std::move(d));
}

c10::Dict<std::string, c10::IValue> nag_gs_options(const c10::Dict<std::string, c10::IValue>& given) {
  constexpr const char* who = "lowbit.NagGS: ";
  static const std::map<std::string, OptionSetter<NagGSOptions>> setters = {
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v, who)); }},
      {"lr", [](auto& o, auto& n, auto& v) { o.lr(as_number(n, v, who)); }},
      {"mu", [](auto& o, auto& n, auto& v) { o.mu(as_number(n, v, who)); }},
      {"gamma", [](auto& o, auto& n, auto& v) { o.gamma(as_number(n, v, who)); }},
  };
  const NagGSOptions o = options_from<NagGSOptions>(given, who, "NagGSOptions.", setters);
  auto d = empty_dict();
  d.insert("lr", o.lr());
  d.insert("mu", o.mu());
  d.insert("gamma", o.gamma());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return typed(std::move(d));
}

c10::Dict<std::string, c10::IValue> second_order_options(c10::string_view optimizer,
                                                         const c10::Dict<std::string, c10::IValue>& given) {
  const std::string name(optimizer.data(), optimizer.size());
  if (name == "sophia") return sophia_options(given);
  if (name == "adahessian") return adahessian_options(given);
  if (name == "mfac") return mfac_options(given);
  if (name == "nag_gs") return nag_gs_options(given);
  TORCH_CHECK(false, "lowbit::second_order_options: optimizer must be one of \"sophia\", \"adahessian\", \"mfac\", "
              "\"nag_gs\"; got \"", name, "\"");
}

int64_t probe_seed(int64_t seed, int64_t step) {
  TORCH_CHECK(seed >= 0 && step >= 0, "lowbit::probe_seed: seed and step must be >= 0; got ", seed, " and ", step);
  // The uint64 seed's bits (Python: `& (2**64 - 1)` before Generator.manual_seed).
  return static_cast<int64_t>(support::probe_seed(seed, step));
}

// ------------------------------------------------------------------ argument checks

void check_lengths(const char* op, std::initializer_list<std::pair<const char*, size_t>> lists) {
  const size_t n = lists.begin()->second;
  for (const auto& [name, size] : lists)
    TORCH_CHECK(size == n, "lowbit::", op, ": needs one ", name, " per parameter; got ", size, " for ", n,
                " parameters");
}

// `t` (the `name` of parameter i) must be a floating tensor shaped like p, on p's device.
void check_like(const char* op, const at::Tensor& t, const at::Tensor& p, const char* name, size_t i) {
  TORCH_CHECK(t.defined(), "lowbit::", op, ": ", name, " of parameter ", i, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lowbit::", op, ": ", name, " of parameter ", i,
              " must be a floating tensor; got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes(), "lowbit::", op, ": ", name, " of parameter ", i, " has shape ", t.sizes(),
              " but the parameter has shape ", p.sizes());
  TORCH_CHECK(t.device() == p.device(), "lowbit::", op, ": ", name, " of parameter ", i, " is on ", t.device(),
              " but the parameter is on ", p.device());
}

void check_param(const char* op, const at::Tensor& p, size_t i) {
  TORCH_CHECK(p.defined() && at::isFloatingType(p.scalar_type()), "lowbit::", op, ": parameter ", i,
              " must be a floating tensor");
}

// A one-element counter (`step`, `count`) of `dtype`.
void check_scalar(const char* op, const at::Tensor& t, const char* name, size_t i, at::ScalarType dtype) {
  TORCH_CHECK(t.defined() && t.numel() == 1 && t.scalar_type() == dtype, "lowbit::", op, ": ", name,
              " of parameter ", i, " must be a one-element ", dtype, " tensor; got ",
              t.defined() ? std::string(c10::toString(t.scalar_type())) + " of shape " + c10::str(t.sizes())
                          : std::string("an undefined tensor"));
}

// ------------------------------------------------------------------ elementwise rules

void ema_(const std::vector<at::Tensor>& avgs, const std::vector<at::Tensor>& xs, double beta) {
  check_lengths("ema_", {{"average", avgs.size()}, {"update", xs.size()}});
  for (size_t i = 0; i < avgs.size(); ++i) check_like("ema_", xs[i], avgs[i], "x", i);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < avgs.size(); ++i) {
    at::Tensor avg = avgs[i];
    rules::ema(avg, xs[i], beta);
  }
}

// Sophia's Gauss-Newton-Bartlett estimate B * g * g, folded into h (lowbit::Sophia::update_hessian).
void sophia_gnb_hessian_(const std::vector<at::Tensor>& hessians, const std::vector<at::Tensor>& grads,
                         int64_t batch_size, double beta2) {
  TORCH_CHECK(batch_size >= 1, "lowbit::sophia_gnb_hessian_: batch_size must be >= 1; got ", batch_size);
  check_lengths("sophia_gnb_hessian_", {{"hessian", hessians.size()}, {"gradient", grads.size()}});
  for (size_t i = 0; i < hessians.size(); ++i) check_like("sophia_gnb_hessian_", grads[i], hessians[i], "grad", i);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < hessians.size(); ++i) {
    const at::Tensor g = grads[i].detach();
    at::Tensor h = hessians[i];
    rules::ema(h, g * g * static_cast<double>(batch_size), beta2);
  }
}

void sophia_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                    const std::vector<at::Tensor>& steps, double lr, double beta1, double rho, double eps,
                    double weight_decay) {
  constexpr const char* op = "sophia_update_";
  check_lengths(op, {{"parameter", params.size()}, {"gradient", grads.size()}, {"exp_avg", exp_avgs.size()},
                     {"hessian", hessians.size()}, {"step", steps.size()}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, params[i], i);
    check_like(op, grads[i], params[i], "grad", i);
    check_like(op, exp_avgs[i], params[i], "exp_avg", i);
    check_like(op, hessians[i], params[i], "hessian", i);
    check_scalar(op, steps[i], "step", i, at::kLong);
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    steps[i].add_(1);
    at::Tensor p = params[i], exp_avg = exp_avgs[i];
    rules::sophia_update(p, grads[i].detach(), exp_avg, hessians[i], lr, beta1, rho, eps, weight_decay);
  }
}

at::Tensor adahessian_diagonal(const at::Tensor& estimate) {
  at::NoGradGuard no_grad;
  return rules::adahessian_diagonal(estimate.detach());
}

void adahessian_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_hessian_diag_sqs,
                        const std::vector<at::Tensor>& diagonals, const std::vector<at::Tensor>& steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, double hessian_power) {
  constexpr const char* op = "adahessian_update_";
  check_lengths(op, {{"parameter", params.size()}, {"gradient", grads.size()}, {"exp_avg", exp_avgs.size()},
                     {"exp_hessian_diag_sq", exp_hessian_diag_sqs.size()}, {"diagonal", diagonals.size()},
                     {"step", steps.size()}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, params[i], i);
    check_like(op, grads[i], params[i], "grad", i);
    check_like(op, exp_avgs[i], params[i], "exp_avg", i);
    check_like(op, exp_hessian_diag_sqs[i], params[i], "exp_hessian_diag_sq", i);
    check_like(op, diagonals[i], params[i], "diagonal", i);
    check_scalar(op, steps[i], "step", i, at::kLong);
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    steps[i].add_(1);
    at::Tensor p = params[i], exp_avg = exp_avgs[i], exp_sq = exp_hessian_diag_sqs[i];
    rules::adahessian_update(p, grads[i].detach(), exp_avg, exp_sq, diagonals[i], steps[i].item<int64_t>(), lr, beta1,
                             beta2, eps, weight_decay, hessian_power);
  }
}

void nag_gs_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& velocities, const std::vector<at::Tensor>& gammas,
                    const std::vector<at::Tensor>& steps, double alpha, double mu) {
  constexpr const char* op = "nag_gs_update_";
  check_lengths(op, {{"parameter", params.size()}, {"gradient", grads.size()}, {"velocity", velocities.size()},
                     {"gamma", gammas.size()}, {"step", steps.size()}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, params[i], i);
    check_like(op, grads[i], params[i], "grad", i);
    check_like(op, velocities[i], params[i], "velocity", i);
    check_scalar(op, gammas[i], "gamma", i, at::kDouble);
    check_scalar(op, steps[i], "step", i, at::kLong);
  }
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i], velocity = velocities[i];
    const double gamma = rules::nag_gs_update(p, grads[i].detach(), velocity, gammas[i].item<double>(), alpha, mu);
    gammas[i].fill_(gamma);
    steps[i].add_(1);
  }
}

// The overflow rule's bound on a NAG-GS step of each parameter (rules::nag_gs_step_bounded),
// from the largest magnitudes of parameters, velocities and gradients, read in one go.
c10::List<bool> nag_gs_bounded(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& velocities,
                                 const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& gammas,
                                 double alpha, double mu) {
  constexpr const char* op = "nag_gs_bounded";
  check_lengths(op, {{"parameter", params.size()}, {"velocity", velocities.size()}, {"gradient", grads.size()},
                     {"gamma", gammas.size()}});
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, params[i], i);
    check_like(op, velocities[i], params[i], "velocity", i);
    check_like(op, grads[i], params[i], "grad", i);
    check_scalar(op, gammas[i], "gamma", i, at::kDouble);
    tensors.insert(tensors.end(), {params[i], velocities[i], grads[i]});
  }
  const at::Tensor magnitudes = health::max_magnitudes(tensors).cpu();
  const double* m = magnitudes.data_ptr<double>();
  c10::List<bool> out;
  for (size_t i = 0; i < params.size(); ++i)
    out.push_back(rules::nag_gs_step_bounded(m[3 * i], m[3 * i + 1], m[3 * i + 2], gammas[i].item<double>(), alpha,
                                             mu, params[i].scalar_type()));
  return out;
}

// ------------------------------------------------------------------ M-FAC

mfac::WindowLayout window_layout(const char* op, const at::Tensor& param, int64_t window, int64_t bits,
                                 c10::string_view mapping, int64_t block_size) {
  TORCH_CHECK(window >= 1, "lowbit::", op, ": window must be >= 1; got ", window);
  TORCH_CHECK(bits == 32 || bits == 8 || bits == 4, "lowbit::", op, ": bits must be 32, 8 or 4; got ", bits);
  mfac::WindowLayout layout;
  layout.size = window;
  layout.dim = param.numel();
  layout.bits = static_cast<int>(bits);
  layout.mapping = parse_mapping(std::string_view(mapping.data(), mapping.size()));
  check_mapping_options(layout.mapping, bits, Rounding::Nearest, false, std::string("lowbit::") + op + ": ");
  if (layout.quantized()) check_block_size(block_size, (std::string("lowbit::") + op + ": block_size").c_str());
  layout.block_size = block_size;
  return layout;
}

const std::vector<std::string>& window_entries() {
  static const std::vector<std::string> names = {"rows", "codes", "scales", "centroids", "gram", "count"};
  return names;
}

at::Tensor entry(const c10::Dict<std::string, at::Tensor>& d, const std::string& name) {
  const auto it = d.find(name);
  return it == d.end() ? at::Tensor() : it->value();
}

c10::Dict<std::string, at::Tensor> mfac_window(const at::Tensor& param, int64_t window, int64_t bits,
                                               c10::string_view mapping, int64_t block_size) {
  const mfac::WindowLayout layout = window_layout("mfac_window", param, window, bits, mapping, block_size);
  const mfac::WindowTensors w = mfac::make_window(layout, param.options());
  c10::Dict<std::string, at::Tensor> d;
  if (w.rows.defined()) d.insert("rows", w.rows);
  if (w.codes.defined()) d.insert("codes", w.codes);
  if (w.scales.defined()) d.insert("scales", w.scales);
  if (w.centroids.defined()) d.insert("centroids", w.centroids);
  d.insert("gram", w.gram);
  d.insert("count", at::scalar_tensor(w.count, at::kLong));  // on the CPU, like torch's `step` counters
  return d;
}

void mfac_check_window(const at::Tensor& param, const c10::Dict<std::string, at::Tensor>& window, int64_t size,
                       int64_t bits, c10::string_view mapping, int64_t block_size, c10::string_view who_view) {
  const std::string who(who_view.data(), who_view.size());
  const mfac::WindowLayout layout = window_layout("mfac_check_window", param, size, bits, mapping, block_size);
  for (const auto& e : window) {
    const auto& names = window_entries();
    TORCH_CHECK(std::find(names.begin(), names.end(), e.key()) != names.end(), who, ": unknown M-FAC window entry \"",
                e.key(), "\"; the entries are rows (bits=32) or codes and scales (bits=8, 4; and centroids with "
                "mapping \"kashin\"), gram and count");
  }
  const at::Tensor count = entry(window, "count");
  TORCH_CHECK(count.defined() && count.numel() == 1 && count.scalar_type() == at::kLong, who,
              ": the M-FAC window needs \"count\", a one-element int64 tensor");
  mfac::WindowTensors w;
  w.rows = entry(window, "rows");
  w.codes = entry(window, "codes");
  w.scales = entry(window, "scales");
  w.centroids = entry(window, "centroids");
  w.gram = entry(window, "gram");
  w.count = count.item<int64_t>();
  mfac::check_window(w, layout, who);
}

void mfac_update_(const at::Tensor& param, const at::Tensor& grad, const c10::optional<at::Tensor>& rows,
                  const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& scales,
                  const c10::optional<at::Tensor>& centroids, const at::Tensor& gram, const at::Tensor& count, const at::Tensor& step,
                  const c10::optional<at::Tensor>& momentum_buffer, int64_t window, int64_t bits,
                  c10::string_view mapping, int64_t block_size, double lr, double momentum, double weight_decay,
                  double damping) {
  constexpr const char* op = "mfac_update_";
  check_param(op, param, 0);
  check_like(op, grad, param, "grad", 0);
  check_scalar(op, count, "count", 0, at::kLong);
  check_scalar(op, step, "step", 0, at::kLong);
  const mfac::WindowLayout layout = window_layout(op, param, window, bits, mapping, block_size);
  mfac::WindowTensors w;
  w.rows = rows.value_or(at::Tensor());
  w.codes = codes.value_or(at::Tensor());
  w.scales = scales.value_or(at::Tensor());
  w.centroids = centroids.value_or(at::Tensor());
  w.gram = gram;
  w.count = count.item<int64_t>();
  mfac::check_window(w, layout, "lowbit::mfac_update_");
  const std::vector<std::pair<at::Tensor, const char*>> stored = {
      {w.rows, "rows"}, {w.codes, "codes"}, {w.scales, "scales"}, {w.centroids, "centroids"}, {w.gram, "gram"}};
  for (const auto& [t, name] : stored)
    TORCH_CHECK(!t.defined() || t.device() == param.device(), "lowbit::mfac_update_: M-FAC window tensor \"", name,
                "\" is on ", t.device(), " but the parameter is on ", param.device());
  at::Tensor buffer = momentum_buffer.value_or(at::Tensor());
  // The C++ optimizer creates the buffer as a clone of the first direction d; a zero buffer
  // gives momentum * 0 + d = d, the same numbers, and lets the op write in place.
  TORCH_CHECK(momentum == 0 || buffer.defined(), "lowbit::mfac_update_: momentum ", momentum,
              " needs a momentum_buffer (zeros shaped like the parameter before the first step)");
  if (buffer.defined()) check_like(op, buffer, param, "momentum_buffer", 0);
  at::NoGradGuard no_grad;
  at::Tensor p = param;
  rules::mfac_update(p, grad.detach(), w, layout, buffer, lr, momentum, weight_decay, damping);
  count.fill_(w.count);
  step.add_(1);
}

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using namespace lowbit::bindings;
  m.def("second_order_options(str optimizer, Dict(str, Any) options) -> Dict(str, Any)", &second_order_options);
  m.def("probe_seed(int seed, int step) -> int", &probe_seed);
  m.def("ema_(Tensor(a!)[] avgs, Tensor[] xs, float beta) -> ()", &ema_);
  m.def("sophia_gnb_hessian_(Tensor(a!)[] hessians, Tensor[] grads, int batch_size, float beta2) -> ()",
        &sophia_gnb_hessian_);
  m.def(
      "sophia_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] hessians, "
      "Tensor(c!)[] steps, float lr, float beta1, float rho, float eps, float weight_decay) -> ()",
      &sophia_update_);
  m.def("adahessian_diagonal(Tensor estimate) -> Tensor", &adahessian_diagonal);
  m.def(
      "adahessian_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hessian_diag_sqs, Tensor[] diagonals, Tensor(d!)[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, float hessian_power) -> ()",
      &adahessian_update_);
  m.def(
      "nag_gs_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] velocities, Tensor(c!)[] gammas, "
      "Tensor(d!)[] steps, float alpha, float mu) -> ()",
      &nag_gs_update_);
  m.def(
      "nag_gs_bounded(Tensor[] params, Tensor[] velocities, Tensor[] grads, Tensor[] gammas, float alpha, float mu) "
      "-> bool[]",
      &nag_gs_bounded);
  m.def(
      "mfac_window(Tensor param, int window, int bits=32, str mapping=\"dynamic\", int block_size=64) "
      "-> Dict(str, Tensor)",
      &mfac_window);
  m.def(
      "mfac_check_window(Tensor param, Dict(str, Tensor) window, int size, int bits, str mapping, int block_size, "
      "str who) -> ()",
      &mfac_check_window);
  m.def(
      "mfac_update_(Tensor(a!) param, Tensor grad, Tensor(b!)? rows, Tensor(c!)? codes, Tensor(d!)? scales, "
      "Tensor(i!)? centroids, Tensor(e!) gram, Tensor(f!) count, Tensor(g!) step, Tensor(h!)? momentum_buffer, int window, int bits, "
      "str mapping, int block_size, float lr, float momentum, float weight_decay, float damping) -> ()",
      &mfac_update_);
}
