// Data loaders: IDX (gzipped and plain) and CIFAR binary files written here, the errors for
// corrupt or missing files, synthetic data, load_dataset, mini-batches, and the real
// Fashion-MNIST from Debian's package when it is installed.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "data/dataset.h"

namespace lowbit::data {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("lowbit_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

void write_plain(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_gzip(const std::string& path, const Bytes& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
  }
  ASSERT_EQ(gzclose(f), Z_OK);
}

Bytes read_plain(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void put32(Bytes& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

// Pixel r, c of image i: distinct across images and positions.
uint8_t idx_pixel(int64_t i, int64_t r, int64_t c, int64_t cols) {
  return static_cast<uint8_t>((i * 37 + r * cols + c * 5) % 256);
}

Bytes idx_images(int64_t n, int64_t rows, int64_t cols, int64_t first = 0) {
  Bytes out;
  put32(out, 0x00000803);
  put32(out, static_cast<uint32_t>(n));
  put32(out, static_cast<uint32_t>(rows));
  put32(out, static_cast<uint32_t>(cols));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out.push_back(idx_pixel(first + i, r, c, cols));
  return out;
}

Bytes idx_labels(const std::vector<uint8_t>& labels) {
  Bytes out;
  put32(out, 0x00000801);
  put32(out, static_cast<uint32_t>(labels.size()));
  out.insert(out.end(), labels.begin(), labels.end());
  return out;
}

const std::vector<uint8_t> kTrainLabels = {3, 0, 9, 1, 7};
const std::vector<uint8_t> kTestLabels = {2, 5};
constexpr int64_t kRows = 3, kCols = 4;

// A complete small IDX dataset: 5 train and 2 test images of 3x4.
void write_idx_dataset(const TempDir& dir, bool gzip) {
  const auto write = [&](const std::string& base, const Bytes& bytes) {
    if (gzip) {
      write_gzip(dir.file(base + ".gz"), bytes);
    } else {
      write_plain(dir.file(base), bytes);
    }
  };
  write("train-images-idx3-ubyte", idx_images(5, kRows, kCols));
  write("train-labels-idx1-ubyte", idx_labels(kTrainLabels));
  write("t10k-images-idx3-ubyte", idx_images(2, kRows, kCols, 100));
  write("t10k-labels-idx1-ubyte", idx_labels(kTestLabels));
}

// Undoes the normalization: the raw pixel values 0..255.
// fp32 rounding budget of normalize_from_train (u = 2^-24): the channel mean mu is an fp32
// mean of N values in [0, x_max] (torch's cascade summation: <= c u mu, c = log2(N) + 2);
// each pixel is scaled, shifted and divided in fp32, <= 3u (x_max + mu), then over sigma; and
// the test's own fp32 mean of N normalized values adds <= c u max|x^|. In normalized units:
struct NormalizationSlack {
  double mean;     // |mean of the normalized train channel|
  double square;   // |mean of its squares - 1|
  double channel;  // |mu - the exact mean|
  double pixel;    // |a pixel recovered as (x^ sigma + mu) 255 - the raw one|, in raw units
};
NormalizationSlack normalization_slack(const at::Tensor& normalized_channel, double mu, double sigma, double x_max) {
  const double u = 0x1p-24, n = static_cast<double>(normalized_channel.numel());
  const double c = std::log2(n) + 2, top = normalized_channel.abs().max().item<double>();
  const double pixel = 3 * u * (x_max + mu) + c * u * mu;  // one normalized pixel, times sigma
  return {pixel / sigma + c * u * top,
          // (x^ + e)^2 moves by <= 2 |x^| e; sigma itself is rounded to fp32 (2u in x^2)
          2 * top * pixel / sigma + 2 * u + c * u * top * top,
          c * u * mu,
          255 * pixel + 4 * 0x1p-53 * 255 * (top * sigma + mu)};
}

at::Tensor raw_pixels(const Dataset& d, const DatasetSplit& split) {
  const int64_t channels = static_cast<int64_t>(split.channel_mean.size());
  const at::Tensor mean = at::tensor(split.channel_mean, at::kDouble).view({1, channels, 1, 1});
  const at::Tensor std = at::tensor(split.channel_std, at::kDouble).view({1, channels, 1, 1});
  return (d.images.to(at::kDouble) * std + mean) * 255.0;
}

at::Tensor expected_idx_pixels(int64_t n, int64_t first) {
  at::Tensor out = at::empty({n, 1, kRows, kCols}, at::kDouble);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < kCols; ++c) out[i][0][r][c] = double(idx_pixel(first + i, r, c, kCols));
  return out;
}

at::Tensor labels_tensor(const std::vector<uint8_t>& labels) {
  return at::tensor(std::vector<int64_t>(labels.begin(), labels.end()), at::kLong);
}

// Runs fn, which must throw c10::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning " << parts.front();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "message lacks '" << part << "': " << message;
    }
  }
}

