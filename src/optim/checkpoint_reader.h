// Reading optimizer checkpoints (LibTorch's optimizer archive layout, as
// torch::optim::serialize writes it) with errors that name the entry at fault.
//
// torch::optim::serialize's reader stops on a malformed checkpoint with LibTorch internal
// assertions ("isString() INTERNAL ASSERT FAILED ... please report a bug to PyTorch"),
// std::invalid_argument from std::stoull, or, when two parameters carry the same key, a
// state entry that is moved out twice and left null. read_optimizer_archive reads the same
// layout, checks counts before looping over them and refuses repeated keys; the fields of
// states and options are read with LOWBIT_DESERIALIZE_ARG, which names a missing field or
// one of another type. Everything is read before anything is installed.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lowbit::checkpoint {

// The largest step count a checkpoint may hold: counts are incremented (so must stay below
// INT64_MAX) and enter bias corrections as doubles, exact up to 2^53.
constexpr int64_t kMaxStepCount = int64_t{1} << 53;

// Throws unless 0 <= value <= kMaxStepCount, naming `what` and the field.
void check_count(int64_t value, const std::string& what, const char* name);

// What an IValue holds, in words ("Int", "Double", "String", "Tensor", "Object", ...).
std::string kind_of(const c10::IValue& v);

template <typename T>
struct FieldType;
template <>
struct FieldType<int64_t> {
  static bool holds(const c10::IValue& v) { return v.isInt(); }
  static constexpr const char* name = "an integer";
};
template <>
struct FieldType<double> {
  static bool holds(const c10::IValue& v) { return v.isDouble(); }
  static constexpr const char* name = "a floating-point number";
};
template <>
struct FieldType<bool> {
  static bool holds(const c10::IValue& v) { return v.isBool(); }
  static constexpr const char* name = "a boolean";
};
template <>
struct FieldType<std::string> {
  static bool holds(const c10::IValue& v) { return v.isString(); }
  static constexpr const char* name = "a string";
};
template <>
struct FieldType<at::Tensor> {
  static bool holds(const c10::IValue& v) { return v.isTensor(); }
  static constexpr const char* name = "a tensor";
};
template <typename A, typename B>
struct FieldType<std::tuple<A, B>> {
  static bool holds(const c10::IValue& v) {
    if (!v.isTuple()) return false;
    const auto& items = v.toTupleRef().elements();
    return items.size() == 2 && FieldType<A>::holds(items[0]) && FieldType<B>::holds(items[1]);
  }
  static constexpr const char* name = "a pair";
};

// A loaded tensor as state may hold it: contiguous, on storage of its own. torch's archive
// writes a storage once however many entries share it, so a checkpoint can make two state
// tensors (say exp_avg and exp_avg_sq) one; every in-place update would then write both,
// and v = m could turn negative and sqrt(v) NaN (found by the checkpoint fuzz).
inline at::Tensor owned(const at::Tensor& t) {
  return t.defined() ? t.clone(at::MemoryFormat::Contiguous) : t;
}

// Field `name` of a state or options archive: absent is allowed for tensors (an undefined
// tensor is not written) and an error for anything else; present, it must hold a T.
template <typename T>
std::optional<T> read_field(torch::serialize::InputArchive& archive, const char* name) {
  c10::IValue v;
  if (!archive.try_read(name, v)) {
    TORCH_CHECK((std::is_same_v<T, at::Tensor>), "the entry \"", name, "\" is missing");
    return std::nullopt;
  }
  TORCH_CHECK(FieldType<T>::holds(v), "the entry \"", name, "\" must be ", FieldType<T>::name, "; got ",
              kind_of(v));
  if constexpr (std::is_same_v<T, at::Tensor>) return owned(v.toTensor());
  return v.to<T>();
}

// The same for a field added after checkpoints were first written: absent means `fallback`.
template <typename T>
T read_field_or(torch::serialize::InputArchive& archive, const char* name, T fallback) {
  c10::IValue v;
  if (!archive.try_read(name, v)) return fallback;
  TORCH_CHECK(FieldType<T>::holds(v), "the entry \"", name, "\" must be ", FieldType<T>::name, "; got ",
              kind_of(v));
  return v.to<T>();
}

