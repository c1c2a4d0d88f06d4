#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/loss.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/serialize.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <ostream>
#include <thread>
#include <unistd.h>

#include "data/dataset.h"
#include "models/models.h"
#include "precond/parameter_preconditioner.h"
#include "train/optimizer_factory.h"

#include <lowbit/sophia.h>
#include "train/progress_bar.h"

namespace lowbit::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The shuffle of an epoch depends only on (seed, epoch), so a resumed run sees the same batches.
uint64_t epoch_seed(uint64_t seed, int64_t epoch) { return seed * 1000003ull + static_cast<uint64_t>(epoch); }

}  // namespace

double evaluate_accuracy(models::Classifier& model, const data::Dataset& test) {
  torch::NoGradGuard no_grad;
  model.eval();
  int64_t correct = 0;
  const int64_t n = test.labels.size(0);
  for (int64_t start = 0; start < n; start += 1000) {
    const int64_t end = std::min(n, start + 1000);
    const at::Tensor logits = model.forward(test.images.slice(0, start, end));
    correct += logits.argmax(1).eq(test.labels.slice(0, start, end)).sum().item<int64_t>();
  }
  model.train();
  return n > 0 ? static_cast<double>(correct) / n : 0.0;
}

void save_trained_model(const std::string& path, const TrainConfig& config, models::Classifier& model) {
  torch::serialize::OutputArchive archive;
  model.save(archive);
  archive.write("lowbit_model", c10::IValue(config.model));
  archive.write("lowbit_dataset", c10::IValue(config.dataset));
  archive.save_to(path + ".tmp");
  std::filesystem::rename(path + ".tmp", path);  // never a half-written file under the name
}

void load_trained_model(const std::string& path, const std::string& model_name, const std::string& dataset,
                        models::Classifier& model) {
  TORCH_CHECK(std::filesystem::exists(path), "--checkpoint: ", path, " does not exist (make one with "
              "`lowbit train --save-model FILE`)");
  torch::serialize::InputArchive archive;
  archive.load_from(path);
  c10::IValue saved_model, saved_dataset;
  TORCH_CHECK(archive.try_read("lowbit_model", saved_model) && archive.try_read("lowbit_dataset", saved_dataset),
              "--checkpoint: ", path, " is not a model saved by `lowbit train --save-model`");
  TORCH_CHECK(saved_model.toStringRef() == model_name, "--checkpoint: ", path, " holds a ", saved_model.toStringRef(),
              " model; --model is ", model_name);
  TORCH_CHECK(saved_dataset.toStringRef() == dataset, "--checkpoint: ", path, " was trained on ",
              saved_dataset.toStringRef(), "; --dataset is ", dataset);
  model.load(archive);
}