void check_small_idx(const DatasetSplit& split, const std::string& dir) {
  EXPECT_EQ(split.name, "fashion-mnist");
  EXPECT_EQ(split.source, dir);
  EXPECT_FALSE(split.synthetic);
  EXPECT_EQ(split.num_classes, 10);
  ASSERT_EQ(split.train.images.sizes(), (std::vector<int64_t>{5, 1, kRows, kCols}));
  ASSERT_EQ(split.test.images.sizes(), (std::vector<int64_t>{2, 1, kRows, kCols}));
  EXPECT_EQ(split.train.images.scalar_type(), at::kFloat);
  EXPECT_EQ(split.train.labels.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(split.train.labels, labels_tensor(kTrainLabels)));
  EXPECT_TRUE(at::equal(split.test.labels, labels_tensor(kTestLabels)));
  // Train: zero mean, unit std per channel; test uses the train statistics.
  const NormalizationSlack slack = normalization_slack(split.train.images, split.channel_mean.at(0),
                                                       split.channel_std.at(0), 1.0);
  EXPECT_NEAR(split.train.images.mean().item<double>(), 0.0, slack.mean);
  EXPECT_NEAR((split.train.images.pow(2).mean()).item<double>(), 1.0, slack.square);
  const at::Tensor raw_train = expected_idx_pixels(5, 0);
  EXPECT_NEAR(split.channel_mean.at(0), raw_train.mean().item<double>() / 255.0, slack.channel);
  EXPECT_TRUE(at::allclose(raw_pixels(split.train, split), raw_train, 0, slack.pixel));
  EXPECT_TRUE(at::allclose(raw_pixels(split.test, split), expected_idx_pixels(2, 100), 0, slack.pixel));
}

TEST(IdxDataset, ReadsGzippedFiles) {
  TempDir dir;
  write_idx_dataset(dir, /*gzip=*/true);
  EXPECT_TRUE(idx_dataset_present(dir.str()));
  check_small_idx(load_idx_dataset(dir.str(), "fashion-mnist"), dir.str());
}

TEST(IdxDataset, ReadsPlainFiles) {
  TempDir dir;
  write_idx_dataset(dir, /*gzip=*/false);
  EXPECT_TRUE(idx_dataset_present(dir.str()));
  check_small_idx(load_idx_dataset(dir.str(), "fashion-mnist"), dir.str());
  EXPECT_EQ(load_idx_dataset(dir.str(), "mnist").name, "mnist");
}

TEST(IdxDataset, LimitsKeepTheFirstExamples) {
  TempDir dir;
  write_idx_dataset(dir, true);
  const DatasetSplit split = load_idx_dataset(dir.str(), "mnist", 3, 1);
  EXPECT_EQ(split.train.size(), 3);
  EXPECT_EQ(split.test.size(), 1);
  EXPECT_TRUE(at::equal(split.train.labels, labels_tensor({3, 0, 9})));
  const double pixel_slack =
      normalization_slack(split.train.images, split.channel_mean.at(0), split.channel_std.at(0), 1.0).pixel;
  EXPECT_TRUE(at::allclose(raw_pixels(split.train, split), expected_idx_pixels(3, 0), 0, pixel_slack));
}

