// Image classification data for `lowbit train`: Fashion-MNIST / MNIST (IDX files, gzipped
// or plain), CIFAR-10 / CIFAR-100 (binary version), and built-in synthetic data.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace lowbit::data {

struct Dataset {
  at::Tensor images;  // float32 [N, C, H, W], normalized by the train split's per-channel mean/std
  at::Tensor labels;  // int64 [N]
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

struct DatasetSplit {
  Dataset train, test;
  int64_t num_classes = 0;
  std::string name;    // "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic"
  std::string source;  // directory the files came from, or "built-in synthetic"
  bool synthetic = false;
  // Per-channel statistics of the raw train pixels (scaled to [0, 1]) used to normalize both splits.
  std::vector<double> channel_mean, channel_std;
};

// Default location of Debian's dataset-fashion-mnist package.
inline constexpr const char* kDefaultFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// IDX layout (Fashion-MNIST, MNIST): train-images-idx3-ubyte, train-labels-idx1-ubyte,
// t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each gzipped (".gz") or plain.
// Images: magic 0x00000803, count, rows, cols, pixels; labels: magic 0x00000801, count, labels.
// max_train / max_test >= 0 keep only the first that many examples (-1: all).
DatasetSplit load_idx_dataset(const std::string& dir, const std::string& name,
                              int64_t max_train = -1, int64_t max_test = -1);

// Whether `dir` holds the four IDX files (each gzipped or plain); their contents are not checked.
bool idx_dataset_present(const std::string& dir);

// CIFAR binary version. classes == 10: data_batch_1.bin .. data_batch_5.bin and test_batch.bin,
// records of 1 label byte + 3072 pixel bytes. classes == 100: train.bin and test.bin, records of
// a coarse and a fine label byte + 3072 pixel bytes (the fine label is used). Pixels are
// 1024 red, 1024 green, 1024 blue bytes of a 32x32 row-major image. `dir` may also be the
// parent of the archives' cifar-10-batches-bin / cifar-100-binary directory.
DatasetSplit load_cifar(const std::string& dir, int classes,
                        int64_t max_train = -1, int64_t max_test = -1);

// 1x28x28 images of 10 classes: a smooth class template (the templates share a common
// pattern), randomly scaled and shifted by up to 2 pixels, plus noise. Deterministic for a seed,
// learnable by a small CNN (~98% test accuracy after one epoch of kSyntheticTrainSize) but not
// trivially separable.
DatasetSplit make_synthetic(int64_t train_size, int64_t test_size, uint64_t seed);

// Synthetic sizes used by load_dataset (before max_train / max_test).
inline constexpr int64_t kSyntheticTrainSize = 12000;
inline constexpr int64_t kSyntheticTestSize = 2000;

// name: "fashion-mnist" | "mnist" | "cifar10" | "cifar100" | "synthetic".
// data_dir empty: Fashion-MNIST is read from kDefaultFashionMnistDir, and when its files are not
// there, built-in synthetic data is used and a line saying so goes to `log`; the other datasets
// need a data_dir. A data_dir that is given must hold valid files: missing or corrupt is an error.
DatasetSplit load_dataset(const std::string& name, const std::string& data_dir, std::ostream& log,
                          int64_t max_train = -1, int64_t max_test = -1);

// Scales split.train/test images from raw [0, 255] values to [0, 1], then normalizes both by
// the train split's per-channel mean and std (recorded in channel_mean / channel_std).
// Used by the loaders; images come in as float32 [N, C, H, W].
void normalize_from_train(DatasetSplit& split, double scale = 1.0 / 255.0);

// What load_dataset does for "fashion-mnist" without a data_dir, with `dir` as the default
// location: the IDX dataset when idx_dataset_present(dir), otherwise synthetic data and a line
// saying so on `log`.
DatasetSplit load_idx_or_synthetic(const std::string& dir, const std::string& name,
                                   std::ostream& log, int64_t max_train = -1,
                                   int64_t max_test = -1);

// The names load_dataset accepts.
const std::vector<std::string>& dataset_names();

struct Batch {
  at::Tensor images, labels;
};

// Mini-batches of a dataset, in a seeded random order (or in order without shuffle); the last
// batch is partial when the size is not a multiple of batch_size.
//   BatchIterator it(split.train, 128, true, seed + epoch);
//   for (Batch b; it.next(b);) { ... }
class BatchIterator {
 public:
  BatchIterator(const Dataset& data, int64_t batch_size, bool shuffle, uint64_t seed);
  int64_t num_batches() const;
  bool next(Batch& out);
  const at::Tensor& order() const { return order_; }  // int64 [N]: example index per position

 private:
  Dataset data_;
  int64_t batch_size_;
  at::Tensor order_;
  int64_t position_ = 0;
};

}  // namespace lowbit::data
