// The training loop: schedules, a short run whose loss falls, exact resume, the JSON record.
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

#include "train/lr_schedule.h"
#include "train/optimizer_factory.h"
#include "train/result_json.h"
#include "train/trainer.h"

namespace lowbit::train {
namespace {

TEST(LrSchedule, WarmupCosineAndMultistep) {
  LrSchedule s;
  s.base_lr = 0.1;
  s.warmup_steps = 10;
  s.total_steps = 110;
  EXPECT_DOUBLE_EQ(s.at(0), 0.01);
  EXPECT_DOUBLE_EQ(s.at(9), 0.1);
  EXPECT_DOUBLE_EQ(s.at(10), 0.1);                 // cosine starts at the base rate
  // base (1 + cos(pi t)) / 2 in fp64: cos(fl(pi) / 2) = 6e-17 instead of 0 and <= 4
  // roundings of values <= base: within 8 u base (u = 2^-53).
  EXPECT_NEAR(s.at(60), 0.05, 8 * 0x1p-53 * 0.1);  // half way: half the rate
  EXPECT_NEAR(s.at(110), 0.0, 8 * 0x1p-53 * 0.1);
  s.kind = "multistep";
  s.warmup_steps = 0;
  s.milestones = {20, 50};
  EXPECT_DOUBLE_EQ(s.at(19), 0.1);
  // base * 0.1^k: k products (and 0.1's own representation error), <= (k + 1) u of the value.
  EXPECT_NEAR(s.at(20), 0.01, 2 * 0x1p-53 * 0.01);
  EXPECT_NEAR(s.at(80), 0.001, 3 * 0x1p-53 * 0.001);
  s.kind = "constant";
  EXPECT_DOUBLE_EQ(s.at(1000), 0.1);
  s.kind = "triangle";
  EXPECT_THROW(s.validate(), c10::Error);
}

TrainConfig tiny(const std::string& optimizer) {
  TrainConfig c;
  c.dataset = "synthetic";
  c.max_train = 1024;
  c.max_test = 256;
  // K-FAC / AdaBK on the MLP: the CNN's first linear layer has a 3137 x 3137 input factor,
  // whose decompositions would dominate the suite's time; the MLP's largest is 785.
  c.model = is_kfac_family(optimizer) ? "mlp" : "cnn";
  // AdaBK runs at its default dampening (1e-3 of the largest eigenvalue): with batches of 64 the
  // input factor (order 785) has rank <= 64 per capture, and the dampening bounds how much the
  // directions no capture has seen are amplified (docs/kfac.md, "Dampening").
  c.optimizer = optimizer;
  c.epochs = 2;
  c.batch_size = 64;
  c.progress = false;
  // Small blocks and short intervals keep the run fast while every Shampoo path is used.
  c.shampoo = ShampooOptions(3e-3).stat_interval(2).root_interval(4).min_quant_numel(256).max_preconditioner_dim(128);
  return c;
}

TEST(Trainer, ShortRunsLowerTheLossForEveryOptimizer) {
  for (const std::string& name : kOptimizerNames) {
    std::ostringstream log;
    TrainConfig c = tiny(name);
    // 3e-3 (tiny's) for AdamW (fp32, 8- and 4-bit), Shampoo and CASPR; the others at their own default.
    const bool shampoo_family = is_shampoo_family(name);
    if (name.rfind("adamw", 0) != 0 && !shampoo_family) c.shampoo.lr(default_lr(name, "adamw"));
    if (name == "adahessian") c.warmup_epochs = 0.5;  // its tiny early Hessian diagonals need a warm-up
    // CASPR's L~^2 G term weighs gradient directions a stale statistic has not seen yet by
    // 1 / epsilon (Shampoo's roots: 1 / epsilon^(1/4) per side); with roots from a handful
    // of batches (T1 = 2, T2 = 4) the default 1e-6 makes its steps follow them (the run
    // diverges, measured loss 3.5 -> 4.2); 1e-4 is the setting of the CASPR tests.
    if (name.rfind("caspr", 0) == 0) c.shampoo.epsilon(1e-4);
    // SGDM_BK keeps SGDM's step norm (amplitude preservation) but not its direction, so per step
    // it descends by cos(D', D) of SGDM's: on this MLP even plain SGDM needs 0.1 (at the CLI's
    // 0.05 its loss went 2.24 -> 1.84 in the 32 steps, short of the 30% below), SGDM_BK 0.2
    // (measured, fp32 factors: 0.1: 2.24 -> 1.90; 0.2: 2.13 -> 0.87).
    const bool sgdm_bk = name.rfind("sgdm-bk", 0) == 0;
    if (sgdm_bk) c.shampoo.lr(0.2);
    const TrainResult r = run_training(c, log);
    ASSERT_EQ(r.history.size(), 2u) << name;
    ASSERT_EQ(r.steps, 32) << name;
    // Smoke claims, not rates: two epochs of 16 batches must cut the first epoch's mean loss by
    // 30% and beat chance (0.1) on 256 test images by far (binomial sd at p = 0.5: 0.03, so
    // 0.4 is > 10 sd above chance and far below the measured 0.58 to 0.85).
    EXPECT_LT(r.history.back().train_loss, 0.7 * r.history.front().train_loss) << name;
    // SGDM_BK's dampening: with the public code's nominal 1e-5 and exact roots, unseen directions
    // take over the step and the loss only fell 2.20 -> 1.53 here (ratio 0.70; 4-bit: 0.76); the
    // default 1e-3 (the code's effective value) reached 0.41 (4-bit: 0.31). Half is between the two.
    if (sgdm_bk) EXPECT_LT(r.history.back().train_loss, 0.5 * r.history.front().train_loss) << name;
    EXPECT_GT(r.test_accuracy, 0.4) << name;
    EXPECT_NE(log.str().find("epoch 2/2"), std::string::npos) << log.str();
    const bool first_order_only =
        name == "sgdm" || (name.rfind("adamw", 0) == 0 && !is_kfac_family(name)) || name == "nag-gs";
    EXPECT_EQ(r.state.preconditioner > 0, !first_order_only) << name;
    if (shampoo_family) EXPECT_GT(r.root_updates, 0) << name;
    EXPECT_GT(r.state.first_order, 0) << name;
  }
}

// Every optimizer whose step uses randomness (Hutchinson probes, Sophia's sampled labels)
// or state beyond torch's (Shampoo's factors, M-FAC's quantized window) resumes exactly.
class ResumedRun : public ::testing::TestWithParam<std::string> {};

TEST_P(ResumedRun, EqualsAnUninterruptedOne) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / ("lowbit_train_resume_test_" + GetParam());
  std::filesystem::remove_all(dir);
  std::ostringstream log;
  TrainConfig full = tiny(GetParam());
  if (GetParam().rfind("shampoo", 0) != 0) full.shampoo.lr(default_lr(GetParam(), "adamw"));
  full.epochs = 3;
  const TrainResult uninterrupted = run_training(full, log);