// Replaces one file of a valid gzipped dataset and expects an error naming it.
void expect_corrupt(const std::string& base, const std::function<Bytes(Bytes)>& corrupt,
                    const std::vector<std::string>& words, bool gzip = true) {
  SCOPED_TRACE(base);
  TempDir dir;
  write_idx_dataset(dir, gzip);
  const std::string path = dir.file(base + (gzip ? ".gz" : ""));
  // Rebuild the file's content and corrupt it.
  Bytes bytes;
  if (base == "train-images-idx3-ubyte") bytes = idx_images(5, kRows, kCols);
  if (base == "train-labels-idx1-ubyte") bytes = idx_labels(kTrainLabels);
  if (base == "t10k-images-idx3-ubyte") bytes = idx_images(2, kRows, kCols, 100);
  if (base == "t10k-labels-idx1-ubyte") bytes = idx_labels(kTestLabels);
  ASSERT_FALSE(bytes.empty());
  bytes = corrupt(bytes);
  if (gzip) {
    write_gzip(path, bytes);
  } else {
    write_plain(path, bytes);
  }
  std::vector<std::string> parts = words;
  parts.push_back(path);
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); }, parts);
}

TEST(IdxDataset, WrongMagicNumbers) {
  const auto set_magic = [](uint32_t magic) {
    return [magic](Bytes b) {
      for (int i = 0; i < 4; ++i) b[i] = static_cast<uint8_t>(magic >> (24 - 8 * i));
      return b;
    };
  };
  expect_corrupt("train-images-idx3-ubyte", set_magic(0x00000801),
                 {"wrong magic number", "0x00000801", "0x00000803"});
  expect_corrupt("t10k-labels-idx1-ubyte", set_magic(0x12345678),
                 {"wrong magic number", "0x12345678", "0x00000801"}, /*gzip=*/false);
}

TEST(IdxDataset, TruncatedAndOversizedFiles) {
  const auto drop = [](size_t n) {
    return [n](Bytes b) {
      b.resize(b.size() - n);
      return b;
    };
  };
  expect_corrupt("train-images-idx3-ubyte", drop(1), {"truncated", "5 images of 3x4"});
  expect_corrupt("t10k-images-idx3-ubyte", drop(1), {"truncated"}, /*gzip=*/false);
  expect_corrupt("train-labels-idx1-ubyte", drop(2), {"truncated", "5 labels"});
  expect_corrupt("train-images-idx3-ubyte", [](Bytes b) { b.resize(10); return b; },
                 {"truncated", "header"});
  expect_corrupt("t10k-labels-idx1-ubyte", [](Bytes b) { b.push_back(1); return b; },
                 {"wrong size", "2 labels"});
}

TEST(IdxDataset, TruncatedGzipStream) {
  TempDir dir;
  write_idx_dataset(dir, true);
  const std::string path = dir.file("train-images-idx3-ubyte.gz");
  Bytes compressed = read_plain(path);
  ASSERT_GT(compressed.size(), 30u);
  compressed.resize(compressed.size() - 12);  // cut into the deflate data and the trailer
  write_plain(path, compressed);
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); }, {path, "truncated"});
}

TEST(IdxDataset, CountMismatchAndBadLabels) {
  TempDir dir;
  write_idx_dataset(dir, true);
  write_gzip(dir.file("train-labels-idx1-ubyte.gz"), idx_labels({1, 2, 3}));
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); },
               {"count mismatch", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "5 images", "3 labels"});
  write_gzip(dir.file("train-labels-idx1-ubyte.gz"), idx_labels({1, 2, 12, 3, 4}));
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); },
               {"train-labels-idx1-ubyte.gz", "label 12", "example 2"});
}

TEST(IdxDataset, TrainAndTestImageSizesMustAgree) {
  TempDir dir;
  write_idx_dataset(dir, true);
  write_gzip(dir.file("t10k-images-idx3-ubyte.gz"), idx_images(2, 4, 4));
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); }, {"3x4", "4x4", dir.str()});
}

TEST(IdxDataset, MissingDirectoryAndFiles) {
  TempDir dir;
  const std::string missing = dir.file("no-such-dir");
  expect_error([&] { load_idx_dataset(missing, "fashion-mnist"); }, {"not found", missing});
  EXPECT_FALSE(idx_dataset_present(missing));
  write_idx_dataset(dir, true);
  fs::remove(dir.file("t10k-labels-idx1-ubyte.gz"));
  EXPECT_FALSE(idx_dataset_present(dir.str()));
  expect_error([&] { load_idx_dataset(dir.str(), "fashion-mnist"); },
               {"not found", dir.file("t10k-labels-idx1-ubyte")});
}

