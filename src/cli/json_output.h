// The --json files of the lowbit commands.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace lowbit::cli {

// Writes `document` (indented) to `path`; throws "--json: cannot write PATH" when it cannot.
void write_json(const std::string& path, const nlohmann::json& document);

}  // namespace lowbit::cli
