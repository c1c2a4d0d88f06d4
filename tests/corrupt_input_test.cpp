// Regression tests for what the fuzz tests and the sanitizer build found: inputs that made
// lowbit overflow an int64, allocate without bound, crash, load half a checkpoint, or accept
// a state that turns the next step into NaN. Each is now a c10::Error that names the input,
// and a refused checkpoint leaves the optimizer exactly as it was.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <lowbit/adahessian.h>
#include <lowbit/adamw.h>
#include <lowbit/codebook.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/quantized_matrix.h>
#include <lowbit/shampoo.h>
#include <lowbit/sophia.h>

#include "archive_bytes.h"
#include "archive_tree.h"
#include "second_order_reference.h"

namespace lowbit {
namespace {

using State = std::map<std::string, at::Tensor>;
using testing::expect_error_with;
using testing::Node;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ------------------------------------------------------------------ codec

TEST(CorruptCodecInput, TheDequantizeOpChecksColsAgainstTheCodesBeforeAllocating) {
  // A cols of 2^62 made the op allocate rows x 2^62 floats before any check (an abort
  // under ASan, a bad_alloc or worse otherwise).
  const QuantizedMatrix q = QuantizedMatrix::quantize(at::randn({4, 8}));
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("lowbit::dequantize_blockwise", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, at::ScalarType)>();
  const at::Tensor& table = codebook(Mapping::Linear2, 4);
  expect_error_with([&] { op.call(q.codes(), q.scales(), table, c10::nullopt, 4, 64, int64_t{1} << 62, at::kFloat); },
                    {"lowbit::dequantize_blockwise: codes must be uint8 of shape [4, 2305843009213693952]"});
  expect_error_with([&] { op.call(q.codes(), q.scales(), table, c10::nullopt, 4, 64, -1, at::kFloat); },
                    {"cols must be non-negative; got -1"});
  EXPECT_TRUE(at::equal(op.call(q.codes(), q.scales(), table, c10::nullopt, 4, 64, 8, at::kFloat), q.dequantize()));
}

TEST(CorruptCodecInput, LayoutSizesNeverOverflow) {
  // packed_row_bytes computed cols * bits, which overflows int64 (UBSan: signed overflow)
  // for a cols read from a corrupt state.
  EXPECT_EQ(packed_row_bytes(INT64_MAX, 4), int64_t{1} << 62);
  EXPECT_EQ(packed_row_bytes(INT64_MAX, 8), INT64_MAX);
  EXPECT_EQ(packed_row_bytes(INT64_MAX, 3), INT64_MAX / 8 * 3 + 3);
  EXPECT_EQ(blocks_per_row(INT64_MAX, 4096), INT64_MAX / 4096 + 1);
  for (int64_t cols : {0, 1, 7, 8, 9, 63, 64, 65, 1000})
    for (int64_t bits : {3, 4, 8}) {
      EXPECT_EQ(packed_row_bytes(cols, bits), (cols * bits + 7) / 8) << cols << " " << bits;
      EXPECT_EQ(blocks_per_row(cols, 64), (cols + 63) / 64) << cols;
    }
}

State edited(const State& good, const std::function<void(State&)>& edit) {
  State s;
  for (const auto& [k, v] : good) s[k] = v.clone();
  edit(s);
  return s;
}

TEST(CorruptCodecInput, FromStateChecksTheMetaAsInt64) {
  const State good = QuantizedMatrix::quantize(at::randn({6, 10})).state();
  // rows 0, cols INT64_MAX: the codes check overflowed computing the row width.
  expect_error_with([&] { QuantizedMatrix::from_state(edited(good, [](State& s) {
                      s["meta"][0] = 0;
                      s["meta"][1] = INT64_MAX;
                      s["codes"] = at::zeros({0, 5}, at::kByte);
                    })); },
                    {"lowbit::QuantizedMatrix::from_state", "holds a matrix shape of 0 x 9223372036854775807; expected orders in [0, 2^40]"});
  // bits 2^32 + 4 was narrowed to int and read as 4.
  expect_error_with([&] { QuantizedMatrix::from_state(edited(good, [](State& s) { s["meta"][2] = (int64_t{1} << 32) + 4; })); },
                    {"from_state: \"meta\" bits must be 3, 4 or 8; got 4294967300"});
  expect_error_with([&] { QuantizedMatrix::from_state(edited(good, [](State& s) { s["meta"][0] = -1; })); },
                    {"from_state: \"meta\" holds a negative shape -1 x 10"});
}

TEST(CorruptCodecInput, FromStateRefusesValuesQuantizeCannotProduce) {
  // Accepted before, and decoded to NaN / Inf / mirrored blocks.
  QuantOptions diag;
  diag.keep_diagonal = true;
  const State plain = QuantizedMatrix::quantize(at::randn({6, 6}), diag).state();
  for (float bad : {kNaN, std::numeric_limits<float>::infinity(), -1.f})
    expect_error_with([&] { QuantizedMatrix::from_state(edited(plain, [&](State& s) { s["scales"][2][0] = bad; })); },
                      {"from_state: \"scales\" holds "});
  expect_error_with([&] { QuantizedMatrix::from_state(edited(plain, [](State& s) { s["diagonal"][3] = kNaN; })); },
                    {"from_state: \"diagonal\" holds NaN or Inf"});
  QuantOptions dq;
  dq.double_quant_scales = true;
  const State doubled = QuantizedMatrix::quantize(at::randn({6, 6}), dq).state();
  expect_error_with([&] { QuantizedMatrix::from_state(edited(doubled, [](State& s) { s["scale_group_max"][0] = -2.f; })); },
                    {"from_state: \"scale_group_max\" holds a negative value"});
}

TEST(CorruptCodecInput, QuantizeBlockwiseRefusesNonFiniteOrNegativeGivenScales) {
  // They were handed back unchanged, and the block decoded to NaN (or to its mirror image).
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("lowbit::quantize_blockwise", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                          const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, bool, int64_t,
                          const c10::optional<at::Tensor>&, bool)>();
  const at::Tensor m = at::randn({3, 20});
  for (float bad : {kNaN, -std::numeric_limits<float>::infinity(), -0.5f}) {
    at::Tensor scales = at::ones({3, 1});
    scales[1][0] = bad;
    expect_error_with([&] { op.call(m, codebook(Mapping::Linear2, 4), 4, 64, false, false, 0, scales, true); },
                      {"lowbit::quantize_blockwise: scales must be finite and non-negative"});
  }
}

// ------------------------------------------------------------------ checkpoints
std::vector<at::Tensor> make_params(uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : std::vector<std::vector<int64_t>>{{8, 6}, {5}}) params.push_back(at::randn(s, gen).requires_grad_(true));
  return params;
}

void take_step(torch::optim::Optimizer& opt, std::vector<at::Tensor>& params) {
  opt.step([&] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor loss = at::zeros({});
    for (const auto& p : params) loss = loss + (0.5 * p * p + 0.3 * p).sum() + 0.1 * p.reshape({-1}).prod();
    loss.backward({}, c10::nullopt, /*create_graph=*/true);
    return loss.detach();
  });
  for (auto& p : params) p.mutable_grad() = p.grad().detach();
}