// ---------------------------------------------------------------- CIFAR

uint8_t cifar_pixel(int64_t record, int64_t channel, int64_t pos) {
  return static_cast<uint8_t>((record * 11 + channel * 80 + pos) % 256);
}

// Records numbered first, first + 1, ... with the given labels (CIFAR-100: fine labels, and
// fine / 5 as the coarse label).
Bytes cifar_records(const std::vector<uint8_t>& labels, int64_t first, bool hundred) {
  Bytes out;
  for (size_t i = 0; i < labels.size(); ++i) {
    if (hundred) out.push_back(static_cast<uint8_t>(labels[i] / 5));  // coarse label
    out.push_back(labels[i]);
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t p = 0; p < 1024; ++p) out.push_back(cifar_pixel(first + int64_t(i), c, p));
  }
  return out;
}

at::Tensor expected_cifar_pixels(int64_t n, int64_t first) {
  at::Tensor out = at::empty({n, 3, 1024}, at::kDouble);
  auto a = out.accessor<double, 3>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t p = 0; p < 1024; ++p) a[i][c][p] = cifar_pixel(first + i, c, p);
  return out.view({n, 3, 32, 32});
}

// Two records in each of the five train batches (labels i % 10), three in the test batch.
void write_cifar10(const std::string& dir) {
  for (int b = 0; b < 5; ++b) {
    write_plain((fs::path(dir) / ("data_batch_" + std::to_string(b + 1) + ".bin")).string(),
                cifar_records({uint8_t(2 * b), uint8_t(2 * b + 1)}, 2 * b, false));
  }
  write_plain((fs::path(dir) / "test_batch.bin").string(), cifar_records({4, 0, 9}, 100, false));
}

TEST(Cifar, Cifar10RecordsPixelsAndLabels) {
  TempDir dir;
  write_cifar10(dir.str());
  const DatasetSplit split = load_cifar(dir.str(), 10);
  EXPECT_EQ(split.name, "cifar10");
  EXPECT_EQ(split.num_classes, 10);
  ASSERT_EQ(split.train.images.sizes(), (std::vector<int64_t>{10, 3, 32, 32}));
  ASSERT_EQ(split.test.images.sizes(), (std::vector<int64_t>{3, 3, 32, 32}));
  EXPECT_TRUE(at::equal(split.train.labels, at::arange(10, at::kLong)));
  EXPECT_TRUE(at::equal(split.test.labels, labels_tensor({4, 0, 9})));
  ASSERT_EQ(split.channel_mean.size(), 3u);
  const at::Tensor raw = expected_cifar_pixels(10, 0);
  double pixel_slack = 0;
  for (int64_t c = 0; c < 3; ++c) {
    const at::Tensor channel = split.train.images.select(1, c);
    const NormalizationSlack slack = normalization_slack(channel, split.channel_mean[c], split.channel_std[c], 1.0);
    pixel_slack = std::max(pixel_slack, slack.pixel);
    EXPECT_NEAR(split.channel_mean[c], raw.select(1, c).mean().item<double>() / 255.0, slack.channel);
    EXPECT_NEAR(channel.mean().item<double>(), 0.0, slack.mean);
    EXPECT_NEAR(channel.pow(2).mean().item<double>(), 1.0, slack.square);
  }
  EXPECT_TRUE(at::allclose(raw_pixels(split.train, split), raw, 0, pixel_slack));
  EXPECT_TRUE(at::allclose(raw_pixels(split.test, split), expected_cifar_pixels(3, 100), 0, pixel_slack));

  const DatasetSplit limited = load_cifar(dir.str(), 10, 3, 2);
  EXPECT_TRUE(at::equal(limited.train.labels, at::arange(3, at::kLong)));
  EXPECT_EQ(limited.test.size(), 2);
}

TEST(Cifar, AcceptsTheArchiveDirectory) {
  TempDir dir;
  fs::create_directories(dir.file("cifar-10-batches-bin"));
  write_cifar10(dir.file("cifar-10-batches-bin"));
  const DatasetSplit split = load_cifar(dir.str(), 10);
  EXPECT_EQ(split.source, dir.file("cifar-10-batches-bin"));
  EXPECT_EQ(split.train.size(), 10);
}

