// CASPR (ShampooOptions::preconditioner = "caspr") against an independent dense fp64
// reference, 4-bit CASPR against 32-bit CASPR, and the option's checkpoint and validation
// behaviour.
#include <gtest/gtest.h>

#include <lowbit/shampoo.h>

#include <cmath>
#include <iostream>
#include <sstream>

#include "optim/shampoo_internal.h"
#include "shampoo_reference.h"
#include "optimizer_fixtures.h"
#include "archive_bytes.h"

namespace lowbit {
namespace {

using testing::make_params;
using testing::set_grads;

using testing::load_from_string;
using testing::save_to_string;

double relative(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(at::kDouble) - b.to(at::kDouble)).norm() / b.to(at::kDouble).norm()).item<double>();
}

struct DenseCase {
  int64_t stat_interval, root_interval, start, max_dim;
};

// 32-bit CASPR through the optimizer (SGDM after norm grafting) against the fp64
// reference of tests/shampoo_reference.h, with the bound that reference derives for any
// fp32 implementation: fp32 rounding u = 2^-24 of the statistics, the eigh and the products,
// amplified by the conditioning of (A + ridge)^(-1/2) (divided differences up to
// (1/2)(lambda_min + ridge)^(-3/2), a relative error up to u kappa / 2, kappa <= 1/epsilon,
// on the directions excited), each root entering CASPR's direction twice, and by the
// grafting, summed over the steps with lr and the momentum buffer (details there, and in
// shampoo_equivalence_test.cpp for Shampoo). Asserted in ||.||_F at every step.
// Measured (MKL AVX-512, AVX2, SSE4.2; 1 and 2 threads): at most 0.0095 of the bound on the
// preconditioned parameters from step 4, at most 0.43 on the others (plain fp32 SGDM).
// The Shampoo reference run on the same gradients must land outside the bound, so the check
// tells the two rules apart: measured 95x to 470x the bound at epsilon = 1e-2, 1.28x to 28x
// at 1e-4 (a property of the two fp64 trajectories, the same on every machine).
TEST(Caspr, Fp32MatchesADenseFp64Reference) {
  for (const double epsilon : {1e-2, 1e-4}) {
    for (const DenseCase dc : {DenseCase{1, 1, 1, 1200}, DenseCase{2, 3, 2, 1200}, DenseCase{1, 2, 1, 16}}) {
      for (const char* method : {"eigen", "newton"}) {
        std::vector<at::Tensor> params = make_params(2);
        const ShampooOptions options = ShampooOptions(0.05).graft("sgdm").momentum(0.9).bits(32).epsilon(epsilon)
                                           .stat_interval(dc.stat_interval).root_interval(dc.root_interval)
                                           .start_preconditioning_step(dc.start).max_preconditioner_dim(dc.max_dim)
                                           .root_method(method).preconditioner("caspr");
        std::vector<testing::ReferenceShampooSgdm> refs, shampoo_refs;
        for (const auto& p : params) {
          testing::ReferenceShampooConfig rc{0.95, epsilon, dc.stat_interval, dc.root_interval, dc.start, dc.max_dim,
                                             0.05, 0.9, false, std::string(method) == "newton"};
          shampoo_refs.emplace_back(p.detach(), rc);
          rc.caspr = true;
          refs.emplace_back(p.detach(), rc);
        }
        Shampoo caspr(params, options);
        double worst_pre = 0, worst = 0, gap = 1e30;
        for (int step = 0; step < 10; ++step) {
          set_grads(params, 300 + step);
          for (size_t i = 0; i < params.size(); ++i) {
            refs[i].step(params[i].grad());
            shampoo_refs[i].step(params[i].grad());
          }
          caspr.step();
          for (size_t i = 0; i < params.size(); ++i) {
            const double diff = (params[i].detach().to(at::kDouble) - refs[i].param()).norm().item<double>();
            const double bound = refs[i].fp32_error_bound();
            worst = std::max(worst, diff / bound);
            if (i < 2 && step >= 3) worst_pre = std::max(worst_pre, diff / bound);
            ASSERT_LE(diff, bound) << "epsilon " << epsilon << " " << method << " T1=" << dc.stat_interval
                                   << " T2=" << dc.root_interval << " max_dim=" << dc.max_dim << " parameter " << i
                                   << " step " << step;
            if (i < 2 && step == 9) gap = std::min(gap, (refs[i].param() - shampoo_refs[i].param()).norm().item<double>() / bound);
          }
        }
        std::cout << "[caspr fp32 vs fp64] epsilon " << epsilon << " " << method << " T1=" << dc.stat_interval
                  << " T2=" << dc.root_interval << " max_dim=" << dc.max_dim << ": max |diff|_F / bound " << worst << " (preconditioned, from step 4: " << worst_pre << ")"
                  << ", CASPR-Shampoo distance / bound " << gap << "\n";
        EXPECT_GT(gap, 1.0) << "CASPR and Shampoo must be told apart by the bound";
        EXPECT_GT(caspr.root_updates(), 0);
      }
    }
  }
}

