// CIFAR-10 / CIFAR-100, binary version.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace lowbit::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kPixelBytes = 3 * 32 * 32;

struct Layout {
  int64_t label_bytes;  // bytes before the pixels of each record
  int64_t label_index;  // which of them is the label used
  std::vector<std::string> train_files;
  std::string test_file;
  const char* archive_dir;  // directory name inside the official archive
};

Layout layout_for(int classes) {
  if (classes == 10) {
    return {1, 0,
            {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
             "data_batch_5.bin"},
            "test_batch.bin", "cifar-10-batches-bin"};
  }
  return {2, 1, {"train.bin"}, "test.bin", "cifar-100-binary"};
}

// Records of `path` as uint8 [N, record bytes].
at::Tensor read_records(const std::string& path, int64_t record_bytes) {
  std::error_code ec;
  TORCH_CHECK(fs::is_regular_file(path, ec), "dataset file not found: ", path);
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot open ", path);
  in.seekg(0, std::ios::end);
  const int64_t size = static_cast<int64_t>(in.tellg());
  in.seekg(0, std::ios::beg);
  TORCH_CHECK(size > 0, path, ": empty file");
  TORCH_CHECK(size % record_bytes == 0, path, ": wrong size: ", size,
              " bytes is not a multiple of the ", record_bytes,
              "-byte record (truncated or not a CIFAR binary file?)");
  at::Tensor records = at::empty({size / record_bytes, record_bytes}, at::kByte);
  in.read(reinterpret_cast<char*>(records.data_ptr<uint8_t>()), size);
  TORCH_CHECK(in.gcount() == size, path, ": read error after ", in.gcount(), " of ", size, " bytes");
  return records;
}

Dataset read_files(const std::string& dir, const std::vector<std::string>& files,
                   const Layout& layout, int classes, int64_t max_examples) {
  const int64_t record_bytes = layout.label_bytes + kPixelBytes;
  std::error_code ec;
  for (const std::string& file : files) {
    const fs::path path = fs::path(dir) / file;
    TORCH_CHECK(fs::is_regular_file(path, ec), "dataset file not found: ", path.string());
  }
  std::vector<at::Tensor> images, labels;
  int64_t total = 0;
  for (const std::string& file : files) {
    // Enough examples already (at least one file is always read).
    if (max_examples >= 0 && total >= max_examples && total > 0) break;
    const std::string path = (fs::path(dir) / file).string();
    const at::Tensor records = read_records(path, record_bytes);
    const at::Tensor label = records.select(1, layout.label_index);
    const at::Tensor bad = label.ge(classes).nonzero();
    TORCH_CHECK(bad.numel() == 0, path, ": label ", label[bad[0][0].item<int64_t>()].item<int64_t>(),
                " of record ", bad[0][0].item<int64_t>(), " is outside [0, ", classes, ")");
    labels.push_back(label.to(at::kLong));
    images.push_back(records.narrow(1, layout.label_bytes, kPixelBytes).reshape({-1, 3, 32, 32}));
    total += records.size(0);
  }
  at::Tensor all_images = at::cat(images);
  at::Tensor all_labels = at::cat(labels);
  const int64_t n = max_examples < 0 ? total : std::min(max_examples, total);
  return {all_images.narrow(0, 0, n).to(at::kFloat), all_labels.narrow(0, 0, n).contiguous()};
}

}  // namespace

DatasetSplit load_cifar(const std::string& dir, int classes, int64_t max_train, int64_t max_test) {
  TORCH_CHECK(classes == 10 || classes == 100, "load_cifar: classes must be 10 or 100, got ",
              classes);
  const std::string name = classes == 10 ? "cifar10" : "cifar100";
  std::error_code ec;
  TORCH_CHECK(fs::is_directory(dir, ec), name, ": data directory not found: ", dir);
  const Layout layout = layout_for(classes);
  // Accept the parent of the directory the official archive unpacks to.
  std::string root = dir;
  if (!fs::exists(fs::path(dir) / layout.test_file, ec) &&
      fs::is_directory(fs::path(dir) / layout.archive_dir, ec)) {
    root = (fs::path(dir) / layout.archive_dir).string();
  }
  DatasetSplit split;
  split.name = name;
  split.source = root;
  split.num_classes = classes;
  split.train = read_files(root, layout.train_files, layout, classes, max_train);
  split.test = read_files(root, {layout.test_file}, layout, classes, max_test);
  TORCH_CHECK(split.train.size() > 0, name, ": no training examples in ", root);
  normalize_from_train(split);
  return split;
}

}  // namespace lowbit::data