// In place of _TORCH_OPTIM_DESERIALIZE_TORCH_ARG, inside serialize(InputArchive& archive).
#define LOWBIT_DESERIALIZE_ARG(T, name)                                              \
  {                                                                                  \
    if (auto lowbit_value_ = ::lowbit::checkpoint::read_field<T>(archive, #name)) { \
      name(std::move(*lowbit_value_));                                               \
    }                                                                                \
  }

// The nested archive `key` of `archive`; throws naming `path` if it is absent or not an archive.
torch::serialize::InputArchive sub_archive(torch::serialize::InputArchive& archive, const std::string& key,
                                           const std::string& path);
// A count stored as a one-element integer tensor (e.g. "param_groups/size"), >= 0.
int64_t read_size(torch::serialize::InputArchive& archive, const std::string& key, const std::string& path);
// A parameter key: the decimal string torch::optim::serialize writes for each parameter.
uint64_t parse_key(const std::string& key, const std::string& path);
// Throws unless the archive is an optimizer checkpoint (its "pytorch_version" is "1.5.0").
void check_layout_version(torch::serialize::InputArchive& archive);

// Reads `archive` into `optimizer`: each parameter's state (State::serialize) and each
// group's options (Options::serialize). The checkpoint must have as many groups, and
// groups as many parameters, as the optimizer. Throws c10::Error naming the entry before
// changing anything; on success, the states of the checkpoint's parameters replace (or
// join) the optimizer's and every group's options are those of the checkpoint.
template <typename State, typename Options>
void read_optimizer_archive(torch::serialize::InputArchive& archive, torch::optim::Optimizer& optimizer) {
  check_layout_version(archive);
  torch::serialize::InputArchive states = sub_archive(archive, "state", "state");
  std::map<uint64_t, std::unique_ptr<State>> saved;
  for (const std::string& key : states.keys()) {
    const std::string path = "state/" + key;
    const uint64_t id = parse_key(key, path);
    torch::serialize::InputArchive entry = sub_archive(states, key, path);
    auto state = std::make_unique<State>();
    try {
      state->serialize(entry);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "checkpoint entry \"", path, "\": ", e.what_without_backtrace());
    }
    saved[id] = std::move(state);
  }

  torch::serialize::InputArchive groups = sub_archive(archive, "param_groups", "param_groups");
  const int64_t group_count = read_size(groups, "param_groups/size", "param_groups/param_groups/size");
  TORCH_CHECK(group_count == static_cast<int64_t>(optimizer.param_groups().size()),
              "the checkpoint has a different number of parameter groups (", group_count, ") than this optimizer (",
              optimizer.param_groups().size(), ")");
  std::vector<std::vector<uint64_t>> keys(group_count);
  std::vector<std::unique_ptr<Options>> options(group_count);
  std::set<uint64_t> seen;
  for (int64_t g = 0; g < group_count; ++g) {
    const std::string key = "param_groups/" + std::to_string(g), path = "param_groups/" + key;
    torch::serialize::InputArchive group = sub_archive(groups, key, path);
    const auto& params = optimizer.param_groups()[g].params();
    const int64_t count = read_size(group, "params/size", path + "/params/size");
    TORCH_CHECK(count == static_cast<int64_t>(params.size()), "group ", g,
                " of the checkpoint has a different size (", count, " parameters) than this optimizer's (",
                params.size(), ")");
    for (int64_t i = 0; i < count; ++i) {
      const std::string entry = "params/" + std::to_string(i);
      c10::IValue v;
      TORCH_CHECK(group.try_read(entry, v), "checkpoint entry \"", path, "/", entry, "\" is missing");
      TORCH_CHECK(v.isString(), "checkpoint entry \"", path, "/", entry, "\" must be a parameter key (a string); got ",
                  kind_of(v));
      const uint64_t id = parse_key(v.toStringRef(), path + "/" + entry);
      TORCH_CHECK(seen.insert(id).second, "checkpoint entry \"", path, "/", entry, "\" repeats the key ",
                  v.toStringRef(), " of another parameter");
      keys[g].push_back(id);
    }
    torch::serialize::InputArchive option_archive = sub_archive(group, "options", path + "/options");
    options[g] = std::make_unique<Options>();
    try {
      options[g]->serialize(option_archive);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "checkpoint entry \"", path, "/options\": ", e.what_without_backtrace());
    }
  }

  // Everything read: install.
  for (int64_t g = 0; g < group_count; ++g) {
    auto& group = optimizer.param_groups()[g];
    for (size_t i = 0; i < keys[g].size(); ++i) {
      auto found = saved.find(keys[g][i]);
      if (found != saved.end()) optimizer.state()[group.params()[i].unsafeGetTensorImpl()] = std::move(found->second);
    }
    static_cast<Options&>(group.options()) = *options[g];
  }
}

}  // namespace lowbit::checkpoint
