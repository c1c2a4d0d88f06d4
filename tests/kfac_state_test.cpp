// lowbit::KFAC / AdaBK state: the 4-bit factors' inverse-root error against fp64, exact state
// bytes, bit-identical resume through a checkpoint, and errors that change nothing.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include <sstream>
#include <tuple>

#include <lowbit/kfac.h>

namespace lowbit {
namespace {

// conv 3 -> 4 (3x3, padding 1, bias) on 5x5 images, ReLU, linear 100 -> 3 (bias).
struct TwoLayers {
  torch::Tensor conv_w, conv_b, fc_w, fc_b;
  std::shared_ptr<LayerStatistics> stats;
  explicit TwoLayers(uint64_t seed) {
    at::manual_seed(seed);
    conv_w = (at::randn({4, 3, 3, 3}) * 0.3).requires_grad_(true);
    conv_b = (at::randn({4}) * 0.1).requires_grad_(true);
    fc_w = (at::randn({3, 100}) * 0.1).requires_grad_(true);
    fc_b = (at::randn({3}) * 0.1).requires_grad_(true);
    KfacLayer conv{conv_w, conv_b};
    conv.padding = {1, 1};
    stats = std::make_shared<LayerStatistics>(std::vector<KfacLayer>{conv, KfacLayer{fc_w, fc_b}});
  }
  std::vector<torch::Tensor> params() const { return {conv_w, conv_b, fc_w, fc_b}; }
  void pass(uint64_t seed) const {
    for (const auto& p : params()) p.mutable_grad() = at::Tensor();
    at::manual_seed(seed);
    const at::Tensor x = at::randn({8, 3, 5, 5});
    const at::Tensor labels = at::randint(3, {8});
    const at::Tensor h = at::conv2d(x, conv_w, conv_b, 1, 1);
    stats->observe(conv_w, x, h);
    const at::Tensor z = at::relu(h).flatten(1);
    const at::Tensor y = at::linear(z, fc_w, fc_b);
    stats->observe(fc_w, z, y);
    at::cross_entropy_loss(y, labels).backward();
  }
};

KfacOptions frequent(const std::string& rule, const std::string& factor) {
  KfacOptions o(0.05);
  o.rule(rule).factor(factor).stat_interval(2).root_interval(3);
  return o;
}

std::unique_ptr<KroneckerLayerOptimizer> make(bool adabk, const TwoLayers& m, const KfacOptions& o) {
  if (adabk) return std::make_unique<AdaBK>(m.stats, m.params(), o);
  return std::make_unique<KFAC>(m.stats, m.params(), o);
}

void expect_same_state(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [key, t] : a) {
    ASSERT_TRUE(b.count(key)) << key;
    EXPECT_TRUE(at::equal(t, b.at(key))) << key;
  }
}

// Inverse-root error of each factor kind on a 128 -> 96 layer whose inputs have a decaying
// spectrum, against the fp64 root of the same statistic.
double root_error(const std::string& factor, bool adabk) {
  at::manual_seed(3);
  const at::Tensor w = (at::randn({96, 128}) * 0.05).requires_grad_(true);
  auto stats = std::make_shared<LayerStatistics>(std::vector<KfacLayer>{KfacLayer{w, {}}});
  KfacOptions o(0.0);  // lr 0: the parameters stay, only the factors matter
  // eigh: one update from U = I, where the paper's QR step would still be far from the eigenbasis.
  o.factor(factor).eigen_update("eigh").stat_interval(1).root_interval(1).damping(1e-2).damping_input(1e-3).damping_output(1e-3);
  auto opt = adabk ? std::unique_ptr<KroneckerLayerOptimizer>(std::make_unique<AdaBK>(stats, std::vector<at::Tensor>{w}, o))
                   : std::make_unique<KFAC>(stats, std::vector<at::Tensor>{w}, o);
  const at::Tensor spectrum = at::pow(at::full({128}, 0.95, at::kDouble), at::arange(128, at::kDouble));
  const at::Tensor x = (at::randn({512, 128}, at::kDouble) * spectrum).to(at::kFloat);
  const at::Tensor y = at::linear(x, w);
  stats->observe(w, x, y);
  (y.pow(2).sum() / 512.0).backward();
  opt->step();
  const at::Tensor a = at::matmul(x.t().to(at::kDouble), x.to(at::kDouble)) / 512.0;
  const auto [values, vectors] = at::linalg_eigh(a);
  const at::Tensor v = values.clamp_min(0);
  const at::Tensor d = adabk ? (v + 1e-3 * v.max()).pow(-0.5) : (v + 1e-2).pow(-1.0);
  const at::Tensor exact = at::matmul(vectors * d.unsqueeze(0), vectors.t());
  const at::Tensor got = opt->roots(0).second.to(at::kDouble);
  return ((got - exact).norm() / exact.norm()).item<double>();
}

}  // namespace

