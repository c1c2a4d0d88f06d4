#include <lowbit/kfac.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "optim/checkpoint_reader.h"
#include "optim/second_order/optimizer_support.h"
#include "precond/factor_refresh.h"
#include "precond/kronecker_factor.h"

namespace lowbit {
namespace {

// Factors smaller than this many entries stay fp32 at any `factor` (lowbit Shampoo's
// min_quant_numel default; the 4-bit Shampoo paper keeps small matrices fp32 too).
constexpr int64_t kMinQuantNumel = 4096;
// AdaBK's gradient-amplitude preservation divides by ||D'|| + this (the public code's value).
constexpr double kAmplitudeEps = 1e-12;

precond::FactorKind kind_of(const std::string& factor, int64_t order) {
  if (factor == "dense" || order * order < kMinQuantNumel) return precond::FactorKind::Dense;
  return factor == "eigen4" ? precond::FactorKind::EigenQuantized : precond::FactorKind::NaiveQuantized;
}

// What a factor's EMA update F <- b F + (1 - b) X receives for the batch statistic C. The first
// update makes F = C exactly (K-FAC's initialization; an EMA from the factors' initial
// epsilon I would start at b epsilon I + (1 - b) C): X = (C - b epsilon I) / (1 - b).
at::Tensor statistic_input(const precond::KroneckerFactor& factor, const at::Tensor& c, bool started) {
  if (started) return c;
  const double b = factor.config().stat_decay, epsilon = factor.config().epsilon;
  return (c - b * epsilon * at::eye(c.size(0), c.options())) / (1.0 - b);
}

// K-FAC's factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3): the damping of A (x) G
// is shared as A + pi lambda I, G + (lambda / pi) I, with pi the ratio of the factors' average
// eigenvalues, sqrt((tr(A) / dim A) / (tr(G) / dim G)), so each factor is damped in proportion
// to its own scale. Sets both factors' damping for their next root refresh; one host read for
// all layers (this runs once per T2). A factor without positive finite trace (no signal yet)
// gets pi = 1: plain Tikhonov.
void set_pi_damping(const std::vector<std::pair<precond::KroneckerFactor*, precond::KroneckerFactor*>>& layers,
                    double lambda) {
  std::vector<at::Tensor> traces;
  for (const auto& [a, g] : layers) {
    traces.push_back(a->trace());
    traces.push_back(g->trace());
  }
  if (traces.empty()) return;
  const at::Tensor host = at::stack(traces).to(at::kDouble).cpu();
  const double* t = host.data_ptr<double>();
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& [a, g] = layers[i];
    const double ratio = (t[2 * i] / static_cast<double>(a->order())) / (t[2 * i + 1] / static_cast<double>(g->order()));
    const double pi = std::isfinite(ratio) && ratio > 0 ? std::sqrt(ratio) : 1.0;
    a->set_damping(pi * lambda);
    g->set_damping(lambda / pi);
  }
}

}  // namespace

struct KroneckerLayerOptimizer::LayerState {
  std::unique_ptr<precond::KroneckerFactor> input;   // A, order in (+1)
  std::unique_ptr<precond::KroneckerFactor> output;  // G, order out
  bool started = false;  // a statistics update happened (the first enters with weight 1)
};

KfacOptions::KfacOptions(double lr) : lr_(lr) {}

