#include <lowbit/mfac.h>

#include <lowbit/quant_options.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "optim/gradient_health.h"
#include "optim/second_order/gradient_window.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/second_order/update_rules.h"

namespace lowbit {
namespace {

constexpr const char* kWho = "lowbit::MFAC";

mfac::WindowLayout layout_of(const MFACOptions& o, const torch::Tensor& p) {
  mfac::WindowLayout layout;
  layout.size = o.window();
  layout.dim = p.numel();
  layout.bits = static_cast<int>(o.bits());
  layout.mapping = parse_mapping(o.mapping());
  layout.block_size = o.quant_block_size();
  return layout;
}

mfac::WindowTensors window_of(const MFACParamState& s) {
  mfac::WindowTensors w;
  w.rows = s.rows();
  w.codes = s.codes();
  w.scales = s.scales();
  w.centroids = s.centroids();
  w.gram = s.gram();
  w.count = s.count();
  return w;
}

void store_window(MFACParamState& s, const mfac::WindowTensors& w) {
  s.rows(w.rows);
  s.codes(w.codes);
  s.scales(w.scales);
  s.centroids(w.centroids);
  s.gram(w.gram);
  s.count(w.count);
}

// The window against the layout the options give: shapes (size, bits, block size) and the
// code map, which the shapes do not show.
void check_layout(const MFACParamState& s, const mfac::WindowLayout& layout, const MFACOptions& o,
                  const std::string& what) {
  mfac::check_window(window_of(s), layout, what);
  TORCH_CHECK(!layout.quantized() || s.mapping() == o.mapping(), what, ": the M-FAC window was stored with mapping \"",
              s.mapping(), "\" but the options say \"", o.mapping(),
              "\"; window, bits, mapping and quant_block_size cannot change after the first step");
}

// The parameter sizes a state was made for; empty if the entry is missing or malformed.
std::vector<int64_t> saved_shape(const MFACParamState& s) {
  const at::Tensor& t = s.shape();
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != at::kLong) return {};
  const at::Tensor cpu = t.cpu().contiguous();
  return std::vector<int64_t>(cpu.data_ptr<int64_t>(), cpu.data_ptr<int64_t>() + cpu.numel());
}

}  // namespace

MFACOptions::MFACOptions(double lr) : lr_(lr) {}

void MFACOptions::validate() const {
  const std::string p = "MFACOptions.";
  TORCH_CHECK(lr() >= 0, p, "lr must be >= 0; got ", lr());
  TORCH_CHECK(momentum() >= 0 && momentum() < 1, p, "momentum must be in [0, 1); got ", momentum());
  TORCH_CHECK(weight_decay() >= 0, p, "weight_decay must be >= 0; got ", weight_decay());
  TORCH_CHECK(window() >= 1, p, "window must be >= 1; got ", window());
  TORCH_CHECK(damping() > 0, p, "damping must be > 0; got ", damping());
  TORCH_CHECK(bits() == 32 || bits() == 8 || bits() == 4, p, "bits must be 32, 8 or 4; got ", bits());
  support::check_one_of(p, "mapping", mapping(), {"linear2", "dynamic", "linear", "kashin"});
  check_block_size(quant_block_size(), (p + "quant_block_size").c_str());
  check_mapping_options(parse_mapping(mapping()), bits(), Rounding::Nearest, false, p);
  support::check_finite_options(p, {{"lr", lr()}, {"weight_decay", weight_decay()}, {"damping", damping()}});
}

void MFACOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(window);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(damping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(quant_block_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
}

void MFACOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(double, momentum);
  LOWBIT_DESERIALIZE_ARG(double, weight_decay);
  LOWBIT_DESERIALIZE_ARG(int64_t, window);
  LOWBIT_DESERIALIZE_ARG(double, damping);
  LOWBIT_DESERIALIZE_ARG(int64_t, bits);
  LOWBIT_DESERIALIZE_ARG(std::string, mapping);
  LOWBIT_DESERIALIZE_ARG(int64_t, quant_block_size);
  // Absent from checkpoints made before the option existed: those used the default.
  skip_nonfinite_ = checkpoint::read_field_or<bool>(archive, "skip_nonfinite", false);
}

bool operator==(const MFACOptions& a, const MFACOptions& b) {
  return a.lr() == b.lr() && a.momentum() == b.momentum() && a.weight_decay() == b.weight_decay() &&
         a.window() == b.window() && a.damping() == b.damping() && a.bits() == b.bits() &&
         a.mapping() == b.mapping() && a.quant_block_size() == b.quant_block_size() &&
         a.skip_nonfinite() == b.skip_nonfinite();
}

double MFACOptions::get_lr() const { return lr(); }
void MFACOptions::set_lr(const double lr) { this->lr(lr); }

void MFACParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(count);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(shape);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rows);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(codes);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(scales);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(centroids);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gram);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void MFACParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(int64_t, count);
  LOWBIT_DESERIALIZE_ARG(std::string, mapping);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, shape);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, rows);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, codes);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, scales);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, centroids);  // absent unless mapping "kashin" (and before it existed)
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, gram);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, momentum_buffer);
}

MFAC::MFAC(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MFACOptions defaults)
    : Optimizer(param_groups, std::make_unique<MFACOptions>(defaults)) {
  support::keep_group_options<MFACOptions>(*this, param_groups, kWho);
  support::validate_groups<MFACOptions>(*this);
}

