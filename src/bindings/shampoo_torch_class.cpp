// Shampoo for Python: torch custom classes (torch.classes.lowbit.*) and a few ops that
// the `lowbit` Python package drives. The algorithm is the C++ one (shampoo_param_step,
// the preconditioners, the codec); this file only converts options and state.
//
//   ShampooConfig(Dict[str, Any])   validated lowbit::ShampooOptions from {name: value}
//   ShampooParam(param, config)     one parameter's ShampooParamState, with step(),
//                                   state_dict() / load_state_dict() of plain tensors
//   lowbit::shampoo_step            one step of a list of ShampooParams (one call per group)
//   lowbit::first_nonfinite         index of the first tensor holding NaN/Inf, or -1
//   lowbit::quantize_matrix / dequantize_matrix   QuantizedMatrix as a dict of tensors
#include <torch/custom_class.h>
#include <torch/library.h>

#include <lowbit/quantized_matrix.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "optim/shampoo_internal.h"

namespace lowbit {
namespace {

constexpr const char* kWho = "lowbit.Shampoo: ";
constexpr const char* kPreconditionerPrefix = "preconditioner.";

// ------------------------------------------------------------------ options from a dict

[[noreturn]] void bad_type(const std::string& name, const char* expected, const c10::IValue& v) {
  TORCH_CHECK(false, kWho, name, " must be ", expected, "; got a value of type ", v.type()->str());
}

double as_number(const std::string& name, const c10::IValue& v) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  bad_type(name, "a number", v);
}

int64_t as_int(const std::string& name, const c10::IValue& v) {
  if (v.isInt()) return v.toInt();
  bad_type(name, "an int", v);
}

bool as_bool(const std::string& name, const c10::IValue& v) {
  if (v.isBool()) return v.toBool();
  bad_type(name, "a bool", v);
}

std::string as_string(const std::string& name, const c10::IValue& v) {
  if (v.isString()) return v.toStringRef();
  bad_type(name, "a str", v);
}

std::vector<c10::IValue> as_pair(const std::string& name, const c10::IValue& v) {
  std::vector<c10::IValue> items;
  if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) items.push_back(e);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) items.push_back(e);
  }
  TORCH_CHECK((v.isTuple() || v.isList()) && items.size() == 2, kWho, name, " must be a pair (a, b); got ",
              v.isTuple() || v.isList() ? std::to_string(items.size()) + " values" : "a " + v.type()->str());
  return items;
}

using Setter = std::function<void(ShampooOptions&, const std::string&, const c10::IValue&)>;

// Every option of lowbit::ShampooOptions under its C++ (and Python) name.
const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> table = {
      {"lr", [](auto& o, auto& n, auto& v) { o.lr(as_number(n, v)); }},
      {"graft", [](auto& o, auto& n, auto& v) { o.graft(as_string(n, v)); }},
      {"momentum", [](auto& o, auto& n, auto& v) { o.momentum(as_number(n, v)); }},
      {"nesterov", [](auto& o, auto& n, auto& v) { o.nesterov(as_bool(n, v)); }},
      {"betas",
       [](auto& o, auto& n, auto& v) {
         const auto b = as_pair(n, v);
         o.betas(std::make_tuple(as_number(n + "[0]", b[0]), as_number(n + "[1]", b[1])));
       }},
      {"eps", [](auto& o, auto& n, auto& v) { o.eps(as_number(n, v)); }},
      {"weight_decay", [](auto& o, auto& n, auto& v) { o.weight_decay(as_number(n, v)); }},
      {"bits", [](auto& o, auto& n, auto& v) { o.bits(as_int(n, v)); }},
      {"quantize", [](auto& o, auto& n, auto& v) { o.quantize(as_string(n, v)); }},
      {"mapping", [](auto& o, auto& n, auto& v) { o.mapping(as_string(n, v)); }},
      {"quant_block_size", [](auto& o, auto& n, auto& v) { o.quant_block_size(as_int(n, v)); }},
      {"double_quant_scales", [](auto& o, auto& n, auto& v) { o.double_quant_scales(as_bool(n, v)); }},
      {"min_quant_numel", [](auto& o, auto& n, auto& v) { o.min_quant_numel(as_int(n, v)); }},
      {"max_preconditioner_dim", [](auto& o, auto& n, auto& v) { o.max_preconditioner_dim(as_int(n, v)); }},
      {"stat_decay", [](auto& o, auto& n, auto& v) { o.stat_decay(as_number(n, v)); }},
      {"epsilon", [](auto& o, auto& n, auto& v) { o.epsilon(as_number(n, v)); }},
      {"stat_interval", [](auto& o, auto& n, auto& v) { o.stat_interval(as_int(n, v)); }},
      {"root_interval", [](auto& o, auto& n, auto& v) { o.root_interval(as_int(n, v)); }},
      {"start_preconditioning_step",
       [](auto& o, auto& n, auto& v) { o.start_preconditioning_step(as_int(n, v)); }},
      {"rectify_steps",
       [](auto& o, auto& n, auto& v) {
         const auto t = as_pair(n, v);
         o.rectify_steps(std::make_tuple(as_int(n + "[0]", t[0]), as_int(n + "[1]", t[1])));
       }},
      {"root_method", [](auto& o, auto& n, auto& v) { o.root_method(as_string(n, v)); }},
      {"eigen_update", [](auto& o, auto& n, auto& v) { o.eigen_update(as_string(n, v)); }},
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v)); }},
  };
  return table;
}