namespace {

// Checkpoint layout: model.pt, optimizer.pt and progress.pt (epoch, step, history, and the
// identity of the run, checked on resume).
struct Progress {
  int64_t epoch = 0, step = 0;
  std::vector<EpochRecord> history;
};

std::string run_identity(const TrainConfig& c) {
  return c.dataset + "|" + c.model + "|" + c.optimizer + "|" + std::to_string(c.seed) + "|" +
         std::to_string(c.batch_size);
}

void save_checkpoint(const std::string& dir, const TrainConfig& config, models::Classifier& model,
                     const torch::optim::Optimizer& optimizer, const Progress& progress) {
  std::filesystem::create_directories(dir);
  {
    torch::serialize::OutputArchive archive;
    model.save(archive);
    archive.save_to(dir + "/model.pt.tmp");
  }
  {
    torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    archive.save_to(dir + "/optimizer.pt.tmp");
  }
  torch::serialize::OutputArchive archive;
  archive.write("identity", c10::IValue(run_identity(config)));
  archive.write("epoch", c10::IValue(progress.epoch));
  archive.write("step", c10::IValue(progress.step));
  std::vector<double> rows;
  for (const EpochRecord& r : progress.history)
    rows.insert(rows.end(), {double(r.epoch), r.train_loss, r.test_accuracy, r.seconds, r.lr, double(r.steps)});
  archive.write("history", at::tensor(rows, at::kDouble));
  archive.save_to(dir + "/progress.pt.tmp");
  // Rename last, so an interrupted save never leaves a half-written checkpoint behind.
  for (const char* name : {"model.pt", "optimizer.pt", "progress.pt"})
    std::filesystem::rename(dir + "/" + name + ".tmp", dir + "/" + name);
}

Progress load_checkpoint(const std::string& dir, const TrainConfig& config, models::Classifier& model,
                         torch::optim::Optimizer& optimizer) {
  for (const char* name : {"model.pt", "optimizer.pt", "progress.pt"})
    TORCH_CHECK(std::filesystem::exists(dir + "/" + name), "--resume: ", dir, "/", name, " does not exist");
  Progress progress;
  torch::serialize::InputArchive archive;
  archive.load_from(dir + "/progress.pt");
  c10::IValue identity, epoch, step;
  archive.read("identity", identity);
  TORCH_CHECK(identity.toStringRef() == run_identity(config), "--resume: the checkpoint in ", dir,
              " belongs to another run (", identity.toStringRef(), "); this run is ", run_identity(config));
  archive.read("epoch", epoch);
  archive.read("step", step);
  progress.epoch = epoch.toInt();
  progress.step = step.toInt();
  at::Tensor rows;
  archive.read("history", rows);
  const at::Tensor r = rows.reshape({-1, 6});
  for (int64_t i = 0; i < r.size(0); ++i)
    progress.history.push_back({static_cast<int64_t>(r[i][0].item<double>()), r[i][1].item<double>(),
                                r[i][2].item<double>(), r[i][3].item<double>(), r[i][4].item<double>(),
                                static_cast<int64_t>(r[i][5].item<double>())});
  torch::serialize::InputArchive model_archive;
  model_archive.load_from(dir + "/model.pt");
  model.load(model_archive);
  torch::serialize::InputArchive optimizer_archive;
  optimizer_archive.load_from(dir + "/optimizer.pt");
  optimizer.load(optimizer_archive);
  return progress;
}

// The statistic of the largest preconditioner factor, for `lowbit quant-error --matrix`.
void dump_largest_statistic(const torch::optim::Optimizer& optimizer, const std::string& path) {
  at::Tensor largest;
  for (const auto& [key, base] : optimizer.state()) {
    const auto* s = dynamic_cast<const ShampooParamState*>(base.get());
    if (s == nullptr || !s->preconditioner) continue;
    for (const precond::KroneckerFactor* f : s->preconditioner->factors())
      if (!largest.defined() || f->order() > largest.size(0)) largest = f->statistic();
  }
  TORCH_CHECK(largest.defined(), "--dump-preconditioner: the optimizer has no preconditioner to dump");
  torch::save(largest.contiguous(), path);
}

// The loss of one batch (a rank whose shard of a short last batch is empty contributes
// zero gradients), scaled so that averaged gradients are those of the whole batch.
at::Tensor batch_loss(models::Classifier& model, const Shard& shard) {
  const at::Tensor logits = model.forward(shard.images);
  return shard.labels.size(0) > 0 ? torch::nn::functional::cross_entropy(logits, shard.labels) : logits.sum() * 0;
}

// Sophia's Gauss-Newton-Bartlett estimate: the gradient of the loss on labels drawn from
// the model's own predictive distribution, squared and scaled by the batch size. The draw
// depends only on (seed, step), so a resumed run samples what an uninterrupted one would.
void feed_sampled_labels(models::Classifier& model, Sophia& sophia, const Shard& shard, uint64_t seed) {
  sophia.zero_grad();
  const at::Tensor logits = model.forward(shard.images);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor sampled =
      at::multinomial(at::softmax(logits.detach(), 1), 1, /*replacement=*/false, generator).squeeze(1);
  torch::nn::functional::cross_entropy(logits, sampled).backward();
  sophia.update_hessian(shard.images.size(0));
}

// Forward, backward and optimizer step on one batch; returns the loss and adds the
// optimizer's own time to `step_seconds`: step() (for Hessian optimizers that includes the
// closure's forward and double-backward graph) and Sophia's sampled-label pass.
at::Tensor train_step(models::Classifier& model, torch::optim::Optimizer& optimizer, const std::string& name,
                      const Shard& shard, uint64_t sample_seed, double& step_seconds) {
  auto scaled = [&](const at::Tensor& loss) { return shard.loss_scale == 1.0 ? loss : loss * shard.loss_scale; };
  if (needs_hessian_closure(name)) {
    at::Tensor loss;
    const auto start = Clock::now();
    optimizer.step([&] {
      loss = batch_loss(model, shard);
      // autograd::grad rather than backward(create_graph): the same gradients with their
      // graph, set as .grad, without torch's reference-cycle warning (the optimizer
      // replaces them by detached copies once it has used the graph).
      std::vector<at::Tensor> params;
      for (const auto& group : optimizer.param_groups())
        for (const auto& p : group.params()) params.push_back(p);
      const std::vector<at::Tensor> grads = torch::autograd::grad({scaled(loss)}, params, {}, /*retain_graph=*/true,
                                                                  /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i];
      return loss;
    });
    step_seconds += seconds_since(start);
    return loss.detach();
  }
  optimizer.zero_grad();
  const at::Tensor loss = batch_loss(model, shard);
  scaled(loss).backward();
  const auto start = Clock::now();
  auto* sophia = needs_sampled_labels(name) ? dynamic_cast<Sophia*>(&optimizer) : nullptr;
  const bool hessian_due = sophia != nullptr && sophia->hessian_due();
  optimizer.step();
  if (hessian_due && shard.labels.size(0) > 0) feed_sampled_labels(model, *sophia, shard, sample_seed);
  step_seconds += seconds_since(start);
  return loss.detach();
}

}  // namespace