void KfacOptions::validate() const {
  const std::string p = "KfacOptions.";
  support::check_one_of(p, "rule", rule(), {"sgdm", "adamw"});
  support::check_one_of(p, "factor", factor(), {"dense", "eigen4", "naive4"});
  support::check_one_of(p, "eigen_update", eigen_update(), {"qr", "cholesky_qr", "eigh"});
  support::check_one_of(p, "damping_mode", damping_mode(), {"tikhonov", "pi"});
  support::check_adam_options(p, lr(), betas(), eps(), weight_decay());
  support::check_finite_options(p, {{"momentum", momentum()}, {"stat_decay", stat_decay()}, {"damping", damping()},
                                    {"damping_input", damping_input()}, {"damping_output", damping_output()},
                                    {"kl_clip", kl_clip()}});
  TORCH_CHECK(momentum() >= 0 && momentum() < 1, p, "momentum must be in [0, 1); got ", momentum());
  TORCH_CHECK(stat_decay() >= 0 && stat_decay() < 1, p, "stat_decay must be in [0, 1); got ", stat_decay());
  TORCH_CHECK(stat_interval() >= 1, p, "stat_interval must be >= 1; got ", stat_interval());
  TORCH_CHECK(root_interval() >= 1, p, "root_interval must be >= 1; got ", root_interval());
  TORCH_CHECK(damping() > 0, p, "damping must be > 0; got ", damping());
  TORCH_CHECK(damping_input() > 0, p, "damping_input must be > 0; got ", damping_input());
  TORCH_CHECK(damping_output() > 0, p, "damping_output must be > 0; got ", damping_output());
  TORCH_CHECK(kl_clip() >= 0, p, "kl_clip must be >= 0; got ", kl_clip());
  TORCH_CHECK(bjorck_steps() >= 0 && bjorck_steps() <= 16, p, "bjorck_steps must be in [0, 16]; got ", bjorck_steps());
}

void KfacOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
}

void KfacOptions::serialize(torch::serialize::InputArchive& archive) { LOWBIT_DESERIALIZE_ARG(double, lr); }

KroneckerLayerOptimizer::KroneckerLayerOptimizer(std::shared_ptr<LayerStatistics> statistics,
                                                 std::vector<torch::Tensor> params, KfacOptions options, bool adabk)
    : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))}, std::make_unique<KfacOptions>(options)),
      adabk_(adabk), statistics_(std::move(statistics)) {
  options.validate();
  TORCH_CHECK(!adabk_ || options.damping_mode() == "tikhonov", who(), ": damping_mode \"", options.damping_mode(),
              "\" is K-FAC's (its absolute lambda split between the factors); AdaBK's dampening is relative to each "
              "factor's largest eigenvalue (damping_input, damping_output), so damping_mode must be \"tikhonov\"");
  TORCH_CHECK(statistics_ != nullptr, who(), ": needs the model's LayerStatistics");
  const auto& group = param_groups().front().params();
  for (size_t i = 0; i < statistics_->layers().size(); ++i) {
    const KfacLayer& l = statistics_->layers()[i];
    for (const torch::Tensor& t : {l.weight, l.bias}) {
      if (!t.defined()) continue;
      bool found = false;
      for (const torch::Tensor& p : group) found |= p.is_same(t);
      TORCH_CHECK(found, who(), ": layer ", i, "'s weight and bias must be among the optimized parameters");
    }
  }
  layers_ = make_layers();
  buffers_.resize(group.size());
  statistics_->set_capturing(true);
  statistics_->clear();
}

KroneckerLayerOptimizer::~KroneckerLayerOptimizer() = default;

KFAC::KFAC(std::shared_ptr<LayerStatistics> statistics, std::vector<torch::Tensor> params, KfacOptions options)
    : KroneckerLayerOptimizer(std::move(statistics), std::move(params), std::move(options), false) {}

AdaBK::AdaBK(std::shared_ptr<LayerStatistics> statistics, std::vector<torch::Tensor> params, KfacOptions options)
    : KroneckerLayerOptimizer(std::move(statistics), std::move(params), std::move(options), true) {}

std::string KroneckerLayerOptimizer::who() const { return adabk_ ? "lowbit::AdaBK" : "lowbit::KFAC"; }

const KfacOptions& KroneckerLayerOptimizer::options() const {
  return static_cast<const KfacOptions&>(param_groups().front().options());
}