// The one place where Python options become C++ options: unknown names and wrong types
// are rejected by name, then every value is validated as ShampooOptions::validate does.
ShampooOptions options_from_dict(const c10::Dict<std::string, c10::IValue>& dict) {
  ShampooOptions o;
  for (const auto& entry : dict) {
    const auto it = setters().find(entry.key());
    if (it == setters().end()) {
      std::string names;
      for (const auto& [name, setter] : setters()) names += (names.empty() ? "" : ", ") + name;
      TORCH_CHECK(false, kWho, "unknown option \"", entry.key(), "\"; the options are ", names);
    }
    it->second(o, entry.key(), entry.value());
  }
  validate_options(o, kWho);
  return o;
}

c10::Dict<std::string, c10::IValue> options_to_dict(const ShampooOptions& o) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("lr", o.lr());
  d.insert("graft", o.graft());
  d.insert("momentum", o.momentum());
  d.insert("nesterov", o.nesterov());
  d.insert("betas", c10::ivalue::Tuple::create(std::get<0>(o.betas()), std::get<1>(o.betas())));
  d.insert("eps", o.eps());
  d.insert("weight_decay", o.weight_decay());
  d.insert("bits", o.bits());
  d.insert("quantize", o.quantize());
  d.insert("mapping", o.mapping());
  d.insert("quant_block_size", o.quant_block_size());
  d.insert("double_quant_scales", o.double_quant_scales());
  d.insert("min_quant_numel", o.min_quant_numel());
  d.insert("max_preconditioner_dim", o.max_preconditioner_dim());
  d.insert("stat_decay", o.stat_decay());
  d.insert("epsilon", o.epsilon());
  d.insert("stat_interval", o.stat_interval());
  d.insert("root_interval", o.root_interval());
  d.insert("start_preconditioning_step", o.start_preconditioning_step());
  d.insert("rectify_steps",
           c10::ivalue::Tuple::create(std::get<0>(o.rectify_steps()), std::get<1>(o.rectify_steps())));
  d.insert("root_method", o.root_method());
  d.insert("eigen_update", o.eigen_update());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  return c10::impl::toTypedDict<std::string, c10::IValue>(std::move(d));
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// ------------------------------------------------------------------ custom classes

// Validated options, built once per change of a param group's options (not per step).
struct ShampooConfig : torch::CustomClassHolder {
  explicit ShampooConfig(const c10::Dict<std::string, c10::IValue>& dict) : options(options_from_dict(dict)) {}
  c10::Dict<std::string, c10::IValue> to_dict() const { return options_to_dict(options); }
  ShampooOptions options;
};

class ShampooParam;
void shampoo_step(const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& grads, const c10::intrusive_ptr<ShampooConfig>& config);

// One parameter's Shampoo state. Options come with every step, so lr schedules and group
// edits take effect; options that decide the state layout may not change, the other
// preconditioner settings (stat_decay, epsilon, ...) rebuild the preconditioner around
// its saved state.
class ShampooParam : public torch::CustomClassHolder {
 public:
  ShampooParam(const at::Tensor& p, const c10::intrusive_ptr<ShampooConfig>& config)
      : options_(config->options), shape_(p.sizes().vec()), device_(p.device()),
        state_(make_param_state(p, options_, {})) {}