TEST(Cifar, Cifar100UsesFineLabels) {
  TempDir dir;
  write_plain(dir.file("train.bin"), cifar_records({99, 0, 42, 57}, 0, true));
  write_plain(dir.file("test.bin"), cifar_records({13, 64}, 50, true));
  const DatasetSplit split = load_cifar(dir.str(), 100);
  EXPECT_EQ(split.name, "cifar100");
  EXPECT_EQ(split.num_classes, 100);
  EXPECT_TRUE(at::equal(split.train.labels, labels_tensor({99, 0, 42, 57})));
  EXPECT_TRUE(at::equal(split.test.labels, labels_tensor({13, 64})));
  double pixel_slack = 0;
  for (int64_t c = 0; c < static_cast<int64_t>(split.channel_mean.size()); ++c)
    pixel_slack = std::max(pixel_slack, normalization_slack(split.train.images.select(1, c), split.channel_mean[c],
                                                            split.channel_std[c], 1.0).pixel);
  EXPECT_TRUE(at::allclose(raw_pixels(split.train, split), expected_cifar_pixels(4, 0), 0, pixel_slack));
  EXPECT_TRUE(at::allclose(raw_pixels(split.test, split), expected_cifar_pixels(2, 50), 0, pixel_slack));
}

TEST(Cifar, CorruptAndMissingFiles) {
  TempDir dir;
  write_cifar10(dir.str());
  // A record cut short.
  Bytes bytes = read_plain(dir.file("data_batch_3.bin"));
  bytes.pop_back();
  write_plain(dir.file("data_batch_3.bin"), bytes);
  expect_error([&] { load_cifar(dir.str(), 10); },
               {dir.file("data_batch_3.bin"), "not a multiple", "3073"});
  // A CIFAR-10 file read as CIFAR-100 (3073-byte records, not 3074).
  TempDir hundred;
  write_plain(hundred.file("train.bin"), cifar_records({1, 2}, 0, false));
  write_plain(hundred.file("test.bin"), cifar_records({1}, 0, true));
  expect_error([&] { load_cifar(hundred.str(), 100); },
               {hundred.file("train.bin"), "not a multiple", "3074"});
  // Label outside the classes.
  write_cifar10(dir.str());
  write_plain(dir.file("test_batch.bin"), cifar_records({1, 10}, 0, false));
  expect_error([&] { load_cifar(dir.str(), 10); }, {dir.file("test_batch.bin"), "label 10"});
  // Empty and missing files, missing directory.
  write_cifar10(dir.str());
  write_plain(dir.file("test_batch.bin"), {});
  expect_error([&] { load_cifar(dir.str(), 10); }, {dir.file("test_batch.bin"), "empty"});
  write_cifar10(dir.str());
  fs::remove(dir.file("data_batch_5.bin"));
  expect_error([&] { load_cifar(dir.str(), 10, 2); }, {dir.file("data_batch_5.bin"), "not found"});
  expect_error([&] { load_cifar(dir.file("nowhere"), 10); }, {dir.file("nowhere"), "not found"});
  expect_error([&] { load_cifar(dir.str(), 20); }, {"10 or 100"});
}

// ---------------------------------------------------------------- synthetic, load_dataset

