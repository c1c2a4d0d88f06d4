// gradient_check = "deferred" (optim/deferred_check.h): a plain step reads nothing from the
// device; a bad gradient in such a step changes nothing (nor do the steps after it), and the
// error comes from the next step that refreshes factors (or settle / save), with parameters
// and state exactly those of a run that never saw the bad step.
#include <gtest/gtest.h>

#include <lowbit/shampoo.h>

#include <torch/serialize.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "op_counter.h"

namespace lowbit {
namespace {

std::vector<at::Tensor> make_params(uint64_t seed, int count = 2) {
  at::manual_seed(seed);
  std::vector<at::Tensor> params;
  for (int i = 0; i < count; ++i) params.push_back(at::randn({48, 40}).requires_grad_(true));
  return params;
}

// Gradient of step k (the same for every run that takes step k).
void set_grads(std::vector<at::Tensor>& params, int k, double scale = 1.0) {
  at::manual_seed(1000 + k);
  for (auto& p : params) p.mutable_grad() = at::randn(p.sizes()) * scale;
}

// Statistics every 4 steps, roots every 8: steps 1-3, 5-7 are plain. Every factor of these
// shapes is quantized at 4 bits (min_quant_numel 256 < 40 * 40).
ShampooOptions options(int64_t bits, const std::string& check) {
  return ShampooOptions(0.01).bits(bits).stat_interval(4).root_interval(8).min_quant_numel(256).gradient_check(check);
}

bool bit_identical(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i].detach(), b[i].detach())) return false;
  return true;
}

void save(const Shampoo& opt) {
  torch::serialize::OutputArchive archive;
  opt.save(archive);
}

// Steps first..last of `opt` with each step's gradients.
void take_steps(Shampoo& opt, std::vector<at::Tensor>& params, int first, int last) {
  for (int k = first; k <= last; ++k) {
    set_grads(params, k);
    opt.step();
  }
}

// The same steps of two optimizers, interleaved.
void take_steps(Shampoo& a, std::vector<at::Tensor>& pa, Shampoo& b, std::vector<at::Tensor>& pb, int first,
                int last) {
  for (int k = first; k <= last; ++k) {
    take_steps(a, pa, k, k);
    take_steps(b, pb, k, k);
  }
}

std::vector<int64_t> step_counts(Shampoo& opt, const std::vector<at::Tensor>& params) {
  std::vector<int64_t> counts;
  for (const auto& p : params)
    counts.push_back(static_cast<ShampooParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).step());
  return counts;
}

TEST(DeferredCheck, APlainStepReadsNothingFromTheDevice) {
  for (int64_t bits : {32, 4}) {
    for (int count : {1, 6}) {
      std::vector<at::Tensor> params = make_params(1, count);
      Shampoo opt(params, options(bits, "deferred"));
      take_steps(opt, params, 1, 4);  // the first step is checked immediately (no state yet)
      set_grads(params, 5);
      testing::OpCounter counter;
      opt.step();
      EXPECT_EQ(counter.synchronisations(), 0) << bits << "-bit, " << count << " parameters";
    }
  }
}

TEST(DeferredCheck, GoodGradientsGiveTheImmediateResultsBitForBit) {
  for (int64_t bits : {32, 4}) {
    std::vector<at::Tensor> deferred = make_params(2), immediate = make_params(2);
    Shampoo a(deferred, options(bits, "deferred")), b(immediate, options(bits, "immediate"));
    take_steps(a, deferred, b, immediate, 1, 12);
    EXPECT_TRUE(bit_identical(deferred, immediate)) << bits << "-bit";
    EXPECT_EQ(step_counts(a, deferred), step_counts(b, immediate)) << bits << "-bit";
  }
}