  void step(at::Tensor p, const at::Tensor& grad, const c10::intrusive_ptr<ShampooConfig>& config) {
    check_param(p);
    const ShampooOptions& o = config->options;
    const std::vector<std::string> layout = structural_differences(options_, o);
    TORCH_CHECK(layout.empty(), kWho, "cannot change ", join(layout),
                " after the first step (they decide the layout of the state); make a new optimizer, or "
                "load a checkpoint into one built with the new options");
    if (!preconditioner_differences(options_, o).empty()) reconfigure(p, o);
    if (p.device() != device_) install(state_dict(), p, kWho, "the state moving to " + p.device().str());
    at::NoGradGuard no_grad;
    shampoo_param_step(p, grad, state_, o);
  }

  c10::Dict<std::string, at::Tensor> state_dict() const {
    c10::Dict<std::string, at::Tensor> d;
    d.insert("step", at::scalar_tensor(state_.step(), at::kLong));
    d.insert("root_updates", at::scalar_tensor(state_.root_updates(), at::kLong));
    if (state_.momentum_buffer().defined()) d.insert("momentum_buffer", state_.momentum_buffer());
    if (state_.exp_avg().defined()) d.insert("exp_avg", state_.exp_avg());
    if (state_.exp_avg_sq().defined()) d.insert("exp_avg_sq", state_.exp_avg_sq());
    if (state_.preconditioner) {
      precond::TensorMap entries;
      state_.preconditioner->save(entries);
      for (const auto& [name, tensor] : entries) d.insert(kPreconditionerPrefix + name, tensor);
    }
    return d;
  }

  // Validates everything (entry names, counts, shapes, dtypes, the preconditioner layout)
  // before replacing the state; on error nothing changes. Messages start with `who` and
  // call the parameter `what`.
  void load_state_dict(const at::Tensor& p, const c10::Dict<std::string, at::Tensor>& d, const std::string& who,
                       const std::string& what) {
    check_param(p);
    install(d, p, who, what);
  }

  std::tuple<int64_t, int64_t> state_bytes() const {
    int64_t first_order = 0;
    for (const at::Tensor* t : {&state_.momentum_buffer(), &state_.exp_avg(), &state_.exp_avg_sq()})
      if (t->defined()) first_order += t->numel() * static_cast<int64_t>(t->element_size());
    return {state_.preconditioner ? state_.preconditioner->state_bytes() : 0, first_order};
  }
  int64_t steps() const { return state_.step(); }
  int64_t root_updates() const { return state_.root_updates(); }
  int64_t root_failures() const {
    return earlier_failures_ + (state_.preconditioner ? state_.preconditioner->failures() : 0);
  }
  bool preconditioned() const { return state_.preconditioner != nullptr; }
  c10::Dict<std::string, c10::IValue> options() const { return options_to_dict(options_); }

 private:
  void check_param(const at::Tensor& p) const {
    TORCH_CHECK(p.sizes() == at::IntArrayRef(shape_), kWho, "the parameter has shape ", p.sizes(),
                " but its state was made for shape ", at::IntArrayRef(shape_));
  }

  static int64_t read_count(const at::Tensor& t, const char* name, const std::string& who, const std::string& what) {
    TORCH_CHECK(t.defined() && t.numel() == 1 && !at::isFloatingType(t.scalar_type()) &&
                    !at::isComplexType(t.scalar_type()) && t.scalar_type() != at::kBool,
                who, what, ": checkpoint entry \"", name, "\" must be a one-element integer tensor; got ",
                t.defined() ? t.toString() : "undefined", " of shape ", t.defined() ? t.sizes() : at::IntArrayRef{});
    return t.item<int64_t>();
  }

  // Replaces the state by the one in `d`, checked against p and this object's options.
  void install(const c10::Dict<std::string, at::Tensor>& d, const at::Tensor& p, const std::string& who,
               const std::string& what) {
    ShampooParamState staged;
    bool has_step = false, has_roots = false;
    for (const auto& entry : d) {
      const std::string& key = entry.key();
      const at::Tensor& t = entry.value();
      if (key == "step") {
        staged.step(read_count(t, "step", who, what));
        has_step = true;
      } else if (key == "root_updates") {
        staged.root_updates(read_count(t, "root_updates", who, what));
        has_roots = true;
      } else if (key == "momentum_buffer") {
        staged.momentum_buffer(t);
      } else if (key == "exp_avg") {
        staged.exp_avg(t);
      } else if (key == "exp_avg_sq") {
        staged.exp_avg_sq(t);
      } else if (key.rfind(kPreconditionerPrefix, 0) == 0) {
        staged.loaded_preconditioner[key.substr(std::string(kPreconditionerPrefix).size())] = t;
      } else {
        TORCH_CHECK(false, who, what, ": checkpoint entry \"", key, "\" is not part of a Shampoo state (expected step, "
                    "root_updates, momentum_buffer, exp_avg, exp_avg_sq, preconditioner.*)");
      }
    }
    TORCH_CHECK(has_step && has_roots, who, "the checkpoint of ", what, " has no \"",
                has_step ? "root_updates" : "step", "\" entry");
    install_checkpoint_state(staged, p, options_, {}, who, what);
    state_ = std::move(staged);
    device_ = p.device();
    earlier_failures_ = 0;
  }