// Gradients with a spread of row and column scales (L's spectrum spans about 1e2, R's
// about 1e1), so that the preconditioner matters and its error can show.
at::Tensor structured_grad(int64_t m, int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor rows = at::logspace(0, -1, m, 10, at::kFloat).unsqueeze(1);
  const at::Tensor cols = at::logspace(0, -0.5, n, 10, at::kFloat).unsqueeze(0);
  return rows * at::randn({m, n}) * cols;
}

// The preconditioned (grafted) direction of one m x n parameter at each of `steps` steps
// (statistics and roots every step), through the preconditioner the optimizer builds.
std::vector<at::Tensor> directions(const ShampooOptions& o, int64_t m, int64_t n, int steps) {
  precond::ParameterPreconditioner pre({m, n}, at::TensorOptions(), preconditioner_config(o, {}));
  std::vector<at::Tensor> out;
  for (int k = 0; k < steps; ++k) {
    const at::Tensor g = structured_grad(m, n, 1000 + k);
    pre.update_statistics(g);
    pre.update_inverse_roots();
    EXPECT_EQ(pre.failures(), 0);
    out.push_back(pre.precondition(g));
  }
  return out;
}

constexpr int kSteps = 20;
constexpr int kWarmup = 8;  // steps not checked, see below

// 4-bit CASPR against 32-bit CASPR on 64 x 96 and 128 x 80 blocks (every factor quantized:
// orders 64..128, min_quant_numel 4096), for the quantized-eigenvector factor (both
// eigenbasis refreshes) and the naive factor, with Shampoo's 4-bit-vs-32-bit error on the
// same gradients as the yardstick.
//
// Bounds from the maths: a 4-bit eigenvector error dU perturbs U f(Lambda) U^T by about
// dU times the spread of f; CASPR's roots are A^(-1/2), whose log-spread is twice that of
// Shampoo's A^(-1/4) (about 2x the root error), and each root enters CASPR's direction
// twice (L~^2 G + 2 L~ G R~ + G R~^2), Shampoo's once (about 2x again). So:
//  (a) CASPR's relative error <= 4 x Shampoo's at the same step and storage (measured
//      2.3x to 3.1x);
//  (b) with "eigh" (quantization alone, no slow QR tracking) it stays below
//      4 x 0.067 = 0.27, the paper's Table 1 NRE of the 4-bit linear-2 A^(-1/4) (A2, with
//      Björck) times that factor 4 (measured 0.14 to 0.16).
// The first kWarmup steps are not checked: while R (order 96 or 80) is still rank-deficient
// its null space sits at the ridge epsilon * lambda_max, and the 4-bit eigenvector error
// leaking into it is amplified by up to sqrt(lambda_max / ridge) = 1e3 for CASPR (measured
// error 1.4 at step 1, Shampoo 0.9 there): a property of any quantized root of a
// rank-deficient statistic, not of CASPR's implementation.
// The CASPR-Shampoo distance must exceed bound (b), so a 4-bit path that fell back to
// Shampoo's rule would fail.
TEST(Caspr, FourBitIsCloseToThirtyTwoBit) {
  for (const auto [m, n] : {std::pair<int64_t, int64_t>{64, 96}, {128, 80}}) {
    for (const char* refresh : {"eigh", "qr"}) {
      for (const char* quantize : {"eigenvectors", "matrix"}) {
        const ShampooOptions base = ShampooOptions().eigen_update(refresh).quantize(quantize);
        const auto caspr32 = directions(ShampooOptions(base).bits(32).preconditioner("caspr"), m, n, kSteps);
        const auto caspr4 = directions(ShampooOptions(base).bits(4).preconditioner("caspr"), m, n, kSteps);
        const auto shampoo32 = directions(ShampooOptions(base).bits(32), m, n, kSteps);
        const auto shampoo4 = directions(ShampooOptions(base).bits(4), m, n, kSteps);
        double worst = 0, worst_ratio = 0, gap = 1e9;
        for (int k = 0; k < kSteps; ++k) {
          ASSERT_TRUE(caspr4[k].isfinite().all().item<bool>()) << "step " << k;
          if (k < kWarmup) continue;
          const double err = relative(caspr4[k], caspr32[k]), yardstick = relative(shampoo4[k], shampoo32[k]);
          worst = std::max(worst, err);
          worst_ratio = std::max(worst_ratio, err / yardstick);
          gap = std::min(gap, relative(shampoo32[k], caspr32[k]));
          EXPECT_LT(err, 4 * yardstick) << m << " x " << n << " " << refresh << " " << quantize << " step " << k;
          if (std::string(refresh) == "eigh" && std::string(quantize) == "eigenvectors")
            EXPECT_LT(err, 0.27) << m << " x " << n << " step " << k;
        }
        std::cout << "[caspr 4-bit vs 32-bit] " << m << " x " << n << " " << quantize << "/" << refresh
                  << ": max relative error " << worst << ", max ratio to Shampoo's " << worst_ratio
                  << ", min CASPR-Shampoo distance " << gap << "\n";
        EXPECT_GT(gap, 0.27);
      }
    }
  }
}