  TrainConfig interrupted = full;  // same schedule (3 epochs), stopped after the first
  interrupted.checkpoint_dir = dir.string();
  interrupted.stop_after_epoch = 1;
  EXPECT_EQ(run_training(interrupted, log).history.size(), 1u);

  TrainConfig resumed = full;
  resumed.checkpoint_dir = dir.string();
  resumed.resume = true;
  const TrainResult rest = run_training(resumed, log);
  EXPECT_EQ(rest.resumed_from_epoch, 1);
  ASSERT_EQ(rest.history.size(), 3u);
  for (size_t e = 0; e < 3; ++e) {
    EXPECT_EQ(rest.history[e].train_loss, uninterrupted.history[e].train_loss) << "epoch " << e + 1;
    EXPECT_EQ(rest.history[e].test_accuracy, uninterrupted.history[e].test_accuracy) << "epoch " << e + 1;
  }
  // A checkpoint of another run is refused.
  TrainConfig other = resumed;
  other.optimizer = GetParam() == "adamw" ? "sgdm" : "adamw";
  EXPECT_THROW(run_training(other, log), c10::Error);
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ResumedRun,
                         ::testing::Values("shampoo4", "adamw4", "sophia", "sophia-h", "adahessian", "mfac4", "nag-gs",
                                           "adamw-bk4"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (c == '-') c = '_';
                           return name;
                         });

TEST(Trainer, JsonRecordHasTheDocumentedFields) {
  std::ostringstream log;
  TrainConfig c = tiny("shampoo4");
  c.epochs = 1;
  const nlohmann::json j = to_json(c, run_training(c, log));
  for (const char* key : {"optimizer", "model", "dataset", "epochs", "seed", "test_accuracy", "final_train_loss",
                          "optimizer_state_bytes", "preconditioner_state_bytes", "step_ms_mean", "wall_s",
                          "history", "step_losses", "root_updates", "arith", "activation_bytes_kept",
                          "activation_bytes_fp32"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["optimizer"], "shampoo4");
  EXPECT_EQ(j["history"].size(), 1u);
  EXPECT_EQ(j["history"][0]["epoch"], 1);
  EXPECT_EQ(j["optimizer_state_bytes"].get<int64_t>(),
            j["preconditioner_state_bytes"].get<int64_t>() + j["first_order_state_bytes"].get<int64_t>());
}

// --arith: the CNN trains under LUQ-4 and RMM, and the record says what its layers kept
// for backward: the fp32 bytes of every linear and conv input, 4-bit codes (1/8 of them plus
// 8 bytes a layer) under LUQ-4, and under RMM the sketches of the two linear inputs (k =
// 16 of 64 rows) with the conv inputs in fp32.
TEST(Trainer, LowBitArithmeticTrainsAndCountsWhatItKeeps) {
  std::ostringstream log;
  TrainConfig c = tiny("adamw");
  const TrainResult fp32 = run_training(c, log);
  const int64_t layers = 4;  // conv1, conv2, fc1, fc2
  for (const arith::Mode mode : {arith::Mode::Luq4, arith::Mode::Fqt1, arith::Mode::Rmm}) {
    c.arithmetic.mode = mode;
    const TrainResult r = run_training(c, log);
    const std::string name = arith::to_string(mode);
    // A 1-bit forward learns slower (in 2 short epochs on synthetic data: 2.47 -> 2.04).
    const double drop = mode == arith::Mode::Fqt1 ? 0.9 : 0.7;
    EXPECT_LT(r.history.back().train_loss, drop * r.history.front().train_loss) << name;
    EXPECT_EQ(r.activation_bytes_fp32, fp32.activation_bytes_kept) << name;
    if (mode == arith::Mode::Luq4) {
      EXPECT_LE(r.activation_bytes_kept, fp32.activation_bytes_fp32 / 8 + layers * 9) << name;
      EXPECT_GE(r.activation_bytes_kept, fp32.activation_bytes_fp32 / 8) << name;
    } else if (mode == arith::Mode::Fqt1) {  // the edge layers (conv1, fc2) keep fp32 inputs, the others bits
      EXPECT_LT(r.activation_bytes_kept, fp32.activation_bytes_fp32 / 2) << name;
      EXPECT_GT(r.activation_bytes_kept, fp32.activation_bytes_fp32 / 32) << name;
    } else {
      EXPECT_LT(r.activation_bytes_kept, fp32.activation_bytes_fp32) << name;
    }
    const nlohmann::json j = to_json(c, r);
    EXPECT_EQ(j["arith"], name);
    EXPECT_EQ(j["activation_bytes_kept"].get<int64_t>(), r.activation_bytes_kept);
  }
}

// LUQ's high-precision fine-tuning: the last epoch in fp32. The first epoch is the LUQ-4 run's
// (same seed), the second is not, and the bytes reported are the low-bit epochs'.
TEST(Trainer, TheLastEpochsCanRunInFp32Arithmetic) {
  std::ostringstream log;
  TrainConfig c = tiny("adamw");
  c.arithmetic.mode = arith::Mode::Luq4;
  const TrainResult luq = run_training(c, log);
  c.arith_fp32_epochs = 1;
  std::ostringstream tuned_log;
  const TrainResult tuned = run_training(c, tuned_log);
  EXPECT_EQ(tuned.history[0].train_loss, luq.history[0].train_loss);
  EXPECT_NE(tuned.history[1].train_loss, luq.history[1].train_loss);
  EXPECT_EQ(tuned.activation_bytes_kept, luq.activation_bytes_kept);
  EXPECT_NE(tuned_log.str().find("epoch 2: fp32 arithmetic from here on"), std::string::npos) << tuned_log.str();
  EXPECT_EQ(to_json(c, tuned)["arith_fp32_epochs"], 1);
  c.arith_fp32_epochs = 2;  // every epoch: not fine-tuning but a plain fp32 run
  EXPECT_THROW(run_training(c, log), c10::Error);
}

TEST(Trainer, InvalidConfigurationsAreRejected) {
  std::ostringstream log;
  TrainConfig c = tiny("shampoo4");
  c.epochs = 0;
  EXPECT_THROW(run_training(c, log), c10::Error);
  c = tiny("shampoo4");
  c.resume = true;
  EXPECT_THROW(run_training(c, log), c10::Error);
  c = tiny("lion");
  EXPECT_THROW(run_training(c, log), c10::Error);
  c = tiny("shampoo4");
  c.dataset = "imagenet";
  EXPECT_THROW(run_training(c, log), c10::Error);
}

}  // namespace
}  // namespace lowbit::train
