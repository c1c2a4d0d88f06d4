// Normalization, synthetic data, choosing a dataset by name, and mini-batches.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <ostream>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace lowbit::data {
namespace {

constexpr int64_t kSyntheticClasses = 10;
constexpr int64_t kSyntheticSide = 28;
constexpr int64_t kSyntheticMaxShift = 2;  // templates move by up to this many pixels
constexpr double kSyntheticCommon = 0.6;   // weight of the pattern all classes share
constexpr double kSyntheticNoise = 1.5;    // pixel noise std (templates have std 1)
constexpr uint64_t kSyntheticSeed = 20240607;

int64_t limited(int64_t size, int64_t max) { return max < 0 ? size : std::min(size, max); }

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

void normalize_from_train(DatasetSplit& split, double scale) {
  TORCH_CHECK(split.train.images.dim() == 4 && split.train.images.size(0) > 0,
              "normalize_from_train: expects non-empty train images [N, C, H, W]");
  split.train.images = split.train.images.to(at::kFloat).mul_(scale);
  const at::Tensor mean = split.train.images.mean({0, 2, 3}, /*keepdim=*/true);
  // Two-pass variance in float64 accumulation keeps 60000 x 784 values accurate.
  const at::Tensor var =
      (split.train.images - mean).pow_(2).to(at::kDouble).mean({0, 2, 3}, /*keepdim=*/true);
  const at::Tensor std = var.sqrt().clamp_min(1e-6).to(at::kFloat);
  split.train.images.sub_(mean).div_(std);
  if (split.test.images.defined()) {
    split.test.images = split.test.images.to(at::kFloat).mul_(scale).sub_(mean).div_(std);
  }
  const at::Tensor mean_d = mean.flatten().to(at::kDouble).contiguous();
  const at::Tensor std_d = std.flatten().to(at::kDouble).contiguous();
  split.channel_mean.assign(mean_d.data_ptr<double>(), mean_d.data_ptr<double>() + mean_d.numel());
  split.channel_std.assign(std_d.data_ptr<double>(), std_d.data_ptr<double>() + std_d.numel());
}

DatasetSplit make_synthetic(int64_t train_size, int64_t test_size, uint64_t seed) {
  TORCH_CHECK(train_size > 0 && test_size >= 0, "make_synthetic: need train_size > 0 and "
              "test_size >= 0, got ", train_size, " and ", test_size);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  // Class templates: smooth random patterns (7x7 noise upsampled), zero mean, unit std. They
  // share a common pattern, so that the classes overlap somewhat under the noise.
  at::Tensor base = at::randn({kSyntheticClasses, 1, 7, 7}, gen, at::kFloat);
  const at::Tensor common = at::randn({1, 1, 7, 7}, gen, at::kFloat);
  base = kSyntheticCommon * common + (1.0 - kSyntheticCommon) * base;
  base = at::upsample_bilinear2d(base, {kSyntheticSide, kSyntheticSide}, /*align_corners=*/false);
  base = (base - base.mean({1, 2, 3}, true)) / base.std({1, 2, 3}, true, true);
  // Every template at every shift: index = label * shifts + shift.
  std::vector<at::Tensor> shifted;
  for (int64_t c = 0; c < kSyntheticClasses; ++c) {
    for (int64_t dy = -kSyntheticMaxShift; dy <= kSyntheticMaxShift; ++dy) {
      for (int64_t dx = -kSyntheticMaxShift; dx <= kSyntheticMaxShift; ++dx) {
        shifted.push_back(at::roll(base[c], {dy, dx}, {1, 2}));
      }
    }
  }
  const at::Tensor templates = at::stack(shifted);
  const int64_t shifts = (2 * kSyntheticMaxShift + 1) * (2 * kSyntheticMaxShift + 1);

  auto make = [&](int64_t n) {
    const at::Tensor labels = at::randint(kSyntheticClasses, {n}, gen, at::kLong);
    const at::Tensor shift = at::randint(shifts, {n}, gen, at::kLong);
    const at::Tensor amplitude = at::rand({n, 1, 1, 1}, gen, at::kFloat) + 0.5;  // [0.5, 1.5)
    const at::Tensor noise =
        at::randn({n, 1, kSyntheticSide, kSyntheticSide}, gen, at::kFloat) * kSyntheticNoise;
    at::Tensor images = templates.index_select(0, labels * shifts + shift) * amplitude + noise;
    return Dataset{images, labels};
  };
  DatasetSplit split;
  split.train = make(train_size);
  split.test = make(test_size);
  split.num_classes = kSyntheticClasses;
  split.name = "synthetic";
  split.source = "built-in synthetic";
  split.synthetic = true;
  normalize_from_train(split, 1.0);
  return split;
}

DatasetSplit load_idx_or_synthetic(const std::string& dir, const std::string& name,
                                   std::ostream& log, int64_t max_train, int64_t max_test) {
  if (idx_dataset_present(dir)) return load_idx_dataset(dir, name, max_train, max_test);
  DatasetSplit split = make_synthetic(limited(kSyntheticTrainSize, max_train),
                                      limited(kSyntheticTestSize, max_test), kSyntheticSeed);
  std::error_code ec;
  log << "lowbit: " << name << " not found at " << dir
      << (std::filesystem::is_directory(dir, ec) ? " (its IDX files are missing)" : "")
      << "; using built-in SYNTHETIC data instead (" << split.train.size() << " train / "
      << split.test.size() << " test images, 1x28x28, 10 classes). For the real dataset install "
      << "Debian's dataset-fashion-mnist package or pass --data-dir.\n";
  return split;
}

const std::vector<std::string>& dataset_names() {
  static const std::vector<std::string> names = {"fashion-mnist", "mnist", "cifar10", "cifar100",
                                                 "synthetic"};
  return names;
}

DatasetSplit load_dataset(const std::string& name, const std::string& data_dir, std::ostream& log,
                          int64_t max_train, int64_t max_test) {
  if (name == "synthetic") {
    return make_synthetic(limited(kSyntheticTrainSize, max_train),
                          limited(kSyntheticTestSize, max_test), kSyntheticSeed);
  }
  if (name == "fashion-mnist" || name == "mnist") {
    if (!data_dir.empty()) return load_idx_dataset(data_dir, name, max_train, max_test);
    TORCH_CHECK(name == "fashion-mnist",
                "mnist has no default location: pass --data-dir, a directory holding "
                "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                "t10k-labels-idx1-ubyte (each optionally .gz)");
    return load_idx_or_synthetic(kDefaultFashionMnistDir, name, log, max_train, max_test);
  }
  if (name == "cifar10" || name == "cifar100") {
    TORCH_CHECK(!data_dir.empty(), name, " has no default location: pass --data-dir, a directory "
                "holding the binary version's ",
                name == "cifar10" ? "data_batch_1.bin .. data_batch_5.bin and test_batch.bin"
                                  : "train.bin and test.bin");
    return load_cifar(data_dir, name == "cifar10" ? 10 : 100, max_train, max_test);
  }
  TORCH_CHECK(false, "unknown dataset '", name, "' (expected one of: ", join(dataset_names()), ")");
}

BatchIterator::BatchIterator(const Dataset& data, int64_t batch_size, bool shuffle, uint64_t seed)
    : data_(data), batch_size_(batch_size) {
  TORCH_CHECK(batch_size > 0, "BatchIterator: batch_size must be positive, got ", batch_size);
  TORCH_CHECK(data.images.defined() && data.labels.defined() &&
                  data.images.size(0) == data.labels.size(0),
              "BatchIterator: images and labels must have the same number of examples");
  if (shuffle) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    order_ = at::randperm(data.size(), gen, at::kLong);
  } else {
    order_ = at::arange(data.size(), at::kLong);
  }
}

int64_t BatchIterator::num_batches() const { return (data_.size() + batch_size_ - 1) / batch_size_; }

bool BatchIterator::next(Batch& out) {
  if (position_ >= data_.size()) return false;
  const int64_t n = std::min(batch_size_, data_.size() - position_);
  const at::Tensor index = order_.narrow(0, position_, n);
  out.images = data_.images.index_select(0, index);
  out.labels = data_.labels.index_select(0, index);
  position_ += n;
  return true;
}

}  // namespace lowbit::data