// A checkpoint of `Opt` after three steps, edited, is refused with every fragment in the
// message, and the target then steps exactly as a twin that never saw it.
template <typename Opt, typename Options>
void expect_refused(const Options& options, const std::function<void(Node&)>& edit,
                    std::initializer_list<std::string> fragments) {
  std::vector<at::Tensor> source_params = make_params(1);
  Opt source(source_params, options);
  for (int t = 0; t < 3; ++t) take_step(source, source_params);
  const auto tree = testing::read_tree(testing::save_to_string(source));
  edit(*tree);
  const std::string bytes = testing::tree_bytes(*tree);

  std::vector<at::Tensor> a = make_params(2), b = testing::clones(a);
  Opt target(a, options), twin(b, options);
  take_step(target, a);
  take_step(twin, b);
  expect_error_with([&] { testing::load_from_string(target, bytes); }, fragments);
  for (int t = 0; t < 3; ++t) {
    take_step(target, a);
    take_step(twin, b);
  }
  testing::expect_bit_identical(a, b, "after the refused checkpoint");
}

void set_all(Node& tree, const std::string& suffix, const c10::IValue& value) {
  const auto found = testing::find_all(tree, suffix);
  ASSERT_FALSE(found.empty()) << suffix;
  for (const auto& slot : found) testing::entry_at(slot) = value;
}

