#include "cli/json_output.h"

#include <c10/util/Exception.h>

#include <fstream>

namespace lowbit::cli {

void write_json(const std::string& path, const nlohmann::json& document) {
  std::ofstream out(path);
  TORCH_CHECK(out, "--json: cannot write ", path);
  out << document.dump(2) << "\n";
  TORCH_CHECK(out.good(), "--json: cannot write ", path);
}

}  // namespace lowbit::cli
