// The overflow rule (optim/gradient_health.h) for Python: the ops the Python optimizers call
// before they write anything, so that both front ends apply one rule with one wording.
//
//   squared_norms(tensors)                      fp64 squared Frobenius norms, one tensor
//   first_offence(squared_norms, limit=None)    (index, value) of the first entry beyond the
//                                               rule (limit None: 2^104), or (-1, 0.0)
//   offence_message(what, key, squared_norm)    "<what> has a NaN or Inf gradient" / "<what>:
//                                               its gradient's squared norm ... exceeds 2^104: ..."
//   overflow_problem(tensor, dtype)             "this step would make its <tensor> non-finite (...)"
//   max_magnitudes(tensors)                     fp64 largest |x| of each tensor, one tensor
//   update_bounded(optimizer, options)          whether the options bound an fp32 / bf16
//                                               parameter's update (else a step is tried first)
#include <torch/library.h>

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings/options_dict.h"
#include "optim/adamw_rule.h"
#include "optim/gradient_health.h"
#include "optim/second_order/update_rules.h"

namespace lowbit::bindings {
namespace {

std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

at::Tensor squared_norms(const std::vector<at::Tensor>& tensors) { return health::squared_norms(tensors); }

std::tuple<int64_t, double> first_offence(const at::Tensor& squared_norms, c10::optional<double> limit) {
  const health::Offence o = health::first_offence(squared_norms, limit.value_or(health::kMaxGradientSquaredNorm));
  return {o.index, o.squared_norm};
}

std::string offence_message(c10::string_view what, c10::string_view key, double squared_norm) {
  return health::offence_message(str(what), health::consequence(str(key)), squared_norm);
}

std::string overflow_problem(c10::string_view tensor, at::ScalarType dtype) {
  return health::overflow_problem(str(tensor), dtype);
}

at::Tensor max_magnitudes(const std::vector<at::Tensor>& tensors) { return health::max_magnitudes(tensors); }

// `options`: the validated options of a param group (the dicts the *_options ops return).
bool update_bounded(c10::string_view optimizer, const c10::Dict<std::string, c10::IValue>& options) {
  const std::string name = str(optimizer);
  const char* who = "lowbit::update_bounded: ";
  const auto number = [&](const char* key) {
    const auto found = options.find(key);
    TORCH_CHECK(found != options.end(), who, "the ", name, " options have no \"", key, "\"");
    return as_number(key, found->value(), who);
  };
  const auto beta1 = [&] {
    const auto found = options.find("betas");
    TORCH_CHECK(found != options.end(), who, "the ", name, " options have no \"betas\"");
    return as_number("betas[0]", as_pair("betas", found->value(), who)[0], who);
  };
  if (name == "adamw") return adamw::update_bounded(number("lr"), beta1(), number("eps"), number("weight_decay"));
  if (name == "sophia") return rules::sophia_update_bounded(number("lr"), number("weight_decay"));
  if (name == "adahessian")
    return rules::adahessian_update_bounded(number("lr"), beta1(), number("eps"), number("weight_decay"));
  if (name == "mfac")
    return rules::mfac_update_bounded(number("lr"), number("momentum"), number("weight_decay"), number("damping"));
  TORCH_CHECK(false, who, "optimizer must be one of \"adamw\", \"sophia\", \"adahessian\", \"mfac\"; got \"", name,
              "\" (NAG-GS: nag_gs_bounded; Shampoo: ShampooConfig.update_bounded)");
}

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using namespace lowbit::bindings;
  m.def("squared_norms(Tensor[] tensors) -> Tensor", &squared_norms);
  m.def("first_offence(Tensor squared_norms, float? limit=None) -> (int, float)", &first_offence);
  m.def("offence_message(str what, str key, float squared_norm) -> str", &offence_message);
  m.def("overflow_problem(str tensor, ScalarType dtype) -> str", &overflow_problem);
  m.def("max_magnitudes(Tensor[] tensors) -> Tensor", &max_magnitudes);
  m.def("update_bounded(str optimizer, Dict(str, Any) options) -> bool", &update_bounded);
}
