#include <lowbit/shampoo.h>

#include <lowbit/quant_options.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <utility>

#include "optim/checkpoint_reader.h"
#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"
#include "optim/shampoo_internal.h"

namespace lowbit {
namespace {

void check_one_of(const std::string& prefix, const char* name, const std::string& value,
                  std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "\"" : ", \"") + std::string(a) + "\"";
  }
  TORCH_CHECK(false, prefix, name, " must be one of ", list, "; got \"", value, "\"");
}

}  // namespace

ShampooOptions::ShampooOptions(double lr) : lr_(lr) {}

void ShampooOptions::validate() const { validate_options(*this, "ShampooOptions."); }

void validate_options(const ShampooOptions& o, const std::string& prefix) {
  const std::string& p = prefix;
  TORCH_CHECK(o.lr() >= 0, p, "lr must be >= 0; got ", o.lr());
  check_one_of(p, "graft", o.graft(), {"sgdm", "adamw"});
  TORCH_CHECK(o.momentum() >= 0 && o.momentum() < 1, p, "momentum must be in [0, 1); got ", o.momentum());
  TORCH_CHECK(!o.nesterov() || o.momentum() > 0, p, "nesterov needs momentum > 0");
  const auto [beta1, beta2] = o.betas();
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, p, "betas[0] must be in [0, 1); got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, p, "betas[1] must be in [0, 1); got ", beta2);
  TORCH_CHECK(o.eps() > 0, p, "eps must be > 0; got ", o.eps());
  TORCH_CHECK(o.weight_decay() >= 0, p, "weight_decay must be >= 0; got ", o.weight_decay());
  TORCH_CHECK(o.bits() == 32 || o.bits() == 8 || o.bits() == 4 || o.bits() == 3,
              p, "bits must be 32, 8, 4 or 3; got ", o.bits());
  check_one_of(p, "quantize", o.quantize(), {"eigenvectors", "matrix", "cholesky"});
  TORCH_CHECK(o.error_feedback_decay() >= 0 && o.error_feedback_decay() < 1, p,
              "error_feedback_decay must be in [0, 1); got ", o.error_feedback_decay());
  check_one_of(p, "mapping", o.mapping(), {"linear2", "dynamic", "linear", "kashin"});
  if (o.bits() != 32)  // 32-bit Shampoo quantizes nothing
    check_mapping_options(parse_mapping(o.mapping()), o.bits(), Rounding::Nearest, o.double_quant_scales(), p);
  check_block_size(o.quant_block_size(), (p + "quant_block_size").c_str());
  TORCH_CHECK(o.min_quant_numel() >= 0, p, "min_quant_numel must be >= 0; got ", o.min_quant_numel());
  TORCH_CHECK(o.max_preconditioner_dim() >= 1, p, "max_preconditioner_dim must be >= 1; got ",
              o.max_preconditioner_dim());
  TORCH_CHECK(o.stat_decay() >= 0 && o.stat_decay() < 1, p, "stat_decay must be in [0, 1); got ",
              o.stat_decay());
  TORCH_CHECK(o.epsilon() > 0, p, "epsilon must be > 0; got ", o.epsilon());
  TORCH_CHECK(o.stat_interval() >= 1, p, "stat_interval must be >= 1; got ", o.stat_interval());
  TORCH_CHECK(o.root_interval() >= 1, p, "root_interval must be >= 1; got ", o.root_interval());
  TORCH_CHECK(o.start_preconditioning_step() >= 0, p, "start_preconditioning_step must be >= 0; got ",
              o.start_preconditioning_step());
  const auto [t1, t2] = o.rectify_steps();
  TORCH_CHECK(t1 >= 0 && t2 >= 0 && t1 <= 100 && t2 <= 100,
              p, "rectify_steps must be two counts in [0, 100]; got (", t1, ", ", t2, ")");
  check_one_of(p, "root_method", o.root_method(), {"eigen", "newton"});
  check_one_of(p, "eigen_update", o.eigen_update(), {"qr", "cholesky_qr", "eigh"});
  check_one_of(p, "root_storage", o.root_storage(), {"quantized", "eigen"});
  TORCH_CHECK(o.root_storage() == "quantized" ||
                  (o.bits() != 32 && o.quantize() == "eigenvectors" && o.preconditioner() != "soap"),
              p, "root_storage \"eigen\" serves the root from quantized eigenvectors: it needs bits 8, 4 or 3 "
              "with quantize \"eigenvectors\" and preconditioner \"shampoo\" or \"caspr\"; got bits=", o.bits(),
              ", quantize \"", o.quantize(), "\", preconditioner \"", o.preconditioner(), "\"");
  check_one_of(p, "preconditioner", o.preconditioner(), {"shampoo", "caspr", "soap"});
  if (o.preconditioner() == "soap") {
    TORCH_CHECK(o.graft() == "adamw", p, "preconditioner \"soap\" runs AdamW in the eigenbasis and needs "
                "graft \"adamw\"; got \"", o.graft(), "\"");
    TORCH_CHECK(o.bits() == 32 || o.quantize() == "eigenvectors", p, "preconditioner \"soap\" keeps "
                "eigenvectors: with bits=", o.bits(), " it needs quantize \"eigenvectors\"; got \"", o.quantize(), "\"");
  }
  TORCH_CHECK(o.graft_bits() == 32 || o.graft_bits() == 8 || o.graft_bits() == 4, p,
              "graft_bits must be 32, 8 or 4; got ", o.graft_bits());
  TORCH_CHECK(o.graft_bits() == 32 || o.graft() == "adamw", p, "graft_bits=", o.graft_bits(),
              " quantizes AdamW moments and needs graft \"adamw\"; got \"", o.graft(), "\"");
  // (Checkpoints carry options too: an infinite one would make every step NaN/Inf.)
  support::check_finite_options(p, {{"lr", o.lr()}, {"eps", o.eps()}, {"weight_decay", o.weight_decay()},
                                    {"epsilon", o.epsilon()}});
  // epsilon I starts every statistic and is added to it: with the statistics' entries below
  // 2^104 (optim/gradient_health.h, rule 1) a sum of both stays below 2^105, far from FLT_MAX.
  TORCH_CHECK(o.epsilon() <= health::kMaxGradientSquaredNorm, p, "epsilon must be <= 2^104 (about 2e31), so that "
              "epsilon I plus the statistics stays within float32 range; got ", o.epsilon());
  check_one_of(p, "gradient_check", o.gradient_check(), {"auto", "immediate", "deferred"});
  TORCH_CHECK(o.workspace_mb() >= 0 && o.workspace_mb() <= 1e9, p,
              "workspace_mb must be in [0, 1e9] (0: automatic); got ", o.workspace_mb());
}