// Steps 1-4 good; step 5 (plain) bad; steps 6, 7 (plain) good but poisoned; step 8 refreshes
// and raises. The twin takes exactly the steps the optimizer kept, 1-4, and then both go on
// with the same gradients from step 5.
// The bad gradient of step 5 is parameter 1's: one NaN element, or all of it times 1e25.
void expect_recovery(int64_t bits, bool nan, const std::string& fragment) {
  std::vector<at::Tensor> params = make_params(3), twin_params = make_params(3);
  Shampoo opt(params, options(bits, "deferred")), twin(twin_params, options(bits, "immediate"));
  take_steps(opt, params, twin, twin_params, 1, 4);
  set_grads(params, 5);
  if (nan) {
    params[1].mutable_grad()[3][7] = std::numeric_limits<float>::quiet_NaN();
  } else {
    params[1].mutable_grad().mul_(1e25);  // squared norm ~2e53, beyond 2^104 (issue 17's scenario)
  }
  opt.step();  // no read: nothing raised yet
  take_steps(opt, params, 6, 7);
  EXPECT_TRUE(bit_identical(params, twin_params)) << "a deferred bad step or a poisoned one wrote";
  set_grads(params, 8);
  try {
    opt.step();
    ADD_FAILURE() << "the refresh step did not raise the deferred error";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const std::string& f : {std::string("lowbit::Shampoo: parameter 1 of group 0"), fragment,
                                 std::string("deferred gradient check 2 steps later"),
                                 std::string("as they were before it")})
      EXPECT_NE(message.find(f), std::string::npos) << "missing \"" << f << "\" in: " << message;
  }
  // Exactly the state of the twin: the counters went back, so the next steps match bit for bit.
  EXPECT_TRUE(bit_identical(params, twin_params));
  EXPECT_EQ(step_counts(opt, params), step_counts(twin, twin_params)) << bits << "-bit";
  take_steps(opt, params, twin, twin_params, 5, 12);
  EXPECT_TRUE(bit_identical(params, twin_params)) << bits << "-bit";
}

TEST(DeferredCheck, ANaNGradientChangesNothingAndRaisesAtTheNextRefresh) {
  for (int64_t bits : {32, 4}) expect_recovery(bits, true, "has a NaN or Inf gradient");
}

TEST(DeferredCheck, AnOverflowingGradientChangesNothingAndRaisesAtTheNextRefresh) {
  for (int64_t bits : {32, 4}) expect_recovery(bits, false, "exceeds 2^104");
}

TEST(DeferredCheck, SaveAndSettleRaiseTheDeferredError) {
  std::vector<at::Tensor> params = make_params(4);
  Shampoo opt(params, options(32, "deferred"));
  take_steps(opt, params, 1, 4);
  set_grads(params, 5, std::numeric_limits<double>::infinity());
  opt.step();
  EXPECT_THROW(save(opt), c10::Error);
  opt.settle();  // settled by the save: nothing pending any more
  set_grads(params, 5, std::numeric_limits<double>::infinity());
  opt.step();
  EXPECT_THROW(opt.settle(), c10::Error);
}

TEST(DeferredCheck, TheFirstStepRefreshesAndOtherOptionsAreCheckedImmediately) {
  // Where the rule needs more than the gradients (skip_nonfinite), or SOAP, or a first step,
  // a bad gradient raises in the step itself. (fp16 takes the same path in
  // ShampooEngine::can_defer; no fp16 case here.)
  struct Case {
    ShampooOptions options;
    const char* what;
  };
  const std::vector<Case> cases{{options(32, "deferred"), "a first step"},
                                {options(32, "deferred").preconditioner("soap").graft("adamw"), "SOAP"}};
  for (const Case& c : cases) {
    std::vector<at::Tensor> params = make_params(5);
    Shampoo opt(params, c.options);
    int first = 1;
    if (std::string(c.what) != "a first step") {
      take_steps(opt, params, 1, 1);
      first = 2;
    }
    set_grads(params, first, std::numeric_limits<double>::quiet_NaN());
    EXPECT_THROW(opt.step(), c10::Error) << c.what;
  }
  std::vector<at::Tensor> params = make_params(6);
  Shampoo skipping(params, options(32, "deferred").skip_nonfinite(true));
  set_grads(params, 1);
  skipping.step();
  set_grads(params, 2, std::numeric_limits<double>::quiet_NaN());
  skipping.step();
  EXPECT_EQ(skipping.skipped_steps(), 1);
}

TEST(DeferredCheck, AutoIsImmediateOnACpu) {
  std::vector<at::Tensor> params = make_params(7);
  Shampoo opt(params, options(32, "auto"));
  set_grads(params, 1);
  opt.step();
  set_grads(params, 2, std::numeric_limits<double>::quiet_NaN());
  EXPECT_THROW(opt.step(), c10::Error);
}

}  // namespace
}  // namespace lowbit