std::vector<KroneckerLayerOptimizer::LayerState> KroneckerLayerOptimizer::make_layers() const {
  const KfacOptions& o = options();
  std::vector<LayerState> out;
  for (const KfacLayer& l : statistics_->layers()) {
    precond::FactorConfig c;
    c.stat_decay = o.stat_decay();
    c.gram_statistics = true;
    c.eigen_update = precond::parse_eigen_update(o.eigen_update());
    c.bjorck_stat_steps = c.bjorck_root_steps = static_cast<int>(o.bjorck_steps());
    // K-FAC: (F + lambda I)^-1, absolute lambda and no relative ridge; AdaBK: (F + e F_max I)^-1/2.
    c.root_exponent = adabk_ ? 2 : 1;
    c.epsilon = 0;
    c.damping = adabk_ ? 0 : o.damping();
    const at::TensorOptions device = l.weight.options().dtype(at::kFloat);
    LayerState s;
    precond::FactorConfig input = c, output = c;
    if (adabk_) {
      input.epsilon = o.damping_input();
      output.epsilon = o.damping_output();
    }
    s.input = precond::make_factor(kind_of(o.factor(), l.input_order()), l.input_order(), device, input);
    s.output = precond::make_factor(kind_of(o.factor(), l.output_order()), l.output_order(), device, output);
    out.push_back(std::move(s));
  }
  return out;
}