void TrainConfig::validate() const {
  TORCH_CHECK(epochs >= 1, "--epochs must be >= 1; got ", epochs);
  TORCH_CHECK(batch_size >= 1, "--batch-size must be >= 1; got ", batch_size);
  TORCH_CHECK(warmup_epochs >= 0, "--warmup-epochs must be >= 0; got ", warmup_epochs);
  TORCH_CHECK(threads >= 0, "--threads must be >= 0; got ", threads);
  TORCH_CHECK(!resume || !checkpoint_dir.empty(), "--resume needs --checkpoint DIR");
  TORCH_CHECK(stop_after_epoch >= 0, "--stop-after-epoch must be >= 0; got ", stop_after_epoch);
  TORCH_CHECK(arith_fp32_epochs >= 0 && arith_fp32_epochs < epochs, "--arith-fp32-epochs must be in [0, --epochs ",
              epochs, "); got ", arith_fp32_epochs);
  shampoo.validate();
  TORCH_CHECK(distributed.world_size == 1 || is_shampoo_family(optimizer), "--nproc ", distributed.world_size,
              " needs an optimizer built on Shampoo (", [] {
                std::string list;
                for (const std::string& n : kShampooFamily) list += (list.empty() ? "" : ", ") + n;
                return list;
              }(), "), which averages gradients and shares its preconditioner work; got ", optimizer);
}