  // New preconditioner settings: a preconditioner built with them, holding the saved state.
  void reconfigure(const at::Tensor& p, const ShampooOptions& o) {
    if (state_.preconditioner) {
      precond::TensorMap entries;
      state_.preconditioner->save(entries);
      auto rebuilt = std::make_shared<precond::ParameterPreconditioner>(p.sizes(), p.options(),
                                                                        preconditioner_config(o, {}));
      rebuilt->load(entries);
      earlier_failures_ += state_.preconditioner->failures();
      state_.preconditioner = std::move(rebuilt);
    }
    options_ = o;
  }

  ShampooOptions options_;  // those the state was built with (layout and preconditioner config)
  std::vector<int64_t> shape_;
  at::Device device_;
  ShampooParamState state_;
  int64_t earlier_failures_ = 0;  // root failures of preconditioners replaced by reconfigure()
};

// ------------------------------------------------------------------ ops

// One step of every (parameter, gradient) pair of a param group: one call from Python
// per group instead of one per parameter.
void shampoo_step(const std::vector<c10::intrusive_ptr<ShampooParam>>& states, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& grads, const c10::intrusive_ptr<ShampooConfig>& config) {
  TORCH_CHECK(states.size() == params.size() && params.size() == grads.size(), kWho,
              "shampoo_step needs as many states, parameters and gradients; got ", states.size(), ", ",
              params.size(), " and ", grads.size());
  for (size_t i = 0; i < states.size(); ++i) states[i]->step(params[i], grads[i], config);
}

int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i)
    if (!all_finite(tensors[i])) return static_cast<int64_t>(i);
  return -1;
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
  std::map<std::string, at::Tensor> state;
  for (const auto& entry : d) state[entry.key()] = entry.value();
  return QuantizedMatrix::from_state(state).dequantize(dtype);
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using lowbit::ShampooConfig;
  using lowbit::ShampooParam;
  auto config = m.class_<ShampooConfig>("ShampooConfig")
                    .def(torch::init<c10::Dict<std::string, c10::IValue>>())
                    .def("to_dict", &ShampooConfig::to_dict);
  m.class_<ShampooParam>("ShampooParam")
      .def(torch::init<at::Tensor, c10::intrusive_ptr<ShampooConfig>>())
      .def("step", &ShampooParam::step)
      .def("state_dict", &ShampooParam::state_dict)
      .def("load_state_dict", &ShampooParam::load_state_dict)
      .def("state_bytes", &ShampooParam::state_bytes)
      .def("steps", &ShampooParam::steps)
      .def("root_updates", &ShampooParam::root_updates)
      .def("root_failures", &ShampooParam::root_failures)
      .def("preconditioned", &ShampooParam::preconditioned)
      .def("options", &ShampooParam::options);
  // The group step as a method of the config too (once ShampooParam is known): calling a
  // method from Python skips the Python-level work of a torch.ops call (docs/BENCHMARKS.md).
  config.def("step", [](const c10::intrusive_ptr<ShampooConfig>& self,
                        const std::vector<c10::intrusive_ptr<ShampooParam>>& states,
                        const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
    lowbit::shampoo_step(states, params, grads, self);
  });
  m.def(
      "shampoo_step(__torch__.torch.classes.lowbit.ShampooParam[] states, Tensor(a!)[] params, Tensor[] grads, "
      "__torch__.torch.classes.lowbit.ShampooConfig config) -> ()",
      &lowbit::shampoo_step);
  m.def("first_nonfinite(Tensor[] tensors) -> int", &lowbit::first_nonfinite);
  m.def(
      "quantize_matrix(Tensor matrix, int bits=4, str mapping=\"linear2\", int block_size=64, "
      "bool keep_diagonal=False, bool double_quant_scales=False, bool stochastic=False, int seed=0) "
      "-> Dict(str, Tensor)",
      &lowbit::quantize_matrix);
  m.def("dequantize_matrix(Dict(str, Tensor) state, ScalarType dtype=float) -> Tensor", &lowbit::dequantize_matrix);
}
