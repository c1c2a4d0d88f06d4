#include "optim/checkpoint_reader.h"

#include <ATen/ATen.h>

#include <charconv>

namespace lowbit::checkpoint {

void check_count(int64_t value, const std::string& what, const char* name) {
  TORCH_CHECK(value >= 0 && value <= kMaxStepCount, what, ": \"", name, "\" must be in [0, 2^53]; got ", value);
}

std::string kind_of(const c10::IValue& v) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) return "an undefined tensor";
    std::string shape = "[";
    for (int64_t d = 0; d < t.dim(); ++d) shape += (d ? ", " : "") + std::to_string(t.size(d));
    return std::string("a ") + c10::toString(t.scalar_type()) + " tensor of shape " + shape + "]";
  }
  if (v.isModule()) return "a nested archive";
  return v.tagKind();
}

torch::serialize::InputArchive sub_archive(torch::serialize::InputArchive& archive, const std::string& key,
                                           const std::string& path) {
  c10::IValue v;
  TORCH_CHECK(archive.try_read(key, v), "checkpoint entry \"", path, "\" is missing");
  TORCH_CHECK(v.isModule(), "checkpoint entry \"", path, "\" must be a nested archive; got ", kind_of(v));
  torch::serialize::InputArchive out;
  archive.read(key, out);
  return out;
}

int64_t read_size(torch::serialize::InputArchive& archive, const std::string& key, const std::string& path) {
  c10::IValue v;
  TORCH_CHECK(archive.try_read(key, v), "checkpoint entry \"", path, "\" is missing");
  const bool ok = v.isTensor() && v.toTensor().defined() && v.toTensor().numel() == 1 &&
                  at::isIntegralType(v.toTensor().scalar_type(), /*includeBool=*/false);
  TORCH_CHECK(ok, "checkpoint entry \"", path, "\" must be a count (a one-element integer tensor); got ", kind_of(v));
  const int64_t n = v.toTensor().item<int64_t>();
  TORCH_CHECK(n >= 0, "checkpoint entry \"", path, "\" must be >= 0; got ", n);
  return n;
}

uint64_t parse_key(const std::string& key, const std::string& path) {
  uint64_t id = 0;
  const char* end = key.data() + key.size();
  const auto [ptr, ec] = std::from_chars(key.data(), end, id);
  TORCH_CHECK(!key.empty() && ec == std::errc() && ptr == end, "checkpoint entry \"", path,
              "\": \"", key, "\" is not a parameter key (a decimal number)");
  return id;
}

void check_layout_version(torch::serialize::InputArchive& archive) {
  c10::IValue v;
  TORCH_CHECK(archive.try_read("pytorch_version", v) && v.isString() && v.toStringRef() == "1.5.0",
              "not an optimizer checkpoint: its \"pytorch_version\" entry must be \"1.5.0\" (LibTorch's optimizer "
              "archive layout); got ", archive.try_read("pytorch_version", v) ? kind_of(v) : std::string("none"),
              v.isString() ? " \"" + v.toStringRef() + "\"" : std::string());
}

}  // namespace lowbit::checkpoint