TEST(Kfac4Bit, EigenvectorQuantizedRootsBeatNaiveQuantizedOnes) {
  for (const bool adabk : {false, true}) {
    const double dense = root_error("dense", adabk), eigen = root_error("eigen4", adabk),
                 naive = root_error("naive4", adabk);
    // The paper's ordering (its Table 1 for Shampoo's roots): quantizing the eigenvectors errs
    // less than quantizing the statistic, whose small eigenvalues the inverse amplifies.
    EXPECT_LT(eigen, naive) << (adabk ? "adabk" : "kfac");
    // fp32 (eigh of an fp32 matrix of order 128, condition <= 1/1e-3 or (1 + 1e-2) / 1e-2):
    // relative error <= n u kappa = 128 * 6e-8 * 1e3 = 8e-3, far under either 4-bit error.
    EXPECT_LT(dense, 8e-3) << (adabk ? "adabk" : "kfac");
    EXPECT_LT(dense, eigen) << (adabk ? "adabk" : "kfac");
    std::cout << (adabk ? "adabk" : "kfac") << " inverse-root relative error: dense " << dense << ", eigen4 " << eigen
              << ", naive4 " << naive << "\n";
  }
}

TEST(Kfac, StateBytesFollowTheLayout) {
  // Factors: conv A 3*9+1 = 28, G 4; fc A 101, G 3. Only fc's A has >= 4096 entries at 4 bits.
  const auto packed = [](int64_t n) { return n * ((n * 4 + 7) / 8) + 4 * n * ((n + 63) / 64); };
  const int64_t n = 101;
  const int64_t small = 4 * (28 * 28 + 4 * 4 + 3 * 3);  // one fp32 n x n matrix per small factor
  for (const char* rule : {"sgdm", "adamw"}) {
    TwoLayers dense_model(1), eigen_model(1), naive_model(1);
    auto dense = make(false, dense_model, frequent(rule, "dense"));
    auto eigen = make(false, eigen_model, frequent(rule, "eigen4"));
    auto naive = make(false, naive_model, frequent(rule, "naive4"));
    // Dense: statistic and inverse, both fp32, for every factor.
    EXPECT_EQ(dense->state_bytes().preconditioner, 2 * (small + 4 * n * n));
    // Eigen4: U^T at 4 bits with a scale per 64-block, fp32 eigenvalues, root at 4 bits + fp32 diagonal.
    EXPECT_EQ(eigen->state_bytes().preconditioner, 2 * small + packed(n) + 4 * n + packed(n) + 4 * n);
    // Naive4: statistic and root at 4 bits, each with an fp32 diagonal.
    EXPECT_EQ(naive->state_bytes().preconditioner, 2 * small + 2 * (packed(n) + 4 * n));
    EXPECT_EQ(dense->state_bytes().first_order, 0);
    dense_model.pass(1);
    dense->step();
    // One fp32 buffer per parameter entry (sgdm: momentum; adamw: m and v).
    const int64_t entries = 4 * 27 + 4 + 300 + 3;
    EXPECT_EQ(dense->state_bytes().first_order, (std::string(rule) == "sgdm" ? 1 : 2) * 4 * entries);
  }
}

