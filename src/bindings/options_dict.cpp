#include "bindings/options_dict.h"

#include <functional>
#include <map>

#include "optim/shampoo_internal.h"

namespace lowbit::bindings {
namespace {

// ------------------------------------------------------------------ options from a dict

[[noreturn]] void bad_type(const std::string& name, const char* expected, const c10::IValue& v, const char* who) {
  TORCH_CHECK(false, who, name, " must be ", expected, "; got a value of type ", v.type()->str());
}

}  // namespace

double as_number(const std::string& name, const c10::IValue& v, const char* who) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  bad_type(name, "a number", v, who);
}

int64_t as_int(const std::string& name, const c10::IValue& v, const char* who) {
  if (v.isInt()) return v.toInt();
  bad_type(name, "an int", v, who);
}

bool as_bool(const std::string& name, const c10::IValue& v, const char* who) {
  if (v.isBool()) return v.toBool();
  bad_type(name, "a bool", v, who);
}

std::string as_string(const std::string& name, const c10::IValue& v, const char* who) {
  if (v.isString()) return v.toStringRef();
  bad_type(name, "a str", v, who);
}

std::vector<c10::IValue> as_pair(const std::string& name, const c10::IValue& v, const char* who) {
  std::vector<c10::IValue> items;
  if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) items.push_back(e);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) items.push_back(e);
  }
  TORCH_CHECK((v.isTuple() || v.isList()) && items.size() == 2, who, name, " must be a pair (a, b); got ",
              v.isTuple() || v.isList() ? std::to_string(items.size()) + " values" : "a " + v.type()->str());
  return items;
}

namespace {

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
      {"root_storage", [](auto& o, auto& n, auto& v) { o.root_storage(as_string(n, v)); }},
      {"skip_nonfinite", [](auto& o, auto& n, auto& v) { o.skip_nonfinite(as_bool(n, v)); }},
      {"preconditioner", [](auto& o, auto& n, auto& v) { o.preconditioner(as_string(n, v)); }},
      {"error_feedback", [](auto& o, auto& n, auto& v) { o.error_feedback(as_bool(n, v)); }},
      {"error_feedback_decay", [](auto& o, auto& n, auto& v) { o.error_feedback_decay(as_number(n, v)); }},
      {"graft_bits", [](auto& o, auto& n, auto& v) { o.graft_bits(as_int(n, v)); }},
      {"workspace_mb", [](auto& o, auto& n, auto& v) { o.workspace_mb(as_number(n, v)); }},
      {"gradient_check", [](auto& o, auto& n, auto& v) { o.gradient_check(as_string(n, v)); }},
  };
  return table;
}

}  // namespace

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
  d.insert("root_storage", o.root_storage());
  d.insert("skip_nonfinite", o.skip_nonfinite());
  d.insert("preconditioner", o.preconditioner());
  d.insert("error_feedback", o.error_feedback());
  d.insert("error_feedback_decay", o.error_feedback_decay());
  d.insert("graft_bits", o.graft_bits());
  d.insert("workspace_mb", o.workspace_mb());
  d.insert("gradient_check", o.gradient_check());
  return c10::impl::toTypedDict<std::string, c10::IValue>(std::move(d));
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace lowbit::bindings