TEST(Synthetic, DeterministicForASeed) {
  const DatasetSplit a = make_synthetic(300, 100, 7);
  const DatasetSplit b = make_synthetic(300, 100, 7);
  const DatasetSplit c = make_synthetic(300, 100, 8);
  EXPECT_TRUE(a.synthetic);
  EXPECT_EQ(a.name, "synthetic");
  EXPECT_EQ(a.source, "built-in synthetic");
  EXPECT_EQ(a.num_classes, 10);
  ASSERT_EQ(a.train.images.sizes(), (std::vector<int64_t>{300, 1, 28, 28}));
  ASSERT_EQ(a.test.images.sizes(), (std::vector<int64_t>{100, 1, 28, 28}));
  EXPECT_EQ(a.train.labels.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(a.train.images, b.train.images));
  EXPECT_TRUE(at::equal(a.test.labels, b.test.labels));
  EXPECT_FALSE(at::equal(a.train.images, c.train.images));
  EXPECT_GE(a.train.labels.min().item<int64_t>(), 0);
  EXPECT_LT(a.train.labels.max().item<int64_t>(), 10);
  EXPECT_EQ(std::get<0>(at::_unique(a.train.labels)).numel(), 10);
  // Normalized from its train statistics (normalize_from_train): the fp32 budget above, with
  // the data's own range for x_max; std() divides by N - 1, not N: a factor
  // sqrt(N / (N - 1)) - 1 = 2e-6 for N = 235200 more.
  const NormalizationSlack slack = normalization_slack(a.train.images, a.channel_mean.at(0), a.channel_std.at(0),
                                                       a.train.images.abs().max().item<double>() * a.channel_std.at(0) +
                                                           std::abs(a.channel_mean.at(0)));
  EXPECT_NEAR(a.train.images.mean().item<double>(), 0.0, slack.mean);
  EXPECT_NEAR(a.train.images.std().item<double>(), 1.0, slack.square + 1.0 / a.train.images.numel());
}

TEST(Synthetic, NearestClassMeanSeparatesTheClasses) {
  const DatasetSplit s = make_synthetic(2000, 500, 1);
  const at::Tensor x = s.train.images.flatten(1);
  const at::Tensor one_hot = at::one_hot(s.train.labels, 10).to(at::kFloat);  // [N, 10]
  const at::Tensor means = at::matmul(one_hot.t(), x) / one_hot.sum(0).unsqueeze(1);
  const at::Tensor predicted = at::cdist(s.test.images.flatten(1), means).argmin(1);
  const double accuracy = predicted.eq(s.test.labels).to(at::kDouble).mean().item<double>();
  // Measured 0.952 on 500 test images (binomial sd 0.01): 0.85 is 10 sd below, and ...
  EXPECT_GT(accuracy, 0.85);
  // ... not trivially (0.995 is 4 sd above): the classes overlap a little, so a trained
  // model has work to do.
  EXPECT_LT(accuracy, 0.995);
}

TEST(LoadDataset, ByName) {
  std::ostringstream log;
  const DatasetSplit s = load_dataset("synthetic", "", log, 64, 32);
  EXPECT_TRUE(s.synthetic);
  EXPECT_EQ(s.train.size(), 64);
  EXPECT_EQ(s.test.size(), 32);
  EXPECT_EQ(load_dataset("synthetic", "", log).train.size(), kSyntheticTrainSize);

  TempDir dir;
  write_idx_dataset(dir, true);
  EXPECT_EQ(load_dataset("mnist", dir.str(), log).train.size(), 5);
  EXPECT_EQ(load_dataset("fashion-mnist", dir.str(), log, 2).train.size(), 2);
  write_cifar10(dir.str());
  EXPECT_EQ(load_dataset("cifar10", dir.str(), log).train.size(), 10);
  EXPECT_TRUE(log.str().empty()) << log.str();

  expect_error([&] { load_dataset("imagenet", "", log); },
               {"imagenet", "fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic"});
  expect_error([&] { load_dataset("cifar100", "", log); }, {"--data-dir", "train.bin"});
  expect_error([&] { load_dataset("mnist", "", log); }, {"--data-dir"});
}

TEST(LoadDataset, GivenDirectoryIsNeverReplacedBySyntheticData) {
  std::ostringstream log;
  TempDir dir;
  expect_error([&] { load_dataset("fashion-mnist", dir.file("missing"), log); },
               {dir.file("missing"), "not found"});
  write_idx_dataset(dir, true);
  write_gzip(dir.file("train-images-idx3-ubyte.gz"), idx_labels(kTrainLabels));  // wrong file
  expect_error([&] { load_dataset("fashion-mnist", dir.str(), log); },
               {"train-images-idx3-ubyte.gz", "magic"});
  EXPECT_TRUE(log.str().empty()) << log.str();
}