c10::IValue& value_at(Node& tree, const std::string& suffix) {
  const auto found = testing::find_all(tree, suffix);
  TORCH_CHECK(!found.empty(), "no entry ending with ", suffix);
  return std::get<c10::IValue>(testing::entry_at(found[0]));
}

ShampooOptions small_shampoo(int64_t bits) {
  return ShampooOptions(0.01).bits(bits).min_quant_numel(16).quant_block_size(16).stat_interval(1).root_interval(2);
}

TEST(CorruptCheckpoint, TwoParametersWithTheSameKeyAreRefused) {
  // torch::optim::serialize moved the one saved state to both parameters, leaving the second
  // a null state that Shampoo::load then dereferenced.
  expect_refused<Shampoo>(small_shampoo(4), [](Node& t) {
    value_at(t, "params/1") = value_at(t, "params/0");
  }, {"lowbit::Shampoo::load: cannot read the checkpoint", "params/1\" repeats the key", "nothing was loaded"});
}

TEST(CorruptCheckpoint, AParameterKeyThatIsNotANumberIsAClearErrorAndRestoresTheState) {
  // std::stoull threw std::invalid_argument, which load_checked did not catch: the state it
  // had cleared stayed empty.
  expect_refused<AdamW>(AdamWOptions(0.01).bits(8).min_quant_numel(16).block_size(16), [](Node& t) {
    value_at(t, "params/0") = c10::IValue(std::string("not-a-key"));
  }, {"lowbit::AdamW: cannot load the checkpoint", "\"not-a-key\" is not a parameter key", "nothing was loaded"});
}

TEST(CorruptCheckpoint, AMalformedStepCounterIsCheckedBeforeTheStateIsReplaced) {
  // lowbit_steps was read after the state had been replaced: a string there left the new
  // state with the old counter (and the Hessian refresh schedule shifted).
  expect_refused<AdaHessian>(AdaHessianOptions(0.05).hessian_interval(2), [](Node& t) {
    value_at(t, "lowbit_steps") = c10::IValue(std::string("3"));
  }, {"lowbit::AdaHessian: cannot load the checkpoint", "\"lowbit_steps\" must be an integer", "nothing was loaded"});
  expect_refused<Sophia>(SophiaOptions(0.05).estimator("hutchinson").hessian_interval(2), [](Node& t) {
    value_at(t, "lowbit_steps") = c10::IValue(int64_t{-4});
  }, {"lowbit::Sophia: cannot load the checkpoint", "\"lowbit_steps\" must be in [0, 2^53]; got -4"});
}

TEST(CorruptCheckpoint, StepCountsThatWouldOverflowAreRefused) {
  // step = INT64_MAX was accepted, and the next step's step + 1 overflowed (UBSan).
  expect_refused<AdamW>(AdamWOptions(0.01).bits(32), [](Node& t) { set_all(t, ".step", c10::IValue(INT64_MAX)); },
                        {"lowbit::AdamW", "\"step\" must be in [0, 2^53]"});
  expect_refused<Shampoo>(small_shampoo(32), [](Node& t) {
    set_all(t, ".step", c10::IValue(INT64_MAX));
    set_all(t, ".root_updates", c10::IValue(int64_t{0}));
  }, {"lowbit::Shampoo::load", "\"step\" must be in [0, 2^53]"});
  expect_refused<MFAC>(MFACOptions(0.05).window(3).damping(0.1), [](Node& t) { set_all(t, ".count", c10::IValue(INT64_MAX)); },
                       {"lowbit::MFAC", "\"count\" must be in [0, 2^53]"});
}