// Options that decide the layout of the saved state: a checkpoint must agree on these.
std::vector<std::string> structural_differences(const ShampooOptions& a, const ShampooOptions& b) {
  std::vector<std::string> out;
  auto note = [&](bool same, const char* name) {
    if (!same) out.emplace_back(name);
  };
  note(a.graft() == b.graft(), "graft");
  note(a.bits() == b.bits(), "bits");
  note(a.quantize() == b.quantize(), "quantize");
  note(a.mapping() == b.mapping(), "mapping");
  note(a.quant_block_size() == b.quant_block_size(), "quant_block_size");
  note(a.double_quant_scales() == b.double_quant_scales(), "double_quant_scales");
  note(a.min_quant_numel() == b.min_quant_numel(), "min_quant_numel");
  note(a.max_preconditioner_dim() == b.max_preconditioner_dim(), "max_preconditioner_dim");
  // Same tensors either way, but the saved roots are L^(-1/4) (Shampoo) or L^(-1/2) (CASPR):
  // read with the other rule they would give a wrong direction until the next refresh.
  note(a.preconditioner() == b.preconditioner(), "preconditioner");
  note(a.graft_bits() == b.graft_bits(), "graft_bits");
  // "eigen" saves no root entries.
  note(a.root_storage() == b.root_storage(), "root_storage");
  // With quantize "cholesky" the error state is saved or not.
  note(a.error_feedback() == b.error_feedback() || a.quantize() != "cholesky", "error_feedback");
  return out;
}

std::vector<std::string> preconditioner_differences(const ShampooOptions& a, const ShampooOptions& b) {
  std::vector<std::string> out;
  auto note = [&](bool same, const char* name) {
    if (!same) out.emplace_back(name);
  };
  note(a.stat_decay() == b.stat_decay(), "stat_decay");
  note(a.epsilon() == b.epsilon(), "epsilon");
  note(a.root_method() == b.root_method(), "root_method");
  note(a.rectify_steps() == b.rectify_steps(), "rectify_steps");
  note(a.eigen_update() == b.eigen_update(), "eigen_update");
  note(a.error_feedback_decay() == b.error_feedback_decay(), "error_feedback_decay");
  return out;
}

precond::PreconditionerConfig preconditioner_config(const ShampooOptions& o, const Shampoo::EighSolver& eigh) {
  precond::PreconditionerConfig c;
  c.factor.stat_decay = o.stat_decay();
  c.factor.epsilon = o.epsilon();
  // Shampoo: L^(-1/4) G R^(-1/4). CASPR: L^(-1/2) and R^(-1/2) combined as a Kronecker sum.
  const bool caspr = o.preconditioner() == "caspr", soap = o.preconditioner() == "soap";
  c.factor.root_exponent = caspr ? 2 : 4;
  c.combine = caspr ? precond::Combine::Caspr : soap ? precond::Combine::Soap : precond::Combine::Shampoo;
  c.factor.eigenbasis = soap;
  c.factor.eigen_form_root = o.root_storage() == "eigen";
  c.factor.error_feedback = o.error_feedback();
  c.factor.error_feedback_decay = o.error_feedback_decay();
  c.factor.root_method = o.root_method() == "newton" ? precond::RootMethod::Newton : precond::RootMethod::Eigen;
  if (o.bits() != 32) c.factor.quant.bits = static_cast<int>(o.bits());
  c.factor.quant.mapping = parse_mapping(o.mapping());
  c.factor.quant.block_size = o.quant_block_size();
  c.factor.quant.double_quant_scales = o.double_quant_scales();
  c.factor.bjorck_stat_steps = static_cast<int>(std::get<0>(o.rectify_steps()));
  c.factor.bjorck_root_steps = static_cast<int>(std::get<1>(o.rectify_steps()));
  c.factor.eigen_update = precond::parse_eigen_update(o.eigen_update());
  if (eigh) c.factor.eigh = eigh;
  c.kind = o.bits() == 32               ? precond::FactorKind::Dense
           : o.quantize() == "matrix"   ? precond::FactorKind::NaiveQuantized
           : o.quantize() == "cholesky" ? precond::FactorKind::CholeskyQuantized
                                        : precond::FactorKind::EigenQuantized;
  c.min_quant_numel = o.min_quant_numel();
  c.max_dim = o.max_preconditioner_dim();
  return c;
}

void ShampooOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(graft);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(quantize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mapping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(quant_block_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(double_quant_scales);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_quant_numel);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_preconditioner_dim);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stat_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(epsilon);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stat_interval);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(root_interval);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(start_preconditioning_step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rectify_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(root_method);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eigen_update);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skip_nonfinite);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioner);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(error_feedback);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(error_feedback_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(graft_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(workspace_mb);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gradient_check);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(root_storage);
}

void ShampooOptions::serialize(torch::serialize::InputArchive& archive) {
  LOWBIT_DESERIALIZE_ARG(double, lr);
  LOWBIT_DESERIALIZE_ARG(std::string, graft);
  LOWBIT_DESERIALIZE_ARG(double, momentum);
  LOWBIT_DESERIALIZE_ARG(bool, nesterov);
  LOWBIT_DESERIALIZE_ARG(betas_t, betas);
  LOWBIT_DESERIALIZE_ARG(double, eps);
  LOWBIT_DESERIALIZE_ARG(double, weight_decay);
  LOWBIT_DESERIALIZE_ARG(int64_t, bits);
  LOWBIT_DESERIALIZE_ARG(std::string, quantize);
  LOWBIT_DESERIALIZE_ARG(std::string, mapping);
  LOWBIT_DESERIALIZE_ARG(int64_t, quant_block_size);
  LOWBIT_DESERIALIZE_ARG(bool, double_quant_scales);
  LOWBIT_DESERIALIZE_ARG(int64_t, min_quant_numel);
  LOWBIT_DESERIALIZE_ARG(int64_t, max_preconditioner_dim);
  LOWBIT_DESERIALIZE_ARG(double, stat_decay);
  LOWBIT_DESERIALIZE_ARG(double, epsilon);
  LOWBIT_DESERIALIZE_ARG(int64_t, stat_interval);
  LOWBIT_DESERIALIZE_ARG(int64_t, root_interval);
  LOWBIT_DESERIALIZE_ARG(int64_t, start_preconditioning_step);
  LOWBIT_DESERIALIZE_ARG(rectify_t, rectify_steps);
  LOWBIT_DESERIALIZE_ARG(std::string, root_method);
  LOWBIT_DESERIALIZE_ARG(std::string, eigen_update);
  LOWBIT_DESERIALIZE_ARG(bool, skip_nonfinite);
  // Options added later are absent from older checkpoints: those used the defaults.
  preconditioner_ = checkpoint::read_field_or<std::string>(archive, "preconditioner", "shampoo");
  error_feedback_ = checkpoint::read_field_or<bool>(archive, "error_feedback", true);
  error_feedback_decay_ = checkpoint::read_field_or<double>(archive, "error_feedback_decay", 0.0);
  graft_bits_ = checkpoint::read_field_or<int64_t>(archive, "graft_bits", 32);
  workspace_mb_ = checkpoint::read_field_or<double>(archive, "workspace_mb", 0.0);
  gradient_check_ = checkpoint::read_field_or<std::string>(archive, "gradient_check", "auto");
  root_storage_ = checkpoint::read_field_or<std::string>(archive, "root_storage", "quantized");
}

bool operator==(const ShampooOptions& a, const ShampooOptions& b) {
  return a.lr() == b.lr() && a.momentum() == b.momentum() && a.nesterov() == b.nesterov() &&
         a.betas() == b.betas() && a.eps() == b.eps() && a.weight_decay() == b.weight_decay() &&
         structural_differences(a, b).empty() && a.stat_decay() == b.stat_decay() &&
         a.epsilon() == b.epsilon() && a.stat_interval() == b.stat_interval() &&
         a.root_interval() == b.root_interval() &&
         a.start_preconditioning_step() == b.start_preconditioning_step() &&
         a.rectify_steps() == b.rectify_steps() && a.root_method() == b.root_method() && a.eigen_update() == b.eigen_update() &&
         a.skip_nonfinite() == b.skip_nonfinite() && a.error_feedback_decay() == b.error_feedback_decay() &&
         a.workspace_mb() == b.workspace_mb() &&
         a.gradient_check() == b.gradient_check();
}

double ShampooOptions::get_lr() const { return lr(); }
void ShampooOptions::set_lr(const double lr) { this->lr(lr); }

}  // namespace lowbit