MFAC::MFAC(std::vector<torch::Tensor> params, MFACOptions defaults)
    : MFAC({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void MFAC::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  support::add_validated_group<MFACOptions>(*this, param_group, kWho, "lowbit::MFACOptions");
}

torch::Tensor MFAC::step(LossClosure closure) {
  support::validate_groups<MFACOptions>(*this);
  const torch::Tensor loss = support::evaluate(closure);
  support::check_gradients(*this, kWho);
  const std::vector<support::SteppedParam> stepped = support::stepped_params(*this);
  // The options may have changed since a window was made: checked for every parameter
  // before any is stepped.
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const MFACOptions&>(param_groups()[sp.group].options());
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    if (found != state().end())
      check_layout(static_cast<const MFACParamState&>(*found->second), layout_of(o, sp.param), o,
                   std::string(kWho) + ": " + support::describe("parameter", sp.group, sp.index));
  }
  torch::NoGradGuard no_grad;
  // The overflow rule (optim/gradient_health.h): gradients, then a trial of the parameters
  // whose update no bound guarantees (fp16, a damping or lr that bound nothing). Nothing is
  // written before every check passed.
  const auto skips = support::skip_option<MFACOptions>(*this);
  if (!support::accept_gradients(*this, kWho, [](const auto&) { return "mfac"; }, skips)) {
    ++skipped_steps_;
    return loss;
  }
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const MFACOptions&>(param_groups()[sp.group].options());
    const bool needed = health::reduced_range(sp.param.scalar_type()) ||
                        !rules::mfac_update_bounded(o.lr(), o.momentum(), o.weight_decay(), o.damping());
    if (!needed) continue;
    const mfac::WindowLayout layout = layout_of(o, sp.param);
    const auto found = state().find(sp.param.unsafeGetTensorImpl());
    const bool fresh = found == state().end();
    const auto* s = fresh ? nullptr : static_cast<const MFACParamState*>(found->second.get());
    const mfac::WindowTensors window = fresh ? mfac::make_window(layout, sp.param.options()) : window_of(*s);
    const torch::Tensor grad = sp.param.grad().detach();
    const auto update = [&](std::vector<torch::Tensor>& c) {
      mfac::WindowTensors w{c[2], c[3], c[4], c[5], c[6], window.count};
      rules::mfac_update(c[0], grad, w, layout, c[1], o.lr(), o.momentum(), o.weight_decay(), o.damping());
    };
    if (!support::accept_trial(
            sp,
            {sp.param, fresh ? torch::Tensor() : s->momentum_buffer(), window.rows, window.codes, window.scales,
             window.centroids, window.gram},
            {"values", "momentum_buffer", "window rows", "window codes", "window scales", "window centroids",
             "window Gram matrix"},
            update,
            kWho, skips(sp.group))) {
      ++skipped_steps_;
      return loss;
    }
  }
  for (const support::SteppedParam& sp : stepped) {
    const auto& o = static_cast<const MFACOptions&>(param_groups()[sp.group].options());
    torch::Tensor p = sp.param;
    const mfac::WindowLayout layout = layout_of(o, p);
    auto& slot = state()[p.unsafeGetTensorImpl()];
    if (!slot) {
      auto s = std::make_unique<MFACParamState>();
      store_window(*s, mfac::make_window(layout, p.options()));
      s->mapping(o.mapping());
      s->shape(torch::tensor(p.sizes(), at::kLong));
      slot = std::move(s);
    }
    auto& s = static_cast<MFACParamState&>(*slot);
    mfac::WindowTensors window = window_of(s);
    torch::Tensor momentum_buffer = s.momentum_buffer();
    rules::mfac_update(p, p.grad().detach(), window, layout, momentum_buffer, o.lr(), o.momentum(), o.weight_decay(),
                       o.damping());
    store_window(s, window);
    s.momentum_buffer(momentum_buffer);
    s.step(s.step() + 1);
  }
  return loss;
}

void MFAC::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<MFACParamState, MFACOptions>(archive, *this);
}

void MFAC::load(torch::serialize::InputArchive& archive) {
  support::load_checked<MFACParamState, MFACOptions>(
      *this, archive, kWho, [](const torch::Tensor& p, MFACParamState& s, const MFACOptions& o, const std::string& what) {
        checkpoint::check_count(s.step(), what, "step");
        checkpoint::check_count(s.count(), what, "count");
        // Same element count is not enough: the window's rows are flattened gradients.
        TORCH_CHECK(saved_shape(s) == p.sizes().vec(), what, ": the M-FAC window was made for a parameter of shape ",
                    at::IntArrayRef(saved_shape(s)), " but the parameter has shape ", p.sizes());
        check_layout(s, layout_of(o, p), o, what);
        mfac::WindowTensors w = window_of(s);
        for (at::Tensor* t : {&w.rows, &w.codes, &w.scales, &w.centroids, &w.gram})
          if (t->defined()) *t = t->to(p.device());
        store_window(s, w);
        mfac::check_window_values(w, layout_of(o, p), what);
        if (s.momentum_buffer().defined())
          s.momentum_buffer(support::checked_like(s.momentum_buffer(), p, "momentum_buffer", what));
      });
}

StateBytes MFAC::state_bytes() const {
  StateBytes bytes;
  for (const auto& [key, base] : state()) {
    const auto& s = static_cast<const MFACParamState&>(*base);
    bytes.preconditioner += mfac::window_bytes(window_of(s));
    bytes.first_order += support::bytes_of(s.momentum_buffer());
  }
  return bytes;
}

}  // namespace lowbit