TEST(Kfac, ResumeThroughACheckpointIsBitIdentical) {
  // Each factor kind once, each optimizer and rule at least once, and K-FAC's pi-damping (whose
  // per-factor damping is recomputed at each refresh, not stored) on 4-bit factors.
  for (const auto& [adabk, factor, mode] : std::vector<std::tuple<bool, std::string, std::string>>{
           {false, "dense", "tikhonov"}, {true, "eigen4", "tikhonov"}, {false, "naive4", "tikhonov"}, {false, "eigen4", "pi"}}) {
      KfacOptions o = frequent(adabk ? "adamw" : "sgdm", factor);
      o.damping_mode(mode);
      TwoLayers straight(5), resumed(5);
      auto a = make(adabk, straight, o);
      for (int s = 0; s < 7; ++s) {
        straight.pass(100 + s);
        a->step();
      }
      auto b = make(adabk, resumed, o);
      for (int s = 0; s < 4; ++s) {
        resumed.pass(100 + s);
        b->step();
      }
      std::stringstream buffer;
      torch::serialize::OutputArchive out;
      b->save(out);
      out.save_to(buffer);
      // A fresh optimizer on the same parameters, as after a restart.
      TwoLayers restarted(99);
      for (size_t i = 0; i < 4; ++i) restarted.params()[i].detach().copy_(resumed.params()[i].detach());
      auto c = make(adabk, restarted, o);
      torch::serialize::InputArchive in;
      in.load_from(buffer);
      c->load(in);
      for (int s = 4; s < 7; ++s) {
        restarted.pass(100 + s);
        c->step();
      }
      for (size_t i = 0; i < 4; ++i)
        EXPECT_TRUE(at::equal(straight.params()[i], restarted.params()[i])) << factor << " " << mode << " parameter " << i;
      expect_same_state(a->state_dict(), c->state_dict());
    }
}

TEST(Kfac, BadInputChangesNothing) {
  TwoLayers m(7);
  auto opt = make(true, m, frequent("adamw", "eigen4"));
  for (int s = 0; s < 3; ++s) {
    m.pass(s);
    opt->step();
  }
  const auto state = opt->state_dict();
  std::vector<at::Tensor> params;
  for (const auto& p : m.params()) params.push_back(p.detach().clone());
  const auto unchanged = [&] {
    expect_same_state(state, opt->state_dict());
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(at::equal(params[i], m.params()[i]));
  };
  const auto expect_error = [&](const std::function<void()>& f, const std::string& text) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << text;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    unchanged();
  };
  // Non-finite gradient.
  m.pass(10);
  m.fc_w.mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { opt->step(); }, "nothing was updated");
  // A gradient shaped unlike its parameter.
  m.pass(10);
  m.fc_b.mutable_grad() = at::zeros({4});
  expect_error([&] { opt->step(); }, "lowbit::AdaBK");
  // A capturing step without recorded statistics (step 3 is not one: stat_interval 2).
  m.pass(10);
  opt->step();
  const auto state4 = opt->state_dict();
  for (const auto& p : m.params()) p.mutable_grad() = at::zeros_like(p);
  {
    std::vector<at::Tensor> before;
    for (const auto& p : m.params()) before.push_back(p.detach().clone());
    try {
      opt->step();
      ADD_FAILURE() << "a capturing step without statistics must throw";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("has none recorded"), std::string::npos) << e.what();
    }
    expect_same_state(state4, opt->state_dict());
    for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(at::equal(before[i], m.params()[i]));
  }
  // Checkpoints: a misshapen factor entry, an unknown entry, a negative step count, a missing buffer.
  auto bad = state4;
  bad["layer1.G.statistic"] = at::zeros({4, 4});
  const auto reload_unchanged = [&](const std::map<std::string, at::Tensor>& checkpoint, const std::string& text) {
    try {
      opt->load_state_dict(checkpoint);
      ADD_FAILURE() << "expected an error naming " << text;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    expect_same_state(state4, opt->state_dict());
  };
  reload_unchanged(bad, "layer1.G.");
  bad = state4;
  bad["extra"] = at::zeros({1});
  reload_unchanged(bad, "unknown entry \"extra\"");
  bad = state4;
  bad["steps"] = at::scalar_tensor(-1, at::kLong);
  reload_unchanged(bad, "\"steps\" must be >= 0");
  bad = state4;
  bad["param0.buffer1"] = at::full({4, 3, 3, 3}, -1.0);
  reload_unchanged(bad, "buffer1");
  // Options: each named in its error.
  KfacOptions o;
  o.damping(0);
  TwoLayers other(8);
  try {
    KFAC(other.stats, other.params(), o);
    ADD_FAILURE() << "damping 0 must be refused";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("KfacOptions.damping"), std::string::npos) << e.what();
  }
}

}  // namespace lowbit
