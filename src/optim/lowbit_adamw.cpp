#include <lowbit/adamw.h>

#include <lowbit/quant_options.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "optim/adamw_rule.h"
#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"

namespace lowbit {
namespace {

constexpr const char* kWho = "lowbit::AdamW";

adamw::MomentLayout layout_of(const AdamWOptions& o, const torch::Tensor& p) {
  return adamw::layout_for(p.numel(), o.bits(), o.mapping(), o.second_moment_mapping(), o.block_size(),
                           o.min_quant_numel());
}

using adamw::moments_of;
using adamw::store_moments;

adamw::Encoding encoding_of(const AdamWOptions& o, int64_t position) {
  adamw::Encoding encoding;
  encoding.stochastic = o.rounding() == "stochastic";
  encoding.seed = o.seed();
  encoding.param_index = position;
  return encoding;
}

std::string map_name(const adamw::MomentLayout& l, bool second) {
  if (!l.quantized()) return "";
  return to_string(second ? l.second_moment_mapping : l.mapping);
}

std::vector<int64_t> saved_shape(const AdamWParamState& s) {
  const at::Tensor& t = s.shape();
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != at::kLong) return {};
  const at::Tensor cpu = t.cpu().contiguous();
  return std::vector<int64_t>(cpu.data_ptr<int64_t>(), cpu.data_ptr<int64_t>() + cpu.numel());
}

// The state against the layout the options give: tensors, maps (which the shapes do not
// show) and, for flattened moments, the parameter's shape.
void check_state(const AdamWParamState& s, const adamw::MomentLayout& l, const torch::Tensor& p,
                 const std::string& what) {
  TORCH_CHECK(s.step() >= 0, what, ": step must be >= 0; got ", s.step());
  adamw::check_moments(moments_of(s), l, p, what);
  TORCH_CHECK(s.mapping() == map_name(l, false) && s.second_moment_mapping() == map_name(l, true), what,
              ": the AdamW moments were stored with mappings (\"", s.mapping(), "\", \"", s.second_moment_mapping(),
              "\") but the options give (\"", map_name(l, false), "\", \"", map_name(l, true),
              "\"); bits, mappings, block_size and min_quant_numel cannot change after the first step");
  if (l.quantized())
    TORCH_CHECK(saved_shape(s) == p.sizes().vec(), what, ": the AdamW moments were made for a parameter of shape ",
                at::IntArrayRef(saved_shape(s)), " but the parameter has shape ", p.sizes());
}

}  // namespace

AdamWOptions::AdamWOptions(double lr) : lr_(lr) {}

void AdamWOptions::validate() const {
  const std::string p = "AdamWOptions.";
  support::check_adam_options(p, lr(), betas(), eps(), weight_decay());
  TORCH_CHECK(bits() == 32 || bits() == 8 || bits() == 4, p, "bits must be 32, 8 or 4; got ", bits());
  support::check_one_of(p, "mapping", mapping(), {"dynamic", "linear2", "kashin"});
  // v >= 0 is divided into: a Kashin-decoded v can come out negative or 0 (sqrt(v) NaN, or
  // Li et al.'s zero-point explosion), which the positive tables exclude by construction.
  TORCH_CHECK(second_moment_mapping() != "kashin", p,
              "second_moment_mapping cannot be \"kashin\" (Kashin codes the first moment only: a decoded second "
              "moment could be negative or 0); use \"auto\", \"linear\", \"dynamic\" or \"linear2\"");
  support::check_one_of(p, "second_moment_mapping", second_moment_mapping(), {"auto", "linear", "dynamic", "linear2"});
  if (block_size() != 0) check_block_size(block_size(), (p + "block_size (0: 256 at 8 bits, 128 at 4)").c_str());
  TORCH_CHECK(min_quant_numel() >= 0, p, "min_quant_numel must be >= 0; got ", min_quant_numel());
  support::check_one_of(p, "rounding", rounding(), {"nearest", "stochastic"});
  TORCH_CHECK(seed() >= 0, p, "seed must be >= 0; got ", seed());
  check_mapping_options(parse_mapping(mapping()), bits(), parse_rounding(rounding()), false, p);
}

void AdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(second_moment_mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(block_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_quant_numel);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
}

void AdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(betas_t, betas);
  LOWBIT_DESERIALIZE_ARG(double, eps);
  LOWBIT_DESERIALIZE_ARG(double, weight_decay);
  LOWBIT_DESERIALIZE_ARG(int64_t, bits);
  LOWBIT_DESERIALIZE_ARG(std::string, mapping);
  LOWBIT_DESERIALIZE_ARG(std::string, second_moment_mapping);
  LOWBIT_DESERIALIZE_ARG(int64_t, block_size);
  LOWBIT_DESERIALIZE_ARG(int64_t, min_quant_numel);
  LOWBIT_DESERIALIZE_ARG(std::string, rounding);
  LOWBIT_DESERIALIZE_ARG(int64_t, seed);
  // Absent from checkpoints made before the option existed: those used the default.
  skip_nonfinite_ = checkpoint::read_field_or<bool>(archive, "skip_nonfinite", false);
}

bool operator==(const AdamWOptions& a, const AdamWOptions& b) {
  return a.lr() == b.lr() && a.betas() == b.betas() && a.eps() == b.eps() && a.weight_decay() == b.weight_decay() &&
         a.bits() == b.bits() && a.mapping() == b.mapping() && a.second_moment_mapping() == b.second_moment_mapping() &&
         a.block_size() == b.block_size() && a.min_quant_numel() == b.min_quant_numel() &&
         a.rounding() == b.rounding() && a.seed() == b.seed() && a.skip_nonfinite() == b.skip_nonfinite();
}

double AdamWOptions::get_lr() const { return lr(); }
void AdamWOptions::set_lr(const double lr) { this->lr(lr); }

void AdamWParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(second_moment_mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(shape);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_codes);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_scales);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq_codes);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq_scales);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_centroids);
}

void AdamWParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(std::string, mapping);
  LOWBIT_DESERIALIZE_ARG(std::string, second_moment_mapping);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, shape);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_codes);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_scales);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq_codes);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq_scales);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_centroids);  // absent unless mapping "kashin" (and before it existed)
}

AdamW::AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamWOptions defaults)
    : Optimizer(param_groups, std::make_unique<AdamWOptions>(defaults)) {
  support::keep_group_options<AdamWOptions>(*this, param_groups, kWho);
  support::validate_groups<AdamWOptions>(*this);
}

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions defaults)
    : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void AdamW::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  support::add_validated_group<AdamWOptions>(*this, param_group, kWho, "lowbit::AdamWOptions");
}

