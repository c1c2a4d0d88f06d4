#include "train/optimizer_factory.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <algorithm>

#include <lowbit/adahessian.h>
#include <lowbit/adamw.h>
#include <lowbit/kfac.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/sophia.h>

namespace lowbit::train {

const std::vector<std::string> kShampooFamily = {"shampoo", "shampoo4", "shampoo4-naive", "shampoo4-cholesky",
                                                 "shampoo4-cholesky-noef", "shampoo4-adamw4", "caspr", "caspr4",
                                                 "soap", "soap4"};

const std::vector<std::string> kOptimizerNames = [] {
  std::vector<std::string> names{"sgdm", "adamw", "adamw8", "adamw4"};
  names.insert(names.end(), kShampooFamily.begin(), kShampooFamily.end());
  for (const char* n : {"sophia", "sophia-h", "adahessian", "mfac", "mfac8", "mfac4", "nag-gs", "kfac", "kfac4",
                        "sgdm-bk", "sgdm-bk4", "adamw-bk", "adamw-bk4"})
    names.emplace_back(n);
  return names;
}();

bool is_shampoo_family(const std::string& name) {
  return std::find(kShampooFamily.begin(), kShampooFamily.end(), name) != kShampooFamily.end();
}

bool is_kfac_family(const std::string& name) {
  return name == "kfac" || name == "kfac4" || name.rfind("sgdm-bk", 0) == 0 || name.rfind("adamw-bk", 0) == 0;
}

namespace {

// K-FAC / AdaBK on the model's linear and convolution layers, which report to the optimizer's
// statistics from now on. 4-bit: eigenvector-quantized factors without Björck (the paper's
// Table 4 setting). Intervals T1 / T2 are the Shampoo ones (--stat-interval, --root-interval).
std::unique_ptr<torch::optim::Optimizer> make_kfac(const std::string& name, std::vector<torch::Tensor> params,
                                                   const ShampooOptions& base, const SecondOrderSettings& s,
                                                   models::Classifier* model) {
  TORCH_CHECK(model != nullptr, "--optimizer ", name, " preconditions the model's layers: make_optimizer needs the model");
  auto statistics = std::make_shared<LayerStatistics>(kfac_layers(*model));
  model->observe_layers(statistics);
  KfacOptions o(base.lr());
  o.stat_interval(base.stat_interval()).root_interval(base.root_interval()).weight_decay(base.weight_decay());
  o.momentum(base.momentum()).betas(base.betas()).eps(base.eps());
  o.factor(name.back() == '4' ? "eigen4" : "dense");
  if (name.rfind("kfac", 0) == 0) {
    o.rule("sgdm").kl_clip(s.kl_clip >= 0 ? s.kl_clip : 1e-3);
    if (s.damping > 0) o.damping(s.damping);
    if (!s.damping_mode.empty()) o.damping_mode(s.damping_mode);
    return std::make_unique<KFAC>(statistics, params, o);
  }
  o.rule(name.rfind("adamw", 0) == 0 ? "adamw" : "sgdm");
  if (s.damping > 0) o.damping_input(s.damping).damping_output(s.damping);
  return std::make_unique<AdaBK>(statistics, params, o);
}

std::string known_names() {
  std::string list;
  for (const std::string& n : kOptimizerNames) list += (list.empty() ? "" : ", ") + n;
  return list;
}

std::unique_ptr<torch::optim::Optimizer> make_second_order(const std::string& name, std::vector<torch::Tensor> params,
                                                           const ShampooOptions& base, const SecondOrderSettings& s) {
  if (name == "sophia" || name == "sophia-h") {
    SophiaOptions o(base.lr());
    o.betas({std::get<0>(base.betas()), 0.99}).weight_decay(base.weight_decay());
    o.estimator(name == "sophia" ? "gnb" : "hutchinson");
    if (s.hessian_interval > 0) o.hessian_interval(s.hessian_interval);
    if (s.rho > 0) o.rho(s.rho);
    return std::make_unique<Sophia>(params, o);
  }
  if (name == "adahessian") {
    AdaHessianOptions o(base.lr());
    o.betas(base.betas()).weight_decay(base.weight_decay());
    if (s.hessian_interval > 0) o.hessian_interval(s.hessian_interval);
    return std::make_unique<AdaHessian>(params, o);
  }
  if (name == "mfac" || name == "mfac8" || name == "mfac4") {
    MFACOptions o(base.lr());
    o.momentum(base.momentum()).weight_decay(base.weight_decay());
    o.bits(name == "mfac" ? 32 : name == "mfac8" ? 8 : 4);
    if (s.window > 0) o.window(s.window);
    if (s.damping > 0) o.damping(s.damping);
    if (!s.mapping.empty()) o.mapping(s.mapping);
    return std::make_unique<MFAC>(params, o);
  }
  if (name == "adamw8" || name == "adamw4") {
    AdamWOptions o(base.lr());
    o.betas(base.betas()).eps(base.eps()).weight_decay(base.weight_decay());
    o.bits(name == "adamw8" ? 8 : 4).min_quant_numel(base.min_quant_numel());
    if (!s.mapping.empty()) o.mapping(s.mapping);
    return std::make_unique<AdamW>(params, o);
  }
  if (name == "nag-gs") {
    NagGSOptions o(base.lr());
    if (s.mu >= 0) o.mu(s.mu);
    return std::make_unique<NagGS>(params, o);
  }
  return nullptr;
}

}  // namespace

double default_lr(const std::string& name, const std::string& graft) {
  if (name == "sgdm") return 0.05;
  if (name == "adamw" || name == "adamw8" || name == "adamw4") return 1e-3;
  if (is_shampoo_family(name)) return graft == "sgdm" ? 0.05 : 1e-3;
  if (name == "sophia" || name == "sophia-h") return 1e-3;
  if (name == "adahessian") return 0.05;  // with a warm-up: early Hessian diagonals are tiny
  if (name.rfind("mfac", 0) == 0) return 3e-3;
  if (name == "nag-gs") return 0.3;
  if (name == "kfac" || name == "kfac4") return 0.01;
  if (name.rfind("sgdm-bk", 0) == 0) return 0.05;
  return 1e-3;
}

bool needs_hessian_closure(const std::string& name) { return name == "sophia-h" || name == "adahessian"; }
bool needs_sampled_labels(const std::string& name) { return name == "sophia"; }

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> params,
                                                        const ShampooOptions& shampoo,
                                                        const SecondOrderSettings& second_order,
                                                        models::Classifier* model) {
  TORCH_CHECK(second_order.damping_mode.empty() || name == "kfac" || name == "kfac4", "--damping-mode \"",
              second_order.damping_mode, "\" applies to kfac and kfac4 (K-FAC's absolute damping); --optimizer ", name,
              " does not take it");
  if (is_kfac_family(name)) return make_kfac(name, params, shampoo, second_order, model);
  if (name == "sgdm")
    return std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(shampoo.lr()).momentum(shampoo.momentum())
                    .nesterov(shampoo.nesterov()).weight_decay(shampoo.weight_decay()));
  if (name == "adamw")
    return std::make_unique<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(shampoo.lr()).betas(shampoo.betas()).eps(shampoo.eps())
                    .weight_decay(shampoo.weight_decay()));
  if (auto optimizer = make_second_order(name, params, shampoo, second_order)) return optimizer;
  ShampooOptions options = shampoo;
  if (name == "shampoo") {
    options.bits(32);
  } else if (name == "caspr" || name == "caspr4") {  // CASPR on Shampoo's factors
    options.preconditioner("caspr");
    if (name == "caspr") options.bits(32);
    else if (options.bits() == 32) options.bits(4);
    if (name == "caspr4") options.quantize("eigenvectors");
  } else if (name == "soap" || name == "soap4") {  // AdamW in the eigenbases of L and R
    options.preconditioner("soap").graft("adamw");
    if (name == "soap") options.bits(32);
    else if (options.bits() == 32) options.bits(4);
    if (name == "soap4") options.quantize("eigenvectors");
  } else if (name == "shampoo4" || name == "shampoo4-naive" || name == "shampoo4-adamw4") {
    if (options.bits() == 32) options.bits(4);
    options.quantize(name == "shampoo4-naive" ? "matrix" : "eigenvectors");
    if (name == "shampoo4-adamw4") options.graft("adamw").graft_bits(4);  // every state low-bit
  } else if (name == "shampoo4-cholesky" || name == "shampoo4-cholesky-noef") {
    if (options.bits() == 32) options.bits(4);
    options.quantize("cholesky").error_feedback(name == "shampoo4-cholesky");
  } else {
    TORCH_CHECK(false, "--optimizer must be one of ", known_names(), "; got \"", name, "\"");
  }
  return std::make_unique<Shampoo>(params, options);
}

StateBytes optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  if (const auto* o = dynamic_cast<const Shampoo*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const Sophia*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const AdaHessian*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const MFAC*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const NagGS*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const AdamW*>(&optimizer)) return o->state_bytes();
  if (const auto* o = dynamic_cast<const KroneckerLayerOptimizer*>(&optimizer)) return o->state_bytes();
  StateBytes bytes;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined()) bytes.first_order += t.numel() * static_cast<int64_t>(t.element_size());
  };
  for (const auto& [key, state] : optimizer.state()) {
    if (const auto* s = dynamic_cast<const torch::optim::SGDParamState*>(state.get())) add(s->momentum_buffer());
    if (const auto* s = dynamic_cast<const torch::optim::AdamWParamState*>(state.get())) {
      add(s->exp_avg());
      add(s->exp_avg_sq());
      add(s->max_exp_avg_sq());
    }
  }
  return bytes;
}

}  // namespace lowbit::train