TEST(LoadDataset, MissingDefaultFallsBackToSyntheticWithAMessage) {
  std::ostringstream log;
  TempDir dir;
  const std::string missing = dir.file("fashion-mnist");
  const DatasetSplit s = load_idx_or_synthetic(missing, "fashion-mnist", log, 100, 50);
  EXPECT_TRUE(s.synthetic);
  EXPECT_EQ(s.name, "synthetic");
  EXPECT_EQ(s.train.size(), 100);
  EXPECT_EQ(s.test.size(), 50);
  const std::string message = log.str();
  EXPECT_NE(message.find("not found at " + missing), std::string::npos) << message;
  EXPECT_NE(message.find("SYNTHETIC"), std::string::npos) << message;
  // A present dataset is read instead, without a message.
  std::ostringstream quiet;
  write_idx_dataset(dir, true);
  EXPECT_FALSE(load_idx_or_synthetic(dir.str(), "fashion-mnist", quiet).synthetic);
  EXPECT_TRUE(quiet.str().empty());
}

TEST(LoadDataset, DebianFashionMnist) {
  if (!idx_dataset_present(kDefaultFashionMnistDir)) {
    GTEST_SKIP() << "Fashion-MNIST not installed at " << kDefaultFashionMnistDir;
  }
  std::ostringstream log;
  const DatasetSplit s = load_dataset("fashion-mnist", "", log);
  EXPECT_TRUE(log.str().empty()) << log.str();
  EXPECT_FALSE(s.synthetic);
  EXPECT_EQ(s.name, "fashion-mnist");
  EXPECT_EQ(s.source, kDefaultFashionMnistDir);
  EXPECT_EQ(s.num_classes, 10);
  ASSERT_EQ(s.train.images.sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  ASSERT_EQ(s.test.images.sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  // Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
  EXPECT_TRUE(at::equal(at::bincount(s.train.labels), at::full({10}, 6000, at::kLong)));
  EXPECT_TRUE(at::equal(at::bincount(s.test.labels), at::full({10}, 1000, at::kLong)));
  // Its well-known pixel statistics, as published to 4 decimals (half a unit: 5e-5), within
  // the fp32 budget of the mean of 47e6 values (c u mu with c = log2(N) + 2 = 27.5: 5e-7).
  ASSERT_EQ(s.channel_mean.size(), 1u);
  EXPECT_NEAR(s.channel_mean[0], 0.2860, 5e-5 + 27.5 * 0x1p-24 * 0.2860);
  EXPECT_NEAR(s.channel_std[0], 0.3530, 5e-5 + 27.5 * 0x1p-24 * 0.3530);
  EXPECT_NEAR(s.train.images.mean().item<double>(), 0.0,
              normalization_slack(s.train.images, s.channel_mean[0], s.channel_std[0], 1.0).mean);
}

// ---------------------------------------------------------------- batches

TEST(BatchIterator, CoversEveryExampleOncePerEpoch) {
  Dataset d{at::arange(10, at::kFloat).view({10, 1, 1, 1}), at::arange(10, at::kLong) * 2};
  BatchIterator it(d, 4, /*shuffle=*/true, 3);
  EXPECT_EQ(it.num_batches(), 3);
  std::vector<int64_t> sizes, seen;
  for (Batch b; it.next(b);) {
    sizes.push_back(b.labels.size(0));
    ASSERT_EQ(b.images.sizes(), (std::vector<int64_t>{b.labels.size(0), 1, 1, 1}));
    EXPECT_TRUE(at::equal(b.labels, b.images.flatten().to(at::kLong) * 2));  // pairs stay together
    for (int64_t i = 0; i < b.labels.size(0); ++i) seen.push_back(b.labels[i].item<int64_t>() / 2);
  }
  EXPECT_EQ(sizes, (std::vector<int64_t>{4, 4, 2}));
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 10u);
  std::vector<int64_t> ordered(seen);
  std::sort(ordered.begin(), ordered.end());
  EXPECT_NE(seen, ordered);  // shuffled (10! orders: a sorted one would be a bug)

  EXPECT_TRUE(at::equal(BatchIterator(d, 4, true, 3).order(), it.order()));
  EXPECT_FALSE(at::equal(BatchIterator(d, 4, true, 4).order(), it.order()));
  EXPECT_TRUE(at::equal(BatchIterator(d, 4, false, 3).order(), at::arange(10, at::kLong)));
  EXPECT_THROW(BatchIterator(d, 0, false, 0), c10::Error);
}

}  // namespace
}  // namespace lowbit::data