torch::Tensor KroneckerLayerOptimizer::step(LossClosure closure) {
  const torch::Tensor loss = support::evaluate(closure);
  const KfacOptions& o = options();
  o.validate();
  support::check_gradients(*this, who());
  const bool skip = o.skip_nonfinite();
  if (!support::accept_gradients(*this, who(), [](const auto&) { return "kfac"; }, [skip](size_t) { return skip; })) {
    ++skipped_steps_;  // the step does not happen: what it recorded is dropped, the next pass records again
    statistics_->clear();
    return loss;
  }
  torch::NoGradGuard no_grad;
  const bool stats_due = steps_ % o.stat_interval() == 0, roots_due = steps_ % o.root_interval() == 0;
  const auto& layers = statistics_->layers();

  // Everything that can fail is read and checked before anything changes.
  std::vector<std::pair<at::Tensor, at::Tensor>> grams(layers.size());
  if (stats_due) {
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!layers[i].weight.grad().defined()) continue;
      TORCH_CHECK(statistics_->recorded(i), who(), ": step ", steps_, " captures statistics, but layer ", i,
                  " has none recorded: the model's forward must call LayerStatistics::observe (or record_input "
                  "and record_output_grad) while statistics()->capturing(); nothing was updated");
    }
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!layers[i].weight.grad().defined()) continue;
      grams[i] = statistics_->take(i);
      TORCH_CHECK(grams[i].first.isfinite().all().item<bool>() && grams[i].second.isfinite().all().item<bool>(),
                  who(), ": layer ", i, "'s recorded statistics are not finite; nothing was updated");
    }
  }
  // pi-damping reads the updated factors' traces before their roots: statistics first, then roots.
  // (For eigen4 the root then comes from the stored 4-bit eigenvectors, as on a step that only
  // refreshes roots, instead of the update's fp32 ones.)
  const bool pi_damping = !adabk_ && o.damping_mode() == "pi";
  std::vector<precond::RefreshItem> items;
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerState& s = layers_[i];
    const bool fresh = grams[i].first.defined();
    const bool root = roots_due && !pi_damping;
    items.push_back({s.input.get(), fresh ? statistic_input(*s.input, grams[i].first, s.started) : at::Tensor(), root});
    items.push_back({s.output.get(), fresh ? statistic_input(*s.output, grams[i].second, s.started) : at::Tensor(), root});
  }
  precond::refresh_alone(items);
  for (size_t i = 0; i < layers.size(); ++i) layers_[i].started |= grams[i].first.defined();
  if (pi_damping && roots_due) {
    std::vector<std::pair<precond::KroneckerFactor*, precond::KroneckerFactor*>> pairs;
    std::vector<precond::RefreshItem> roots;
    for (LayerState& s : layers_) {
      pairs.emplace_back(s.input.get(), s.output.get());
      roots.push_back({s.input.get(), at::Tensor(), true});
      roots.push_back({s.output.get(), at::Tensor(), true});
    }
    set_pi_damping(pairs, o.damping());
    precond::refresh_alone(roots);
  }

  // Preconditioned layer gradients D' = G^-1/p D A^-1/p.
  std::map<c10::TensorImpl*, at::Tensor> directions;
  std::vector<std::pair<at::Tensor, at::Tensor>> pairs;  // (D', D) for KL clipping
  for (size_t i = 0; i < layers.size(); ++i) {
    const KfacLayer& l = layers[i];
    if (!l.weight.grad().defined()) continue;
    const at::Tensor d = l.gradient_matrix().to(at::kFloat);
    at::Tensor v = at::matmul(at::matmul(layers_[i].output->inverse_root(), d), layers_[i].input->inverse_root());
    if (adabk_) v.mul_(d.norm() / (v.norm() + kAmplitudeEps));
    pairs.emplace_back(v, d);
    const int64_t w = l.weight.numel() / l.weight.size(0);
    directions[l.weight.unsafeGetTensorImpl()] = v.narrow(1, 0, w).reshape(l.weight.sizes());
    if (l.bias.defined()) directions[l.bias.unsafeGetTensorImpl()] = v.narrow(1, w, 1).reshape(l.bias.sizes());
  }
  if (!adabk_ && o.kl_clip() > 0 && !pairs.empty()) {
    // nu = min(1, sqrt(kappa / (lr^2 sum <D', D>))) (Ba et al. 2017's KL clipping).
    at::Tensor inner = at::zeros({}, pairs.front().first.options());
    for (const auto& [v, d] : pairs) inner += (v * d).sum();
    const at::Tensor nu = at::clamp_max(at::sqrt(o.kl_clip() / (o.lr() * o.lr() * inner.clamp_min(1e-30))), 1.0);
    for (auto& [key, v] : directions) v.mul_(nu);
  }

  const auto& params = param_groups().front().params();
  const int64_t t = steps_ + 1;
  for (size_t j = 0; j < params.size(); ++j) {
    torch::Tensor p = params[j];
    if (!p.grad().defined()) continue;
    const auto found = directions.find(p.unsafeGetTensorImpl());
    const at::Tensor g = found != directions.end() ? found->second.to(p.scalar_type()) : p.grad().detach();
    std::vector<torch::Tensor>& b = buffers_[j];
    if (o.rule() == "sgdm") {
      const at::Tensor d = o.weight_decay() != 0 ? g + o.weight_decay() * p.detach() : g;
      if (b.empty()) {
        b.push_back(d.clone());
      } else {
        b[0].mul_(o.momentum()).add_(d);
      }
      p.detach().add_(b[0], -o.lr());
    } else {
      if (b.empty()) b = {at::zeros_like(p), at::zeros_like(p)};
      const auto [beta1, beta2] = o.betas();
      p.detach().mul_(1.0 - o.lr() * o.weight_decay());
      b[0].mul_(beta1).add_(g, 1.0 - beta1);
      b[1].mul_(beta2).addcmul_(g, g, 1.0 - beta2);
      const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
      const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
      const at::Tensor denom = (b[1].sqrt() / std::sqrt(bc2)).add_(o.eps());
      p.detach().addcdiv_(b[0], denom, -o.lr() / bc1);
    }
  }
  ++steps_;
  statistics_->clear();
  statistics_->set_capturing(steps_ % o.stat_interval() == 0);
  return loss;
}

std::pair<torch::Tensor, torch::Tensor> KroneckerLayerOptimizer::roots(size_t layer) const {
  TORCH_CHECK(layer < layers_.size(), who(), ".roots: layer ", layer, " of ", layers_.size());
  return {layers_[layer].output->inverse_root(), layers_[layer].input->inverse_root()};
}

std::map<std::string, torch::Tensor> KroneckerLayerOptimizer::state_dict() const {
  precond::TensorMap out;
  out["steps"] = at::scalar_tensor(steps_, at::kLong);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string prefix = "layer" + std::to_string(i) + ".";
    layers_[i].input->save(out, prefix + "A.");
    layers_[i].output->save(out, prefix + "G.");
    out[prefix + "started"] = at::scalar_tensor(static_cast<int64_t>(layers_[i].started), at::kLong);
  }
  const char* names[] = {"buffer0", "buffer1"};
  for (size_t j = 0; j < buffers_.size(); ++j)
    for (size_t k = 0; k < buffers_[j].size(); ++k)
      out["param" + std::to_string(j) + "." + names[k]] = buffers_[j][k];
  for (auto& [key, tensor] : out) tensor = tensor.clone();  // a snapshot, not views of the live state
  return out;
}