torch::Tensor AdamW::step(LossClosure closure) {
  support::validate_groups<AdamWOptions>(*this);
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  // Layout changes are found before any parameter moves.
  for (size_t g = 0; g < param_groups().size(); ++g) {
    const auto& group = param_groups()[g];
    const auto& o = static_cast<const AdamWOptions&>(group.options());
    for (size_t i = 0; i < group.params().size(); ++i) {
      const torch::Tensor& p = group.params()[i];
      const auto found = state().find(p.unsafeGetTensorImpl());
      if (p.grad().defined() && found != state().end())
        check_state(static_cast<const AdamWParamState&>(*found->second), layout_of(o, p), p,
                    std::string(kWho) + ": " + support::describe("parameter", g, i));
    }
  }
  torch::NoGradGuard no_grad;
  // The overflow rule (optim/gradient_health.h): gradients first, then a trial on copies of
  // the parameters whose update no bound guarantees (fp16, extreme options). Nothing is
  // written before every check passed.
  const auto skips = support::skip_option<AdamWOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "adamw"; }, skips)) {
    ++skipped_steps_;
    return loss;
  }
  for (const support::SteppedParam& sp : support::stepped_params(*this)) {
    const auto& o = static_cast<const AdamWOptions&>(param_groups()[sp.group].options());
    const auto [beta1, beta2] = o.betas();
    const bool needed = health::reduced_range(sp.param.scalar_type()) ||
                        !adamw::update_bounded(o.lr(), beta1, o.eps(), o.weight_decay());
    if (!needed) continue;
    const adamw::MomentLayout layout = layout_of(o, sp.param);
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    const bool fresh = found == state().end();
    const adamw::Moments moments =
        fresh ? adamw::make_moments(layout, sp.param) : moments_of(static_cast<const AdamWParamState&>(*found->second));
    const int64_t step = fresh ? 1 : static_cast<const AdamWParamState&>(*found->second).step() + 1;
    const adamw::Encoding encoding = encoding_of(o, support::position(*this, sp));
    const torch::Tensor grad = sp.param.grad().detach();
    const auto update = [&](std::vector<torch::Tensor>& c) {
      adamw::Moments m{c[1], c[2], c[3], c[4], c[5], c[6], c[7]};
      adamw::update(c[0], grad, m, layout, step, o.lr(), beta1, beta2, o.eps(), o.weight_decay(), encoding);
    };
    if (!support::accept_trial(sp,
                               {sp.param, moments.exp_avg, moments.exp_avg_sq, moments.exp_avg_codes,
                                moments.exp_avg_scales, moments.exp_avg_sq_codes, moments.exp_avg_sq_scales,
                                moments.exp_avg_centroids},
                               {"values", "exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_scales",
                                "exp_avg_sq_codes", "exp_avg_sq_scales", "exp_avg_centroids"},
                               update, kWho, skips(sp.group))) {
      ++skipped_steps_;
      return loss;
    }
  }
  int64_t index = -1;  // the parameter's position over all groups (stochastic rounding's stream)
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const AdamWOptions&>(group.options());
    for (auto& p : group.params()) {
      ++index;
      if (!p.grad().defined()) continue;
      const adamw::MomentLayout layout = layout_of(o, p);
      auto& slot = state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto s = std::make_unique<AdamWParamState>();
        store_moments(*s, adamw::make_moments(layout, p));
        s->mapping(map_name(layout, false));
        s->second_moment_mapping(map_name(layout, true));
        if (layout.quantized()) s->shape(torch::tensor(p.sizes(), at::kLong));
        slot = std::move(s);
      }
      auto& s = static_cast<AdamWParamState&>(*slot);
      s.step(s.step() + 1);
      adamw::Moments moments = moments_of(s);
      torch::Tensor param = p;
      adamw::update(param, p.grad().detach(), moments, layout, s.step(), o.lr(), std::get<0>(o.betas()),
                    std::get<1>(o.betas()), o.eps(), o.weight_decay(), encoding_of(o, index));
    }
  }
  return loss;
}

void AdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamWParamState, AdamWOptions>(archive, *this);
}

void AdamW::load(torch::serialize::InputArchive& archive) {
  support::load_checked<AdamWParamState, AdamWOptions>(
      *this, archive, kWho, [](const torch::Tensor& p, AdamWParamState& s, const AdamWOptions& o, const std::string& what) {
        const adamw::MomentLayout layout = layout_of(o, p);
        adamw::Moments m = moments_of(s);
        for (at::Tensor* t : {&m.exp_avg, &m.exp_avg_sq, &m.exp_avg_codes, &m.exp_avg_scales, &m.exp_avg_sq_codes,
                              &m.exp_avg_sq_scales, &m.exp_avg_centroids})
          if (t->defined()) *t = t->to(p.device());
        store_moments(s, m);
        checkpoint::check_count(s.step(), what, "step");
        check_state(s, layout, p, what);
        // (Quantized moments: check_moments has checked their block scales.)
        if (!layout.quantized()) {
          support::check_finite_state(s.exp_avg(), "exp_avg", what);
          support::check_finite_state(s.exp_avg_sq(), "exp_avg_sq", what, /*non_negative=*/true);
        }
      });
}

StateBytes AdamW::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state())
    bytes.first_order += adamw::moments_bytes(moments_of(static_cast<const AdamWParamState&>(*base)));
  return bytes;
}

}  // namespace lowbit
