// Shampoo for Python: torch custom classes (torch.classes.lowbit.*) and a few ops that
// the `lowbit` Python package drives. The algorithm is the C++ one (shampoo_param_step,
// the preconditioners, the codec); the classes (shampoo_param.h) only convert options and
// state, and this file registers them.
//
//   ShampooConfig(Dict[str, Any])   validated lowbit::ShampooOptions from {name: value}
//   ShampooParam(param, config)     one parameter's ShampooParamState, with step(),
//                                   state_dict() / load_state_dict() of plain tensors
//   ShampooEngine()                 the batched step of every parameter of an optimizer (one
//                                   call per step, all groups), with its reused workspace
//   lowbit::shampoo_step            one step of a list of ShampooParams (one group)
//   lowbit::first_nonfinite         index of the first tensor holding NaN/Inf, or -1 (the
//                                   optimizers use squared_norms / first_offence: health_ops.cpp)
//   lowbit::quantize_matrix / dequantize_matrix   QuantizedMatrix as a dict of tensors
#include <torch/custom_class.h>
#include <torch/library.h>

#include <lowbit/quantized_matrix.h>

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "bindings/shampoo_param.h"
#include "optim/gradient_health.h"
#include "quant/codec_checks.h"
#include "optim/shampoo_engine.h"

namespace lowbit::bindings {
namespace {

// ------------------------------------------------------------------ ops

// The engine of one Python optimizer: its steps are batched across all parameters and
// groups, and its workspace is reused from step to step.
struct ShampooEngineHolder : torch::CustomClassHolder {
  // One step of every (parameter, gradient) pair, each with its group's config.
  void step(const std::vector<c10::intrusive_ptr<ShampooConfig>>& configs,
            const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
            const std::vector<at::Tensor>& grads) {
    TORCH_CHECK(configs.size() == states.size() && states.size() == params.size() && params.size() == grads.size(),
                kWho, "the step needs as many configs, states, parameters and gradients; got ", configs.size(), ", ",
                states.size(), ", ", params.size(), " and ", grads.size());
    std::vector<ParamStepRef> refs;
    for (size_t i = 0; i < states.size(); ++i)
      refs.push_back({params[i], grads[i], &states[i]->prepare(params[i], configs[i]), &configs[i]->options});
    at::NoGradGuard no_grad;
    engine.step(refs);
  }
  // The step checked on the device (ShampooEngine::can_defer), when it may be: true when it
  // was taken, false when it is to be checked now and taken by step(). `groups` / `indices`:
  // where each parameter stands, for the message settle() may raise later.
  bool step_deferred(const std::vector<c10::intrusive_ptr<ShampooConfig>>& configs,
                     const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
                     const std::vector<at::Tensor>& grads, const std::vector<int64_t>& groups,
                     const std::vector<int64_t>& indices, const std::string& gradient_check) {
    TORCH_CHECK(configs.size() == states.size() && states.size() == params.size() && params.size() == grads.size() &&
                    grads.size() == groups.size() && groups.size() == indices.size(),
                kWho, "step_deferred needs one config, state, parameter, gradient, group and index per parameter");
    std::vector<ParamStepRef> refs;
    for (size_t i = 0; i < states.size(); ++i) {
      ShampooParamState* state = states[i]->ready(params[i], configs[i]);
      if (state == nullptr) return false;  // moving or reconfiguring first: checked now
      refs.push_back({params[i], grads[i], state, &configs[i]->options, groups[i], indices[i]});
    }
    if (!engine.can_defer(refs, gradient_check)) return false;
    at::NoGradGuard no_grad;
    engine.step_deferred(refs);
    return true;
  }
  // Reads the verdict of deferred steps (raises if one failed), or forgets them.
  void settle() { engine.settle("lowbit.Shampoo"); }
  void discard_deferred() { engine.discard_deferred(); }
  int64_t workspace_bytes() const { return engine.workspace().bytes(); }
  // The engine-wide options (the optimizer's defaults): see ShampooOptions.
  void configure(double workspace_mb) {
    TORCH_CHECK(workspace_mb >= 0 && workspace_mb <= 1e9, kWho, "workspace_mb must be in [0, 1e9] (0: automatic); got ",
                workspace_mb);
    engine.set_workspace_bytes(static_cast<int64_t>(workspace_mb * (1 << 20)));
  }
  ShampooEngine engine;
};

// One step of every (parameter, gradient) pair of a param group.
void shampoo_step(const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& grads, const c10::intrusive_ptr<ShampooConfig>& config) {
  TORCH_CHECK(states.size() == params.size() && params.size() == grads.size(), kWho,
              "shampoo_step needs as many states, parameters and gradients; got ", states.size(), ", ",
              params.size(), " and ", grads.size());
  ShampooEngineHolder engine;
  engine.step(std::vector<c10::intrusive_ptr<ShampooConfig>>(states.size(), config), states, params, grads);
}

int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  return health::first_offence(health::squared_norms(tensors), std::numeric_limits<double>::infinity()).index;
}

c10::Dict<std::string, at::Tensor> quantize_matrix(const at::Tensor& matrix, int64_t bits, c10::string_view mapping,
                                                   int64_t block_size, bool keep_diagonal, bool double_quant_scales,
                                                   bool stochastic, int64_t seed) {
  check_bits(bits, "lowbit.quantize: bits");
  QuantOptions o;
  o.bits = static_cast<int>(bits);
  o.mapping = parse_mapping(std::string_view(mapping.data(), mapping.size()));
  o.block_size = block_size;
  o.keep_diagonal = keep_diagonal;
  o.double_quant_scales = double_quant_scales;
  o.rounding = stochastic ? Rounding::Stochastic : Rounding::Nearest;
  TORCH_CHECK(seed >= 0, "lowbit.quantize: seed must be >= 0; got ", seed);
  o.seed = static_cast<uint64_t>(seed);
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [name, tensor] : QuantizedMatrix::quantize(matrix, o).state()) d.insert(name, tensor);
  return d;
}