void KroneckerLayerOptimizer::load_state_dict(const std::map<std::string, torch::Tensor>& given) {
  try {
    // Copies: the loaded state is updated in place by later steps, the caller's must not be.
    std::map<std::string, torch::Tensor> state;
    for (const auto& [key, tensor] : given) state[key] = tensor.defined() ? tensor.clone() : tensor;
    const at::Tensor steps = precond::read_entry(state, "steps", at::kLong, {});
    const int64_t loaded_steps = steps.item<int64_t>();
    TORCH_CHECK(loaded_steps >= 0, "\"steps\" must be >= 0; got ", loaded_steps);
    std::vector<LayerState> layers = make_layers();
    for (size_t i = 0; i < layers.size(); ++i) {
      const std::string prefix = "layer" + std::to_string(i) + ".";
      layers[i].input->load(state, prefix + "A.");
      layers[i].output->load(state, prefix + "G.");
      const int64_t started = precond::read_entry(state, prefix + "started", at::kLong, {}).item<int64_t>();
      TORCH_CHECK(started == 0 || started == 1, "\"", prefix, "started\" must be 0 or 1; got ", started);
      layers[i].started = started == 1;
    }
    const auto& params = param_groups().front().params();
    const size_t per_param = options().rule() == "sgdm" ? 1 : 2;
    std::vector<std::vector<torch::Tensor>> buffers(params.size());
    for (size_t j = 0; j < params.size(); ++j) {
      for (size_t k = 0; k < per_param; ++k) {
        const std::string key = "param" + std::to_string(j) + ".buffer" + std::to_string(k);
        const auto it = state.find(key);
        if (it == state.end()) break;
        buffers[j].push_back(support::checked_like(it->second, params[j], key.c_str(), "the checkpoint", k == 1));
      }
      TORCH_CHECK(buffers[j].empty() || buffers[j].size() == per_param, "parameter ", j, " has ", buffers[j].size(),
                  " of its ", per_param, " buffers");
    }
    for (const auto& [key, tensor] : state)
      TORCH_CHECK(key == "steps" || key.rfind("layer", 0) == 0 || key.rfind("param", 0) == 0, "unknown entry \"", key,
                  "\"");
    // Commit: nothing above changed the optimizer.
    layers_ = std::move(layers);
    buffers_ = std::move(buffers);
    steps_ = loaded_steps;
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, who(), ": cannot load the state: ", c10_error ? c10_error->what_without_backtrace() : e.what(),
                "; nothing was loaded");
  }
  statistics_->clear();
  statistics_->set_capturing(steps_ % options().stat_interval() == 0);
}

void KroneckerLayerOptimizer::save(torch::serialize::OutputArchive& archive) const {
  for (const auto& [key, tensor] : state_dict()) archive.write("lowbit_kfac." + key, tensor);
}

void KroneckerLayerOptimizer::load(torch::serialize::InputArchive& archive) {
  std::map<std::string, torch::Tensor> state;
  const std::string prefix = "lowbit_kfac.";
  for (const std::string& key : archive.keys()) {
    if (key.rfind(prefix, 0) != 0) continue;
    torch::Tensor t;
    archive.read(key, t);
    state[key.substr(prefix.size())] = t;
  }
  load_state_dict(state);
}

StateBytes KroneckerLayerOptimizer::state_bytes() const {
  StateBytes bytes;
  for (const LayerState& s : layers_) bytes.preconditioner += s.input->state_bytes() + s.output->state_bytes();
  for (const auto& b : buffers_)
    for (const auto& t : b) bytes.first_order += support::bytes_of(t);
  return bytes;
}

}  // namespace lowbit
