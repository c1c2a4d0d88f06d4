// lowbit::ShampooOptions from and to the {name: value} dicts of the Python package.
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

#include <lowbit/shampoo.h>

namespace lowbit::bindings {

// Start of every message of the Python optimizer.
constexpr const char* kWho = "lowbit.Shampoo: ";

// The one place where Python options become C++ options: unknown names and wrong types
// are rejected by name, then every value is validated as ShampooOptions::validate does.
ShampooOptions options_from_dict(const c10::Dict<std::string, c10::IValue>& dict);
c10::Dict<std::string, c10::IValue> options_to_dict(const ShampooOptions& o);

std::string join(const std::vector<std::string>& names);

}  // namespace lowbit::bindings
