#include "cli/train_options.h"

#include <memory>

#include "train/optimizer_factory.h"

namespace lowbit::cli {

OptimizerOptionsFor add_train_options(CLI::App& cmd, train::TrainConfig& c, bool with_optimizer) {
  // Plain values that CLI11 fills; ShampooOptions' setters are applied after parsing.
  struct Raw {
    double lr = -1, momentum = 0.9, weight_decay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    bool nesterov = false, double_quant = false;
    int64_t bits = 4, block_size = 64, min_quant_numel = 4096, max_dim = 1200;
    int64_t stat_interval = 10, root_interval = 50, start = 1, t1 = 1, t2 = -1;  // t2 -1: 4, or 1 for soap4
    int64_t graft_bits = 32;
    double error_feedback_decay = 0.0;
    double stat_decay = 0.95, epsilon = -1;  // -1: 1e-6, or 1e-4 for CASPR
    std::string graft = "adamw", mapping = "linear2", root_method = "eigen", eigen_update = "qr";
    std::string root_storage = "quantized";
  };
  auto raw = std::make_shared<Raw>();
  cmd.add_option("--dataset", c.dataset, "fashion-mnist | mnist | cifar10 | cifar100 | synthetic")->capture_default_str();
  cmd.add_option("--data-dir", c.data_dir, "Directory of the dataset files (default: the dataset's usual place)");
  cmd.add_option("--max-train", c.max_train, "Use only the first N training examples");
  cmd.add_option("--max-test", c.max_test, "Use only the first N test examples");
  cmd.add_option("--model", c.model, "mlp | cnn | resnet20 | vit")->capture_default_str();
  cmd.add_option_function<std::string>(
         "--arith", [&c](const std::string& name) { c.arithmetic.mode = arith::parse_mode(name); },
         "Arithmetic of the linear and conv layers: fp32 | luq4 (4-bit forward, LUQ 4-bit gradients) | fqt1 "
         "(1-bit forward and gradients, AGP + SCQ) | rmm (randomized matmul for linear weight gradients)")
      ->check(CLI::IsMember({"fp32", "luq4", "fqt1", "rmm"}))->default_str("fp32");
  cmd.add_flag("!--no-luq-clip", c.arithmetic.luq_clip,
               "luq4: scale the forward's 4-bit grid by the absmax instead of the MSE-optimal clipping");
  cmd.add_option("--fqt-bits", c.arithmetic.fqt_bits,
                 "fqt1: Activation Gradient Pruning keeps 1/b of the gradient groups at b bits (1: no pruning)")
      ->check(CLI::Range(1, 8))->capture_default_str();
  cmd.add_flag("!--no-fqt-scq", c.arithmetic.fqt_scq,
               "fqt1: quantize the weight gradient's neural gradient per sample too (no Sample-Channel joint "
               "Quantization; with --fqt-bits 1, the paper's per-sample baseline)");
  cmd.add_option("--arith-fp32-epochs", c.arith_fp32_epochs,
                 "Run the last N epochs with fp32 arithmetic (LUQ's high-precision fine-tuning)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd.add_option("--rmm-keep", c.arithmetic.rmm_keep, "rmm: sketch size as a fraction of the batch")
      ->check(CLI::Range(1e-6, 1.0))->capture_default_str();
  if (with_optimizer)
    cmd.add_option("--optimizer", c.optimizer,
                   "sgdm | adamw | adamw8 | adamw4 | shampoo | shampoo4 | shampoo4-naive | shampoo4-cholesky | "
                   "shampoo4-cholesky-noef | shampoo4-adamw4 | caspr | caspr4 | soap | soap4 | sophia | "
                   "sophia-h | adahessian | mfac | mfac8 | mfac4 | nag-gs | kfac | kfac4 | sgdm-bk | sgdm-bk4 | "
                   "adamw-bk | adamw-bk4")
        ->check(CLI::IsMember(train::kOptimizerNames))->capture_default_str();
  cmd.add_option("--epochs", c.epochs, "Epochs")->check(CLI::PositiveNumber)->capture_default_str();
  cmd.add_option("--batch-size", c.batch_size, "Batch size")->check(CLI::PositiveNumber)->capture_default_str();
  cmd.add_option("--lr", raw->lr,
                 "Learning rate (default per optimizer: 0.05 for sgdm and sgdm grafting, 1e-3 for adamw (also adamw8/adamw4), Shampoo "
                 "with adamw grafting, SOAP and Sophia, 3e-3 for M-FAC, 0.05 for adahessian, 0.3 for nag-gs, 0.01 for kfac, 0.05 for "
                 "sgdm-bk, 1e-3 for adamw-bk)");
  cmd.add_option("--schedule", c.schedule, "constant | cosine | multistep")
      ->check(CLI::IsMember({"constant", "cosine", "multistep"}))->capture_default_str();
  cmd.add_option("--warmup-epochs", c.warmup_epochs, "Linear warm-up length in epochs")->capture_default_str();
  cmd.add_option("--milestones", c.milestones, "multistep: epochs after which lr is multiplied by --gamma");
  cmd.add_option("--gamma", c.gamma, "multistep factor")->capture_default_str();
  cmd.add_option("--seed", c.seed, "Random seed (initialization and shuffling)")->capture_default_str();
  cmd.add_option("--threads", c.threads, "CPU threads (0: LibTorch's default)")->capture_default_str();
  cmd.add_option("--checkpoint", c.checkpoint_dir, "Save model, optimizer and progress here after every epoch");
  cmd.add_flag("--resume", c.resume, "Continue the run saved in --checkpoint");
  cmd.add_option("--stop-after-epoch", c.stop_after_epoch, "End early after this epoch (the schedule still spans --epochs)");
  cmd.add_flag("!--no-progress", c.progress, "No progress bar");
  cmd.add_option("--save-model", c.save_model, "Save the trained model to this file (for `lowbit hawq --checkpoint`)");
  cmd.add_option("--dump-preconditioner", c.dump_preconditioner,
                 "Save the largest preconditioner statistic (a tensor file for quant-error --matrix)");
  cmd.add_option("--graft", raw->graft, "First-order rule under Shampoo: sgdm | adamw")
      ->check(CLI::IsMember({"sgdm", "adamw"}))->capture_default_str();
  cmd.add_option("--momentum", raw->momentum, "SGDM momentum")->capture_default_str();
  cmd.add_flag("--nesterov", raw->nesterov, "Nesterov momentum");
  cmd.add_option("--weight-decay", raw->weight_decay, "Weight decay")->capture_default_str();
  cmd.add_option("--beta1", raw->beta1, "AdamW beta1")->capture_default_str();
  cmd.add_option("--beta2", raw->beta2, "AdamW beta2")->capture_default_str();
  cmd.add_option("--eps", raw->eps, "AdamW epsilon")->capture_default_str();
  cmd.add_option("--bits", raw->bits, "Bits of quantized Shampoo state: 8, 4 or 3")
      ->check(CLI::IsMember({8, 4, 3}))->capture_default_str();
  // Given, --mapping also sets adamw8/adamw4's first moment and mfac8/mfac4's window, whose
  // own default ("dynamic") differs from Shampoo's.
  cmd.add_option("--mapping", raw->mapping,
                 "Code map of the quantized state: linear2 | dynamic | linear | kashin (Shampoo, 4 or 3 bits; "
                 "adamw4's first moment; mfac4's window). adamw8/adamw4 and mfac8/mfac4 take it only when given "
                 "(their default: dynamic)")
      ->each([&c](const std::string& name) { c.second_order.mapping = name; })
      ->capture_default_str();
  cmd.add_option("--block-size", raw->block_size, "Quantization block size")->capture_default_str();
  cmd.add_flag("--double-quant", raw->double_quant, "8-bit block scales");
  cmd.add_option("--min-quant-numel", raw->min_quant_numel, "Smaller Shampoo factors (adamw8/adamw4: tensors) stay fp32")->capture_default_str();
  cmd.add_option("--max-preconditioner-dim", raw->max_dim, "Largest block order")->capture_default_str();
  cmd.add_option("--stat-interval", raw->stat_interval, "T1: steps between statistics updates")->capture_default_str();
  cmd.add_option("--root-interval", raw->root_interval, "T2: steps between inverse-root updates")->capture_default_str();
  cmd.add_option("--start-preconditioning-step", raw->start, "First step that may precondition")->capture_default_str();
  cmd.add_option("--stat-decay", raw->stat_decay, "beta of the statistics")->capture_default_str();
  cmd.add_option("--epsilon", raw->epsilon,
                 "epsilon, relative to lambda_max (default 1e-6; 1e-4 for caspr/caspr4, whose L^-1/2 G term "
                 "weights unseen directions by 1/epsilon)");
  cmd.add_option("--rectify-t1", raw->t1, "Björck steps before a statistics update")->capture_default_str();
  cmd.add_option("--rectify-t2", raw->t2,
                 "Björck steps before a root update (default 4); soap4 reads its basis every step, with 1 by default");
  cmd.add_option("--root-method", raw->root_method, "eigen | newton (32-bit Shampoo)")->capture_default_str();
  cmd.add_option("--eigen-update", raw->eigen_update, "qr | cholesky_qr | eigh (4-bit Shampoo eigenbasis refresh; cholesky_qr: the paper's QR step by CholeskyQR2, for GPUs)")->capture_default_str();
  cmd.add_option("--root-storage", raw->root_storage,
                 "quantized | eigen: low-bit Shampoo's inverse root stored at low bits (the paper), or made from "
                 "the stored eigenvectors each step (no second rounding, more work per step)")
      ->check(CLI::IsMember({"quantized", "eigen"}))->capture_default_str();
  cmd.add_option("--graft-bits", raw->graft_bits, "Bits of the AdamW moments under Shampoo / SOAP: 32, 8 or 4 "
                 "(shampoo4-adamw4: 4)")->check(CLI::IsMember({32, 8, 4}));
  cmd.add_option("--error-feedback-decay", raw->error_feedback_decay,
                 "shampoo4-cholesky: decay b_e of the error-feedback state")->capture_default_str();
  cmd.add_option("--hessian-interval", c.second_order.hessian_interval,
                 "Sophia / AdaHessian: steps between Hessian refreshes (default 10 / 1)");
  cmd.add_option("--rho", c.second_order.rho, "Sophia: scale of the Hessian in the clipped ratio (default 0.04)");
  cmd.add_option("--mfac-window", c.second_order.window, "M-FAC: gradients in the window (default 32)");
  cmd.add_option("--damping", c.second_order.damping,
                 "M-FAC: damping lambda of the Fisher (default 1e-3); K-FAC: Tikhonov lambda of each factor (default 0.03); AdaBK: "
                 "damping of both factors relative to their largest eigenvalue (default 1e-3)");
  cmd.add_option("--damping-mode", c.second_order.damping_mode,
                 "K-FAC: tikhonov (lambda on each factor, the default) | pi (factored damping, Martens & Grosse "
                 "sec. 6.3: pi lambda on A, lambda / pi on G)")
      ->check(CLI::IsMember({"tikhonov", "pi"}));
  cmd.add_option("--kl-clip", c.second_order.kl_clip, "K-FAC: KL clipping kappa, 0 for none (default 1e-3)");
  cmd.add_option("--mu", c.second_order.mu, "NAG-GS: mu (default 1)");
  return [raw](const std::string& optimizer) {
    const double lr = raw->lr > 0 ? raw->lr : train::default_lr(optimizer, raw->graft);
    const double epsilon = raw->epsilon > 0 ? raw->epsilon : optimizer.rfind("caspr", 0) == 0 ? 1e-4 : 1e-6;
    const int64_t t2 = raw->t2 >= 0 ? raw->t2 : optimizer == "soap4" ? 1 : 4;
    return ShampooOptions(lr)
                    .graft(raw->graft).momentum(raw->momentum).nesterov(raw->nesterov)
                    .weight_decay(raw->weight_decay).betas({raw->beta1, raw->beta2}).eps(raw->eps)
                    .bits(raw->bits).mapping(raw->mapping).quant_block_size(raw->block_size)
                    .double_quant_scales(raw->double_quant).min_quant_numel(raw->min_quant_numel)
                    .max_preconditioner_dim(raw->max_dim).stat_interval(raw->stat_interval)
                    .root_interval(raw->root_interval).start_preconditioning_step(raw->start)
                    .stat_decay(raw->stat_decay).epsilon(epsilon).rectify_steps({raw->t1, t2})
                    .root_method(raw->root_method).eigen_update(raw->eigen_update)
                    .root_storage(raw->root_storage).graft_bits(raw->graft_bits).error_feedback_decay(raw->error_feedback_decay);
  };
}

}  // namespace lowbit::cli
