// The single-process parts of distributed Shampoo: the cost balance, the factor byte
// buffers, and Shampoo::distribute on a one-rank Gloo group. Multi-rank runs are tested
// by python/tests/test_distributed.py and the cli_*nproc* tests.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include <lowbit/distributed.h>
#include <lowbit/shampoo.h>

#include "distributed/cost_balance.h"
#include "distributed/factor_packing.h"
#include "expect_error.h"
#include "precond/factor_kinds.h"

namespace lowbit {
namespace {

using testing::expect_error;

TEST(CostBalance, EveryRankGetsWorkAndNoRankCarriesMoreThanTheFairShareAndOneItem) {
  const std::vector<double> costs = {1000, 27, 512, 8, 343, 64, 1, 125, 216, 729};
  for (int world : {1, 2, 3, 4}) {
    const std::vector<int> owner = distributed::balance_by_cost(costs, world);
    ASSERT_EQ(owner.size(), costs.size());
    std::vector<double> load(world, 0.0);
    for (size_t i = 0; i < costs.size(); ++i) {
      ASSERT_GE(owner[i], 0);
      ASSERT_LT(owner[i], world);
      load[owner[i]] += costs[i];
    }
    const double total = std::accumulate(costs.begin(), costs.end(), 0.0);
    const double largest = *std::max_element(costs.begin(), costs.end());
    // Greedy largest-first: the heaviest rank exceeds the mean by at most one item.
    EXPECT_LE(*std::max_element(load.begin(), load.end()), total / world + largest) << world;
    EXPECT_GT(*std::min_element(load.begin(), load.end()), 0) << world;
    EXPECT_EQ(owner, distributed::balance_by_cost(costs, world)) << "not deterministic";
  }
  EXPECT_EQ(distributed::balance_by_cost({5, 5, 5}, 2), (std::vector<int>{0, 1, 0}));
  expect_error([] { distributed::balance_by_cost({1}, 0); }, "world_size must be >= 1");
}

// A factor of the given kind with a state of its own (one statistics and root update).
std::unique_ptr<precond::KroneckerFactor> updated_factor(precond::FactorKind kind, int64_t order, int seed) {
  precond::FactorConfig config;
  auto f = precond::make_factor(kind, order, at::TensorOptions(), config);
  at::manual_seed(seed);
  const at::Tensor g = at::randn({order, 3 * order});
  f->update_statistic(g);
  f->update_inverse_root();
  return f;
}

precond::TensorMap saved(const precond::KroneckerFactor& f) {
  precond::TensorMap m;
  f.save(m, "");
  return m;
}

void expect_same_state(const precond::KroneckerFactor& a, const precond::KroneckerFactor& b) {
  const precond::TensorMap x = saved(a), y = saved(b);
  ASSERT_EQ(x.size(), y.size());
  for (const auto& [name, t] : x) EXPECT_TRUE(at::equal(t, y.at(name))) << name;
}

TEST(FactorPacking, BuffersCarryEveryKindExactly) {
  using precond::FactorKind;
  std::vector<std::unique_ptr<precond::KroneckerFactor>> sent, received;
  int seed = 0;
  for (FactorKind kind : {FactorKind::EigenQuantized, FactorKind::Dense, FactorKind::NaiveQuantized})
    for (int64_t order : {67, 96}) {
      sent.push_back(updated_factor(kind, order, ++seed));
      received.push_back(precond::make_factor(kind, order, at::TensorOptions(), precond::FactorConfig{}));
    }
  std::vector<const precond::KroneckerFactor*> from;
  std::vector<precond::KroneckerFactor*> into;
  int64_t bytes = 0;
  for (size_t i = 0; i < sent.size(); ++i) {
    from.push_back(sent[i].get());
    into.push_back(received[i].get());
    bytes += distributed::packed_bytes(*sent[i]);
  }
  const at::Tensor buffer = distributed::pack_factors(from);
  EXPECT_EQ(buffer.numel(), bytes);
  distributed::unpack_factors(buffer, into);
  for (size_t i = 0; i < sent.size(); ++i) expect_same_state(*sent[i], *received[i]);
}

TEST(FactorPacking, AWrongSizedBufferChangesNothing) {
  auto f = updated_factor(precond::FactorKind::EigenQuantized, 64, 1);
  auto before = updated_factor(precond::FactorKind::EigenQuantized, 64, 1);
  const at::Tensor buffer = distributed::pack_factors({f.get()});
  expect_error([&] { distributed::unpack_factors(buffer.slice(0, 1), {f.get()}); }, "these factors need");
  expect_same_state(*f, *before);
}

TEST(ShampooDistribute, OneRankGlooGroupEqualsTheUndistributedOptimizerBitForBit) {
  const auto options = ShampooOptions(0.01).stat_interval(1).root_interval(2).min_quant_numel(64)
                           .max_preconditioner_dim(16);
  std::vector<at::Tensor> a, b;
  at::manual_seed(3);
  for (auto shape : {std::vector<int64_t>{20, 30}, {17}, {8, 3, 3}}) {
    a.push_back(at::randn(shape).requires_grad_(true));
    b.push_back(a.back().detach().clone().requires_grad_(true));
  }
  Shampoo plain(a, options), distributed(b, options);
  DistributedOptions d;
  d.average_gradients = true;  // a mean over one rank: the gradient itself
  distributed.distribute(make_gloo_process_group("127.0.0.1", 29000 + (getpid() % 20000), 0, 1,
                                                 std::chrono::seconds(30)), d);
  EXPECT_TRUE(distributed.distributed());
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].mutable_grad() = at::randn(a[i].sizes());
      b[i].mutable_grad() = a[i].grad().clone();
    }
    plain.step();
    distributed.step();
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << i;
  EXPECT_EQ(distributed.root_updates(), 2);
  EXPECT_GT(distributed.communication().gradient_bytes, 0);
  EXPECT_EQ(distributed.communication().state_bytes, 0);  // one rank has no one to send to
  EXPECT_EQ(distributed.communication().exchanges, 0);
  expect_error([&] { distributed.distribute(c10::intrusive_ptr<c10d::ProcessGroup>(), d); },
               "must be called before the first step");
}

}  // namespace
}  // namespace lowbit
