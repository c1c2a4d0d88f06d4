#include "precond/kronecker_factor.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

#include "precond/factor_refresh.h"

namespace lowbit::precond {

KroneckerFactor::KroneckerFactor(int64_t order, const at::TensorOptions& device, const FactorConfig& config)
    : order_(order), config_(config), device_(device.device()),
      failures_(at::zeros({}, device.dtype(at::kLong))) {}

void KroneckerFactor::update_statistic(const at::Tensor& side) { refresh_alone({RefreshItem{this, side, false}}); }

void KroneckerFactor::update_inverse_root() { refresh_alone({RefreshItem{this, at::Tensor(), true}}); }

void KroneckerFactor::set_damping(double damping) {
  TORCH_CHECK(std::isfinite(damping) && damping >= 0, "KroneckerFactor::set_damping: the damping must be finite and >= 0; got ",
              damping);
  config_.damping = damping;
}

int64_t KroneckerFactor::failures() const { return failures_.item<int64_t>(); }

void KroneckerFactor::count_failure(const at::Tensor& failed) { failures_.add_(failed); }

std::string to_string(FactorKind kind) {
  switch (kind) {
    case FactorKind::Dense: return "dense";
    case FactorKind::EigenQuantized: return "eigen-quantized";
    case FactorKind::NaiveQuantized: return "naive-quantized";
    case FactorKind::CholeskyQuantized: return "cholesky-quantized";
  }
  return "unknown";
}

at::Tensor read_entry(const TensorMap& in, const std::string& key, at::ScalarType dtype,
                      at::IntArrayRef shape) {
  const auto it = in.find(key);
  TORCH_CHECK(it != in.end(), "checkpoint has no entry \"", key, "\"");
  const at::Tensor& t = it->second;
  TORCH_CHECK(t.defined() && t.scalar_type() == dtype && t.sizes() == shape, "checkpoint entry \"",
              key, "\" must be ", c10::toString(dtype), " of shape ", shape, "; got ",
              t.defined() ? c10::toString(t.scalar_type()) : "undefined", " of shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  return t;
}

void save_quantized(TensorMap& out, const std::string& prefix, const QuantizedMatrix& q) {
  for (const auto& [name, tensor] : q.state()) out[prefix + name] = tensor;
}

QuantizedMatrix load_quantized(const TensorMap& in, const std::string& prefix, at::IntArrayRef shape,
                               const QuantOptions& expected) {
  std::map<std::string, at::Tensor> state;
  for (auto it = in.lower_bound(prefix); it != in.end() && it->first.rfind(prefix, 0) == 0; ++it)
    state[it->first.substr(prefix.size())] = it->second;
  TORCH_CHECK(!state.empty(), "checkpoint has no entries under \"", prefix, "\"");
  QuantizedMatrix q;
  try {
    q = QuantizedMatrix::from_state(state);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "checkpoint entries under \"", prefix, "\": ", e.what_without_backtrace());
  }
  const QuantOptions& got = q.options();
  TORCH_CHECK(q.rows() == shape[0] && q.cols() == shape[1], "checkpoint entries under \"", prefix,
              "\" hold a ", q.rows(), " x ", q.cols(), " matrix; this parameter needs ", shape[0], " x ", shape[1]);
  TORCH_CHECK(got.bits == expected.bits && got.mapping == expected.mapping &&
                  got.block_size == expected.block_size && got.keep_diagonal == expected.keep_diagonal &&
                  got.double_quant_scales == expected.double_quant_scales,
              "checkpoint entries under \"", prefix, "\" were saved with bits=", got.bits, " mapping=",
              to_string(got.mapping), " block_size=", got.block_size, "; the optimizer uses bits=",
              expected.bits, " mapping=", to_string(expected.mapping), " block_size=", expected.block_size);
  return q;
}

}  // namespace lowbit::precond

#include "precond/factor_kinds.h"

namespace lowbit::precond {

std::unique_ptr<KroneckerFactor> make_factor(FactorKind kind, int64_t order, const at::TensorOptions& device,
                                             const FactorConfig& config) {
  switch (kind) {
    case FactorKind::Dense: return std::make_unique<DenseFactor>(order, device, config);
    case FactorKind::EigenQuantized: return std::make_unique<EigenQuantizedFactor>(order, device, config);
    case FactorKind::NaiveQuantized: return std::make_unique<NaiveQuantizedFactor>(order, device, config);
    case FactorKind::CholeskyQuantized: return std::make_unique<CholeskyQuantizedFactor>(order, device, config);
  }
  TORCH_CHECK(false, "unknown factor kind");
}

}  // namespace lowbit::precond