TEST(CorruptCheckpoint, StatesThatMakeTheNextStepNaNAreRefused) {
  // Each was accepted, and the next step wrote NaN or Inf into the parameters.
  auto poison = [](const std::string& suffix, float value) {
    return [suffix, value](Node& t) {
      c10::IValue& v = value_at(t, suffix);
      at::Tensor x = v.toTensor().clone();
      x.view(-1)[0] = value;
      v = c10::IValue(x);
    };
  };
  expect_refused<AdamW>(AdamWOptions(0.01).bits(32), poison("exp_avg_sq", -1.f),
                        {"lowbit::AdamW", "\"exp_avg_sq\" holds negative values"});
  expect_refused<AdamW>(AdamWOptions(0.01).bits(32), poison("exp_avg", kNaN), {"\"exp_avg\" holds NaN or Inf"});
  expect_refused<AdaHessian>(AdaHessianOptions(0.05), poison("exp_hessian_diag_sq", -1.f),
                             {"lowbit::AdaHessian", "\"exp_hessian_diag_sq\" holds negative values"});
  expect_refused<Sophia>(SophiaOptions(0.05), poison("hessian", kNaN), {"lowbit::Sophia", "\"hessian\" holds NaN or Inf"});
  expect_refused<NagGS>(NagGSOptions(0.2), poison("velocity", std::numeric_limits<float>::infinity()),
                        {"lowbit::NagGS", "\"velocity\" holds NaN or Inf"});
  expect_refused<Shampoo>(small_shampoo(32), poison("preconditioner/block0/left/statistic", kNaN),
                          {"lowbit::Shampoo::load", "preconditioner.block0.left.statistic", "holds NaN or Inf"});
  expect_refused<Shampoo>(small_shampoo(32).graft("sgdm"), poison("momentum_buffer", kNaN),
                          {"lowbit::Shampoo::load", "momentum_buffer", "holds NaN or Inf"});
  expect_refused<Shampoo>(small_shampoo(4), poison("eigenvectors_t/scales", -1.f),
                          {"lowbit::Shampoo::load", "eigenvectors_t.", "\"scales\" holds a negative value"});
  // The M-FAC Gram matrix must be that of the stored gradients: scaled, it makes the solve
  // in the next step use another (possibly singular) system.
  expect_refused<MFAC>(MFACOptions(0.05).window(3).damping(0.1), [](Node& t) {
    c10::IValue& v = value_at(t, "gram");
    v = c10::IValue(v.toTensor() * 1e10);
  }, {"lowbit::MFAC", "\"gram\" is not the Gram matrix of the stored gradients"});
}

TEST(CorruptCheckpoint, InfiniteOptionsAreRefused) {
  // Options come from the checkpoint too; lr = Inf passed "lr >= 0" and every step gave Inf.
  const c10::IValue inf(std::numeric_limits<double>::infinity());
  expect_refused<Shampoo>(small_shampoo(4), [&](Node& t) { value_at(t, "options.lr") = inf; },
                          {"lowbit::Shampoo::load", "ShampooOptions.lr must be finite and within float32 range (|x| <= 3.4e38); got inf"});
  expect_refused<AdamW>(AdamWOptions(0.01), [&](Node& t) { value_at(t, "options.weight_decay") = inf; },
                        {"lowbit::AdamW", "AdamWOptions.weight_decay must be finite and within float32 range (|x| <= 3.4e38); got inf"});
  expect_refused<NagGS>(NagGSOptions(0.2), [&](Node& t) { value_at(t, "options.mu") = inf; },
                        {"lowbit::NagGS", "NagGSOptions.mu must be finite and within float32 range (|x| <= 3.4e38); got inf"});
  expect_refused<Sophia>(SophiaOptions(0.05), [&](Node& t) { value_at(t, "options.rho") = inf; },
                         {"lowbit::Sophia", "SophiaOptions.rho must be finite and within float32 range (|x| <= 3.4e38); got inf"});
  expect_refused<MFAC>(MFACOptions(0.05).window(3).damping(0.1), [&](Node& t) { value_at(t, "options.lr") = inf; },
                       {"lowbit::MFAC", "MFACOptions.lr must be finite and within float32 range (|x| <= 3.4e38); got inf"});
  // Finite but beyond float32: c10 refused lr = 1e308 with a std::runtime_error in M-FAC's
  // step (found by the checkpoint fuzz), and Shampoo's epsilon = 1e308 made its initial
  // statistic epsilon I infinite, refused by the codec without naming the optimizer.
  const c10::IValue huge(1e308);
  expect_refused<MFAC>(MFACOptions(0.05).window(3).damping(0.1), [&](Node& t) { value_at(t, "options.lr") = huge; },
                       {"lowbit::MFAC", "MFACOptions.lr must be finite and within float32 range"});
  expect_refused<Shampoo>(small_shampoo(8), [&](Node& t) { value_at(t, "options.epsilon") = huge; },
                          {"lowbit::Shampoo::load", "ShampooOptions.epsilon must be finite and within float32 range"});
  expect_refused<Shampoo>(small_shampoo(8), [&](Node& t) { value_at(t, "options.epsilon") = c10::IValue(1e36); },
                          {"lowbit::Shampoo::load", "ShampooOptions.epsilon must be <= 2^104"});
}