TrainResult run_training(const TrainConfig& config, std::ostream& all_ranks_log) {
  config.validate();
  const DataParallel parallel(config.distributed);
  std::ostream silent(nullptr);
  std::ostream& log = parallel.rank() == 0 ? all_ranks_log : silent;
  const auto wall_start = Clock::now();
  if (config.threads > 0) {
    at::set_num_threads(config.threads);
  } else if (config.distributed.world_size > 1) {
    // Ranks share the machine's cores instead of each taking all of them.
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    at::set_num_threads(std::max(1, cores / config.distributed.world_size));
  }
  at::manual_seed(config.seed);

  const data::DatasetSplit data = data::load_dataset(config.dataset, config.data_dir, log, config.max_train,
                                                     config.max_test);
  const int64_t n = data.train.labels.size(0);
  TORCH_CHECK(n > 0, "the training set is empty");
  auto model = models::make_model(config.model, data.train.images.size(1), data.train.images.size(2),
                                  data.num_classes);
  arith::ArithOptions arithmetic = config.arithmetic;
  arithmetic.seed = config.seed;
  model->set_arithmetic(arithmetic);
  auto optimizer = make_optimizer(config.optimizer, model->parameters(), config.shampoo, config.second_order, model.get());
  parallel.attach(*optimizer, config.optimizer);

  const int64_t steps_per_epoch = (n + config.batch_size - 1) / config.batch_size;
  LrSchedule schedule;
  schedule.kind = config.schedule;
  schedule.base_lr = config.shampoo.lr();
  schedule.warmup_steps = static_cast<int64_t>(std::llround(config.warmup_epochs * steps_per_epoch));
  schedule.total_steps = config.epochs * steps_per_epoch;
  for (int64_t e : config.milestones) schedule.milestones.push_back(e * steps_per_epoch);
  schedule.gamma = config.gamma;
  schedule.validate();

  Progress progress;
  TrainResult result;
  if (config.resume) {
    progress = load_checkpoint(config.checkpoint_dir, config, *model, *optimizer);
    result.resumed_from_epoch = progress.epoch;
    log << "resumed from " << config.checkpoint_dir << " after epoch " << progress.epoch << "\n";
  }
  result.dataset = data.name;
  result.dataset_source = data.source;
  result.synthetic = data.synthetic;
  result.history = progress.history;

  double step_seconds = 0, batch_seconds = 0;
  const bool show_bar = config.progress && parallel.rank() == 0 && isatty(fileno(stderr));
  const int64_t last_epoch = config.stop_after_epoch > 0 ? std::min(config.epochs, config.stop_after_epoch) : config.epochs;
  bool fine_tuning = false;  // in the last arith_fp32_epochs, the layers compute in fp32
  for (int64_t epoch = progress.epoch + 1; epoch <= last_epoch; ++epoch) {
    if (!fine_tuning && epoch > config.epochs - config.arith_fp32_epochs) {
      fine_tuning = true;
      model->set_arithmetic(arith::ArithOptions{});
      if (parallel.rank() == 0 && arithmetic.mode != arith::Mode::Fp32)
        log << "epoch " << epoch << ": fp32 arithmetic from here on (high-precision fine-tuning)\n";
    }
    const auto epoch_start = Clock::now();
    data::BatchIterator batches(data.train, config.batch_size, /*shuffle=*/true, epoch_seed(config.seed, epoch));
    ProgressBar bar(steps_per_epoch, "epoch " + std::to_string(epoch) + "/" + std::to_string(config.epochs), show_bar);
    double loss_sum = 0;
    data::Batch batch;
    for (int64_t b = 0; b < steps_per_epoch && batches.next(batch); ++b) {
      const auto batch_start = Clock::now();
      const Shard shard = parallel.shard(batch.images, batch.labels);
      const double lr = schedule.at(progress.step);
      for (auto& group : optimizer->param_groups()) group.options().set_lr(lr);
      arith::reset_saved_bytes();
      const at::Tensor loss = train_step(*model, *optimizer, config.optimizer, shard,
                                        epoch_seed(config.seed, progress.step), step_seconds);
      const arith::SavedBytes kept = arith::saved_bytes();
      if (!fine_tuning || result.activation_bytes_fp32 == 0) {  // what the low-bit epochs kept
        result.activation_bytes_kept = std::max(result.activation_bytes_kept, kept.kept);
        result.activation_bytes_fp32 = std::max(result.activation_bytes_fp32, kept.fp32);
      }
      batch_seconds += seconds_since(batch_start);
      const double value = loss.item<double>();
      TORCH_CHECK(std::isfinite(value), "training diverged: the loss is ", value, " at step ", progress.step + 1,
                  " (try a smaller --lr)");
      loss_sum += value;
      result.step_losses.push_back(value);
      ++progress.step;
      ++result.steps;
      bar.update(b + 1, value);
    }
    bar.finish();
    EpochRecord record;
    record.epoch = epoch;
    record.train_loss = loss_sum / steps_per_epoch;
    record.test_accuracy = parallel.rank() == 0 ? evaluate_accuracy(*model, data.test) : 0.0;
    record.seconds = seconds_since(epoch_start);
    record.lr = schedule.at(progress.step - 1);
    record.steps = steps_per_epoch;
    progress.history.push_back(record);
    progress.epoch = epoch;
    char line[160];
    std::snprintf(line, sizeof(line), "epoch %lld/%lld  train loss %.4f  test acc %.4f  lr %.2e  %.1fs\n",
                  static_cast<long long>(epoch), static_cast<long long>(config.epochs), record.train_loss,
                  record.test_accuracy, record.lr, record.seconds);
    log << line << std::flush;
    if (!config.checkpoint_dir.empty() && parallel.rank() == 0) save_checkpoint(config.checkpoint_dir, config, *model, *optimizer, progress);
  }

  result.history = progress.history;
  if (!result.history.empty()) {
    result.test_accuracy = result.history.back().test_accuracy;
    result.final_train_loss = result.history.back().train_loss;
  }
  result.state = optimizer_state_bytes(*optimizer);
  if (const auto* shampoo = dynamic_cast<const Shampoo*>(optimizer.get())) {
    result.root_updates = shampoo->root_updates();
    result.communication = shampoo->communication();
  }
  result.world_size = parallel.world_size();
  result.ranks_agree = parallel.parameters_agree(model->parameters());
  if (result.steps > 0) {
    result.step_ms_mean = 1000 * step_seconds / result.steps;
    result.batch_ms_mean = 1000 * batch_seconds / result.steps;
  }
  if (!config.dump_preconditioner.empty() && parallel.rank() == 0) dump_largest_statistic(*optimizer, config.dump_preconditioner);
  if (!config.save_model.empty() && parallel.rank() == 0) save_trained_model(config.save_model, config, *model);
  result.wall_s = seconds_since(wall_start);
  return result;
}

}  // namespace lowbit::train
