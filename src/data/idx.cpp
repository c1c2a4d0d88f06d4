// IDX files (Fashion-MNIST, MNIST), gzipped or plain: zlib's gzread reads both.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace lowbit::data {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kImagesMagic = 0x00000803;
constexpr uint32_t kLabelsMagic = 0x00000801;
constexpr int64_t kIdxClasses = 10;

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// "<dir>/<base>.gz" or "<dir>/<base>"; empty when neither is a file.
std::string find_idx_file(const std::string& dir, const std::string& base) {
  for (const std::string& candidate : {base + ".gz", base}) {
    const fs::path path = fs::path(dir) / candidate;
    std::error_code ec;
    if (fs::is_regular_file(path, ec)) return path.string();
  }
  return {};
}

std::string require_idx_file(const std::string& dir, const std::string& base) {
  const std::string path = find_idx_file(dir, base);
  TORCH_CHECK(!path.empty(), "dataset file not found: ", (fs::path(dir) / base).string(),
              " (nor ", base, ".gz)");
  return path;
}

// The whole (decompressed) content of a gzipped or plain file.
std::vector<uint8_t> read_file(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  TORCH_CHECK(f != nullptr, "cannot open ", path);
  gzbuffer(f, 1 << 17);
  std::vector<uint8_t> out;
  constexpr unsigned kChunk = 1u << 20;
  for (;;) {
    const size_t old = out.size();
    out.resize(old + kChunk);
    const int got = gzread(f, out.data() + old, kChunk);
    if (got < 0) {
      int errnum = 0;
      const std::string message = gzerror(f, &errnum);
      gzclose(f);
      TORCH_CHECK(false, path, ": corrupt gzip data (", message, ")");
    }
    out.resize(old + static_cast<size_t>(got));
    if (got == 0) break;
  }
  int errnum = 0;
  const std::string message = gzerror(f, &errnum);
  gzclose(f);
  // A gzip stream cut short reads as far as it goes, then reports Z_BUF_ERROR.
  TORCH_CHECK(errnum == Z_OK, path, ": truncated or corrupt gzip data (", message, ")");
  return out;
}

uint32_t big_endian32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void check_magic(const std::string& path, uint32_t magic, uint32_t expected, const char* what) {
  if (magic == expected) return;
  const char* hint = "";
  if (magic == kImagesMagic) hint = " (this is an IDX images file)";
  if (magic == kLabelsMagic) hint = " (this is an IDX labels file)";
  if ((magic >> 16) == 0x1f8b) hint = " (gzip data inside a gzip file? decompress it once)";
  TORCH_CHECK(false, path, ": wrong magic number ", hex32(magic), ", expected ", hex32(expected),
              " for IDX ", what, hint);
}

// uint8 images [N, 1, rows, cols].
at::Tensor read_idx_images(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  if (bytes.size() >= 4) check_magic(path, big_endian32(bytes.data()), kImagesMagic, "images");
  TORCH_CHECK(bytes.size() >= 16, path, ": truncated file: ", bytes.size(),
              " bytes, shorter than the 16-byte IDX images header");
  const int64_t count = big_endian32(bytes.data() + 4);
  const int64_t rows = big_endian32(bytes.data() + 8);
  const int64_t cols = big_endian32(bytes.data() + 12);
  TORCH_CHECK(rows > 0 && cols > 0 && rows <= 4096 && cols <= 4096, path,
              ": implausible image size ", rows, "x", cols, " in the header");
  const int64_t expected = count * rows * cols;
  const int64_t actual = static_cast<int64_t>(bytes.size()) - 16;
  TORCH_CHECK(actual >= expected, path, ": truncated file: the header says ", count, " images of ",
              rows, "x", cols, " (", expected, " bytes of pixels), but only ", actual,
              " bytes follow it");
  TORCH_CHECK(actual == expected, path, ": wrong size: the header says ", count, " images of ",
              rows, "x", cols, " (", expected, " bytes of pixels), but ", actual,
              " bytes follow it");
  return at::from_blob(bytes.data() + 16, {count, 1, rows, cols}, at::kByte).clone();
}

// uint8 labels [N].
at::Tensor read_idx_labels(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  if (bytes.size() >= 4) check_magic(path, big_endian32(bytes.data()), kLabelsMagic, "labels");
  TORCH_CHECK(bytes.size() >= 8, path, ": truncated file: ", bytes.size(),
              " bytes, shorter than the 8-byte IDX labels header");
  const int64_t count = big_endian32(bytes.data() + 4);
  const int64_t actual = static_cast<int64_t>(bytes.size()) - 8;
  TORCH_CHECK(actual >= count, path, ": truncated file: the header says ", count,
              " labels, but only ", actual, " bytes follow it");
  TORCH_CHECK(actual == count, path, ": wrong size: the header says ", count, " labels, but ",
              actual, " bytes follow it");
  const auto it = std::find_if(bytes.begin() + 8, bytes.end(),
                               [](uint8_t v) { return v >= kIdxClasses; });
  TORCH_CHECK(it == bytes.end(), path, ": label ", int{*it}, " of example ",
              (it - bytes.begin()) - 8, " is outside [0, ", kIdxClasses, ")");
  return at::from_blob(bytes.data() + 8, {count}, at::kByte).clone();
}

Dataset read_split(const std::string& dir, const std::string& prefix, int64_t max_examples) {
  const std::string images_path = require_idx_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = require_idx_file(dir, prefix + "-labels-idx1-ubyte");
  at::Tensor images = read_idx_images(images_path);
  at::Tensor labels = read_idx_labels(labels_path);
  TORCH_CHECK(images.size(0) == labels.size(0), "image/label count mismatch: ", images_path,
              " has ", images.size(0), " images, but ", labels_path, " has ", labels.size(0),
              " labels");
  const int64_t n = max_examples < 0 ? images.size(0) : std::min(max_examples, images.size(0));
  return {images.narrow(0, 0, n).to(at::kFloat), labels.narrow(0, 0, n).to(at::kLong)};
}

}  // namespace

bool idx_dataset_present(const std::string& dir) {
  for (const char* base : {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}) {
    if (find_idx_file(dir, base).empty()) return false;
  }
  return true;
}

DatasetSplit load_idx_dataset(const std::string& dir, const std::string& name, int64_t max_train,
                              int64_t max_test) {
  std::error_code ec;
  TORCH_CHECK(fs::is_directory(dir, ec), name, ": data directory not found: ", dir);
  DatasetSplit split;
  split.name = name;
  split.source = dir;
  split.num_classes = kIdxClasses;
  split.train = read_split(dir, "train", max_train);
  split.test = read_split(dir, "t10k", max_test);
  TORCH_CHECK(split.train.size() > 0, name, ": no training examples in ", dir);
  TORCH_CHECK(split.train.images.sizes().slice(1) == split.test.images.sizes().slice(1), name,
              ": train images are ", split.train.images.size(2), "x", split.train.images.size(3),
              " but test images are ", split.test.images.size(2), "x", split.test.images.size(3),
              " in ", dir);
  normalize_from_train(split);
  return split;
}

}  // namespace lowbit::data