// Two state entries that share one storage in the checkpoint (torch's archive writes a
// storage once) are loaded as two tensors: the run equals one from a checkpoint where the
// second entry is a copy. Sharing made every in-place update write both, and AdamW's
// v = m turned negative within a step (NaN parameters).
template <typename Opt, typename Options>
void expect_aliases_separated(const Options& options) {
  std::vector<at::Tensor> source_params = make_params(1);
  Opt source(source_params, options);
  for (int t = 0; t < 3; ++t) take_step(source, source_params);
  const auto shared = testing::read_tree(testing::save_to_string(source));
  const auto copied = testing::deep_copy(*shared);
  value_at(*shared, "exp_avg") = value_at(*shared, "exp_avg_sq");
  value_at(*copied, "exp_avg") = c10::IValue(value_at(*copied, "exp_avg_sq").toTensor().clone());
  std::vector<at::Tensor> a = make_params(2), b = testing::clones(a);
  Opt from_shared(a, options), from_copied(b, options);
  testing::load_from_string(from_shared, testing::tree_bytes(*shared));
  testing::load_from_string(from_copied, testing::tree_bytes(*copied));
  for (int t = 0; t < 3; ++t) {
    take_step(from_shared, a);
    take_step(from_copied, b);
  }
  testing::expect_bit_identical(a, b, "a checkpoint with shared storage against one with a copy");
}

TEST(CorruptCheckpoint, StateEntriesSharingAStorageLoadAsSeparateTensors) {
  expect_aliases_separated<AdamW>(AdamWOptions(0.01).bits(32));
  expect_aliases_separated<Shampoo>(small_shampoo(32));
}

TEST(CorruptCheckpoint, AFieldOfAnotherTypeIsNamed) {
  // Was LibTorch's "isString() INTERNAL ASSERT FAILED ... please report a bug to PyTorch".
  expect_refused<Shampoo>(small_shampoo(4), [](Node& t) { value_at(t, "options.graft") = c10::IValue(1.5); },
                          {"lowbit::Shampoo::load: cannot read the checkpoint",
                           "param_groups/param_groups/0/options\": the entry \"graft\" must be a string; got Double"});
  expect_refused<MFAC>(MFACOptions(0.05).window(3).damping(0.1), [](Node& t) {
    value_at(t, "gram") = c10::IValue(int64_t{3});
  }, {"lowbit::MFAC: cannot load the checkpoint", "the entry \"gram\" must be a tensor; got Int"});
  expect_refused<AdamW>(AdamWOptions(0.01), [](Node& t) { t.entries.erase("pytorch_version"); },
                        {"lowbit::AdamW", "not an optimizer checkpoint"});
}

}  // namespace
}  // namespace lowbit