// Same gradients, same everything else: the direction changes with the option.
TEST(Caspr, DiffersFromShampoo) {
  const ShampooOptions base = ShampooOptions().bits(32).epsilon(1e-4);
  const auto shampoo = directions(ShampooOptions(base), 20, 30, 3);
  const auto caspr = directions(ShampooOptions(base).preconditioner("caspr"), 20, 30, 3);
  for (size_t k = 0; k < shampoo.size(); ++k) EXPECT_GT(relative(caspr[k], shampoo[k]), 0.05) << "step " << k;
}

ShampooOptions quick_caspr(int64_t bits) {
  return ShampooOptions(0.01).bits(bits).stat_interval(2).root_interval(4).min_quant_numel(256).epsilon(1e-4)
      .preconditioner("caspr");
}

TEST(Caspr, ResumedRunIsBitIdenticalToAnUninterruptedOne) {
  for (const int64_t bits : {32, 4}) {
    auto params = make_params(7);
    Shampoo opt(params, quick_caspr(bits));
    for (int s = 0; s < 6; ++s) {
      set_grads(params, s);
      opt.step();
    }
    const std::string checkpoint = save_to_string(opt);
    std::vector<at::Tensor> resumed_params;
    for (const auto& p : params) resumed_params.push_back(p.detach().clone().requires_grad_(true));
    Shampoo resumed(resumed_params, quick_caspr(bits).preconditioner("caspr"));
    load_from_string(resumed, checkpoint);
    EXPECT_EQ(static_cast<const ShampooOptions&>(resumed.param_groups()[0].options()).preconditioner(), "caspr");
    for (int s = 6; s < 14; ++s) {
      set_grads(params, s);
      set_grads(resumed_params, s);
      opt.step();
      resumed.step();
    }
    EXPECT_GT(opt.root_updates(), 2);
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_TRUE(at::equal(params[i], resumed_params[i])) << "bits " << bits << " parameter " << i;
  }
}

// The saved roots are L^(-1/4) for Shampoo and L^(-1/2) for CASPR: a checkpoint of one
// does not load into the other, and the error names the option.
TEST(Caspr, CheckpointOfTheOtherPreconditionerIsRefused) {
  auto params = make_params(3);
  Shampoo shampoo(params, quick_caspr(4).preconditioner("shampoo"));
  set_grads(params, 0);
  shampoo.step();
  Shampoo caspr(params, quick_caspr(4));
  try {
    load_from_string(caspr, save_to_string(shampoo));
    FAIL() << "loading a Shampoo checkpoint into CASPR must fail";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("preconditioner"), std::string::npos) << e.what();
  }
}

TEST(Caspr, ValidationNamesTheOption) {
  EXPECT_NO_THROW(ShampooOptions().preconditioner("caspr").validate());
  try {
    ShampooOptions().preconditioner("kfac").validate();
    FAIL() << "an unknown preconditioner must be refused";
  } catch (const c10::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("ShampooOptions.preconditioner"), std::string::npos) << what;
    EXPECT_NE(what.find("\"caspr\""), std::string::npos) << what;
    EXPECT_NE(what.find("\"kfac\""), std::string::npos) << what;
  }
  std::vector<at::Tensor> params = make_params(1);
  EXPECT_THROW(Shampoo(params, ShampooOptions().preconditioner("CASPR")), c10::Error);
}

}  // namespace
}  // namespace lowbit
