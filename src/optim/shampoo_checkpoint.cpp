// Saving and loading the Shampoo optimizer: plain tensors and scalars only, in LibTorch's
// optimizer archive layout; loading is validated in full before anything is replaced.
#include <lowbit/shampoo.h>

#include <torch/serialize/archive.h>

#include <algorithm>

#include "optim/checkpoint_reader.h"
#include "optim/shampoo_engine.h"
#include "optim/shampoo_internal.h"

namespace lowbit {
namespace {

// Archive attribute names may not contain '.', which the preconditioner's names use.
constexpr const char* kPreconditionerPrefix = "preconditioner/";

std::string to_archive_key(std::string name) {
  std::replace(name.begin(), name.end(), '.', '/');
  return kPreconditionerPrefix + name;
}

std::string from_archive_key(const std::string& key) {
  std::string name = key.substr(std::string(kPreconditionerPrefix).size());
  std::replace(name.begin(), name.end(), '/', '.');
  return name;
}

// A first-order buffer from a checkpoint, on p's device and in p's dtype (as torch.optim
// does when it loads a state dict).
torch::Tensor checked_buffer(const torch::Tensor& buffer, const torch::Tensor& p, const char* name,
                             const std::string& who, const std::string& what) {
  if (!buffer.defined()) return buffer;
  TORCH_CHECK(buffer.sizes() == p.sizes(), who, "checkpoint ", name, " of ", what, " has shape ", buffer.sizes(),
              " but the parameter has shape ", p.sizes());
  TORCH_CHECK(at::isFloatingType(buffer.scalar_type()), who, "checkpoint ", name, " of ", what,
              " must be a floating tensor; got ", buffer.scalar_type());
  const torch::Tensor out = buffer.to(p.options());
  TORCH_CHECK(all_finite(out), who, "checkpoint ", name, " of ", what, " holds NaN or Inf values; the checkpoint is "
              "corrupt");
  return out;
}

}  // namespace

void install_checkpoint_state(ShampooParamState& s, const torch::Tensor& p, const ShampooOptions& options,
                              const Shampoo::EighSolver& eigh, const std::string& who, const std::string& what) {
  TORCH_CHECK(s.step() >= 0 && s.root_updates() >= 0 && s.root_updates() <= s.step(), who, "checkpoint of ",
              what, " has step ", s.step(), " and root_updates ", s.root_updates(),
              "; expected 0 <= root_updates <= step");
  checkpoint::check_count(s.step(), who + "checkpoint of " + what, "step");
  TORCH_CHECK(s.soap_v_start() >= 0 && s.soap_v_start() <= s.step(), who, "checkpoint of ", what,
              " has soap_v_start ", s.soap_v_start(), "; expected 0 <= soap_v_start <= step ", s.step());
  // No state holds NaN or Inf after a step (non-finite gradients are refused or skipped):
  // a checkpoint that does is corrupt and would turn the parameters into NaN.
  auto require_finite = [&](const std::string& name, const torch::Tensor& t) {
    if (!t.defined() || t.numel() == 0 || !at::isFloatingType(t.scalar_type())) return;
    TORCH_CHECK(t.isfinite().all().item<bool>(), who, "checkpoint ", name, " of ", what,
                " holds NaN or Inf; nothing was loaded");
  };
  for (const auto& [name, t] : std::initializer_list<std::pair<const char*, const torch::Tensor*>>{
           {"momentum_buffer", &s.momentum_buffer()}, {"exp_avg", &s.exp_avg()}, {"exp_avg_sq", &s.exp_avg_sq()},
           {"exp_avg_scales", &s.exp_avg_scales()}, {"exp_avg_sq_scales", &s.exp_avg_sq_scales()}})
    require_finite(name, *t);
  for (const auto& [name, t] : s.loaded_preconditioner) require_finite("preconditioner." + name, t);
  s.momentum_buffer(checked_buffer(s.momentum_buffer(), p, "momentum_buffer", who, what));
  const adamw::MomentLayout layout = graft_layout(p, options);
  const bool any_codes = s.exp_avg_codes().defined() || s.exp_avg_scales().defined() ||
                         s.exp_avg_sq_codes().defined() || s.exp_avg_sq_scales().defined();
  if (layout.quantized() && (any_codes || s.exp_avg().defined() || s.exp_avg_sq().defined())) {
    // Low-bit moments (graft_bits): codes and scales as lowbit::AdamW keeps them.
    auto on_device = [&](const torch::Tensor& t) { return t.defined() ? t.to(p.device()) : t; };
    s.exp_avg_codes(on_device(s.exp_avg_codes())).exp_avg_scales(on_device(s.exp_avg_scales()));
    s.exp_avg_sq_codes(on_device(s.exp_avg_sq_codes())).exp_avg_sq_scales(on_device(s.exp_avg_sq_scales()));
    adamw::check_moments(adamw::moments_of(s), layout, p, who + "checkpoint of " + what);
  } else {
    TORCH_CHECK(!any_codes, who, "checkpoint of ", what, " has low-bit AdamW moments, but this optimizer keeps ",
                "them in fp32 (graft_bits=", options.graft_bits(), ", ", p.numel(), " elements)");
    s.exp_avg(checked_buffer(s.exp_avg(), p, "exp_avg", who, what));
    s.exp_avg_sq(checked_buffer(s.exp_avg_sq(), p, "exp_avg_sq", who, what));
    TORCH_CHECK(s.exp_avg().defined() == s.exp_avg_sq().defined(), who, "checkpoint of ", what,
                " has only one of exp_avg and exp_avg_sq");
    TORCH_CHECK(!s.exp_avg_sq().defined() || s.exp_avg_sq().ge(0).all().item<bool>(), who, "checkpoint exp_avg_sq of ",
                what, " holds negative values (it is a running mean of squares); the checkpoint is corrupt");
  }
  auto preconditioner = std::make_shared<precond::ParameterPreconditioner>(p.sizes(), p.options(),
                                                                           preconditioner_config(options, eigh));
  if (preconditioner->active()) {
    try {
      preconditioner->load(s.loaded_preconditioner);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, who, what, " (shape ", p.sizes(), "): ", e.what_without_backtrace(),
                  "; nothing was loaded");
    }
    s.preconditioner = std::move(preconditioner);
  } else {
    TORCH_CHECK(s.loaded_preconditioner.empty(), who, "the checkpoint has preconditioner entries for ", what,
                " (shape ", p.sizes(), "), which takes none; nothing was loaded");
    s.preconditioner = nullptr;
  }
  s.loaded_preconditioner.clear();
}

void ShampooParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(root_updates);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(soap_v_start);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_codes);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_scales);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq_codes);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq_scales);
  if (preconditioner) {
    precond::TensorMap entries;
    preconditioner->save(entries);
    for (const auto& [name, tensor] : entries) archive.write(to_archive_key(name), tensor);
  }
}

void ShampooParamState::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(int64_t, step);
  LOWBIT_DESERIALIZE_ARG(int64_t, root_updates);
  soap_v_start_ = checkpoint::read_field_or<int64_t>(archive, "soap_v_start", 0);  // absent before SOAP
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, momentum_buffer);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_codes);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_scales);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq_codes);
  LOWBIT_DESERIALIZE_ARG(torch::Tensor, exp_avg_sq_scales);
  loaded_preconditioner.clear();
  for (const std::string& key : archive.keys()) {
    if (key.rfind(kPreconditionerPrefix, 0) != 0) continue;
    c10::IValue t;
    archive.read(key, t);
    TORCH_CHECK(t.isTensor(), "the entry \"", key, "\" must be a tensor; got ", checkpoint::kind_of(t));
    loaded_preconditioner[from_archive_key(key)] = checkpoint::owned(t.toTensor());
  }
}

void Shampoo::save(torch::serialize::OutputArchive& archive) const {
  engine_->settle("lowbit::Shampoo::save");  // a checkpoint holds no step a deferred check refused
  torch::optim::serialize<ShampooParamState, ShampooOptions>(archive, *this);
}

void Shampoo::load(torch::serialize::InputArchive& archive) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (const auto& g : param_groups()) groups.emplace_back(g.params(), g.options().clone());
  Shampoo staged(groups, static_cast<const ShampooOptions&>(defaults()));
  staged.eigh_ = eigh_;
  try {
    checkpoint::read_optimizer_archive<ShampooParamState, ShampooOptions>(archive, staged);
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    TORCH_CHECK(false, "lowbit::Shampoo::load: cannot read the checkpoint: ",
                c10_error ? c10_error->what_without_backtrace() : e.what(), "; nothing was loaded");
  }

  for (size_t gi = 0; gi < staged.param_groups().size(); ++gi) {
    const auto& saved = static_cast<const ShampooOptions&>(staged.param_groups()[gi].options());
    const auto& current = static_cast<const ShampooOptions&>(param_groups()[gi].options());
    const std::vector<std::string> differ = structural_differences(saved, current);
    if (!differ.empty()) {
      std::string names;
      for (const std::string& n : differ) names += (names.empty() ? "" : ", ") + n;
      TORCH_CHECK(false, "lowbit::Shampoo::load: the checkpoint's group ", gi, " was saved with different ",
                  names, " than this optimizer uses; nothing was loaded");
    }
    try {
      saved.validate();
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "lowbit::Shampoo::load: the checkpoint's group ", gi, " has invalid options: ",
                  e.what_without_backtrace(), "; nothing was loaded");
    }
    const auto& params = staged.param_groups()[gi].params();
    for (size_t pi = 0; pi < params.size(); ++pi) {
      const torch::Tensor& p = params[pi];
      auto it = staged.state().find(p.unsafeGetTensorImpl());
      if (it == staged.state().end()) continue;
      install_checkpoint_state(static_cast<ShampooParamState&>(*it->second), p, saved, eigh_,
                               "lowbit::Shampoo::load: ",
                               "parameter " + std::to_string(pi) + " of group " + std::to_string(gi));
    }
  }
  // Everything checked: take the staged state and options (deferred steps of the state
  // replaced are moot).
  engine_->discard_deferred();
  state() = std::move(staged.state());
  for (size_t gi = 0; gi < param_groups().size(); ++gi)
    static_cast<ShampooOptions&>(param_groups()[gi].options()) =
        static_cast<const ShampooOptions&>(staged.param_groups()[gi].options());
}

}  // namespace lowbit