at::Tensor dequantize_matrix(const c10::Dict<std::string, at::Tensor>& d, at::ScalarType dtype) {
  checks::output_dtype("lowbit::dequantize_matrix", dtype);
  std::map<std::string, at::Tensor> state;
  for (const auto& entry : d) state[entry.key()] = entry.value();
  return QuantizedMatrix::from_state(state).dequantize(dtype);
}

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using lowbit::bindings::ShampooConfig;
  using lowbit::bindings::ShampooParam;
  auto config = m.class_<ShampooConfig>("ShampooConfig")
                    .def(torch::init<c10::Dict<std::string, c10::IValue>>())
                    .def("to_dict", &ShampooConfig::to_dict)
                    .def("update_bounded", &ShampooConfig::update_bounded)
                    .def("overflow_key", &ShampooConfig::overflow_key);
  m.class_<ShampooParam>("ShampooParam")
      .def(torch::init<at::Tensor, c10::intrusive_ptr<ShampooConfig>>())
      .def("step", &ShampooParam::step)
      .def("trial_step", &ShampooParam::trial_step)
      .def("state_dict", &ShampooParam::state_dict)
      .def("load_state_dict", &ShampooParam::load_state_dict)
      .def("state_bytes", &ShampooParam::state_bytes)
      .def("steps", &ShampooParam::steps)
      .def("root_updates", &ShampooParam::root_updates)
      .def("root_failures", &ShampooParam::root_failures)
      .def("preconditioned", &ShampooParam::preconditioned)
      .def("options", &ShampooParam::options);
  m.class_<lowbit::bindings::ShampooEngineHolder>("ShampooEngine")
      .def(torch::init<>())
      .def("step", &lowbit::bindings::ShampooEngineHolder::step)
      .def("workspace_bytes", &lowbit::bindings::ShampooEngineHolder::workspace_bytes)
      .def("configure", &lowbit::bindings::ShampooEngineHolder::configure)
      .def("step_deferred", &lowbit::bindings::ShampooEngineHolder::step_deferred)
      .def("settle", &lowbit::bindings::ShampooEngineHolder::settle)
      .def("discard_deferred", &lowbit::bindings::ShampooEngineHolder::discard_deferred);
  // The group step as a method of the config too (once ShampooParam is known): calling a
  // method from Python skips the Python-level work of a torch.ops call (docs/BENCHMARKS.md).
  config.def("step", [](const c10::intrusive_ptr<ShampooConfig>& self,
                        const std::vector<c10::intrusive_ptr<ShampooParam>>& states,
                        const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
    lowbit::bindings::shampoo_step(states, params, grads, self);
  });
  m.def(
      "shampoo_step(__torch__.torch.classes.lowbit.ShampooParam[] states, Tensor(a!)[] params, Tensor[] grads, "
      "__torch__.torch.classes.lowbit.ShampooConfig config) -> ()",
      &lowbit::bindings::shampoo_step);
  m.def("first_nonfinite(Tensor[] tensors) -> int", &lowbit::bindings::first_nonfinite);
  m.def(
      "quantize_matrix(Tensor matrix, int bits=4, str mapping=\"linear2\", int block_size=64, "
      "bool keep_diagonal=False, bool double_quant_scales=False, bool stochastic=False, int seed=0) "
      "-> Dict(str, Tensor)",
      &lowbit::bindings::quantize_matrix);
  m.def("dequantize_matrix(Dict(str, Tensor) state, ScalarType dtype=float) -> Tensor", &lowbit::bindings::dequantize_matrix);
}
