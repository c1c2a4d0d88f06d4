#include "optim/gradient_health.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <map>

namespace lowbit::health {
namespace {

std::string formatted(const char* format, double value) {
  char text[32];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

// One [n] fp64 tensor from n 0-d results, on their device (CPU when n = 0).
at::Tensor stacked(std::vector<at::Tensor> values) {
  if (values.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  return at::stack(values);
}

}  // namespace

at::Tensor squared_norms(at::TensorList tensors) {
  // Per tensor, reduced in fp64 (linalg_vector_norm casts the input to `dtype` first): the
  // gradients this check exists for overflow any fp32 accumulation of their squares, and
  // _foreach_norm's batched CUDA kernel accumulates in the input's precision. On the CPU this
  // is what _foreach_norm does anyway (one reduction per tensor).
  std::vector<at::Tensor> norms;
  norms.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.defined(), "lowbit::squared_norms: tensor ", norms.size(), " is undefined");
    norms.push_back(at::linalg_vector_norm(t.detach(), 2, c10::nullopt, false, at::kDouble));
  }
  at::Tensor out = stacked(std::move(norms));
  return out.mul_(out);
}

at::Tensor max_magnitudes(at::TensorList tensors) {
  std::vector<at::Tensor> maxima;
  maxima.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.defined(), "lowbit::max_magnitudes: tensor ", maxima.size(), " is undefined");
    // inf-norm: the largest |x|, NaN if any element is NaN; 0 for an empty tensor.
    maxima.push_back(t.numel() == 0 ? at::zeros({}, t.options().dtype(at::kDouble))
                                    : at::linalg_vector_norm(t.detach(), INFINITY, c10::nullopt, false, at::kDouble));
  }
  return stacked(std::move(maxima));
}

bool Offence::nonfinite() const { return found() && !std::isfinite(squared_norm); }

Offence first_offence(const at::Tensor& squared_norms, double limit) {
  TORCH_CHECK(squared_norms.dim() == 1, "lowbit::first_offence: expected a 1-D tensor of squared norms; got shape ",
              squared_norms.sizes());
  // The step's one read of the device: named for profilers and op counters (on a CPU the copy
  // below is no op at all, on a GPU it waits for every queued kernel).
  RECORD_FUNCTION("lowbit::read_to_host", std::vector<c10::IValue>());
  const at::Tensor host = squared_norms.to(at::kCPU, at::kDouble).contiguous();
  const double* values = host.data_ptr<double>();
  Offence o;
  for (int64_t i = 0; i < host.numel(); ++i)
    if (!std::isfinite(values[i]) || values[i] > limit) {
      o.index = i;
      o.squared_norm = values[i];
      return o;
    }
  return o;
}

const Consequence& consequence(const std::string& key) {
  static const std::map<std::string, Consequence> table = {
      {"shampoo", {"gradient", "the G G^T statistics would overflow fp32"}},
      {"shampoo.adamw", {"gradient", "the grafted AdamW second moment g*g would overflow fp32"}},
      {"shampoo.sgdm", {"gradient", "the grafted SGD momentum is no longer guaranteed finite"}},
      {"adamw", {"gradient", "the second moment v (an EMA of g*g) would overflow fp32"}},
      {"sophia", {"gradient", "the momentum m is no longer guaranteed finite"}},
      {"sophia.gnb", {"gradient", "the Gauss-Newton-Bartlett estimate B*g*g would overflow fp32"}},
      {"sophia.gnb_estimate",
       {"Gauss-Newton-Bartlett estimate B*g*g", "the Hessian EMA h is no longer guaranteed finite"}},
      {"sophia.hutchinson", {"Hutchinson Hessian estimate u*(Hu)", "the Hessian EMA h is no longer guaranteed finite"}},
      {"adahessian", {"gradient", "the update m / (sqrt(v) + eps) is no longer guaranteed finite"}},
      {"adahessian.hutchinson", {"Hutchinson Hessian estimate D", "v, the EMA of D*D, would overflow fp32"}},
      {"mfac", {"gradient", "the inverse-Fisher direction F^-1 g is no longer guaranteed finite"}},
      {"nag_gs", {"gradient", "the velocity v is no longer guaranteed finite"}},
      {"kfac", {"gradient", "the preconditioned gradient and the first-order state are no longer guaranteed finite"}},
  };
  const auto found = table.find(key);
  TORCH_CHECK(found != table.end(), "lowbit::health::consequence: unknown key \"", key, "\"");
  return found->second;
}

std::string offence_message(const std::string& what, const Consequence& c, double squared_norm) {
  if (!std::isfinite(squared_norm)) return what + " has a NaN or Inf " + c.noun;
  return what + ": its " + c.noun + "'s squared norm " + formatted("%.3g", squared_norm) + " exceeds 2^104 (" +
         formatted("%.3g", kMaxGradientSquaredNorm) + "): " + c.tail;
}

double largest_finite(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return 65504.0;
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return static_cast<double>(std::numeric_limits<float>::max());
    case at::kDouble: return std::numeric_limits<double>::max();
    default: TORCH_CHECK(false, "lowbit::largest_finite: ", dtype, " is not a floating dtype lowbit supports");
  }
}

bool reduced_range(at::ScalarType dtype) { return dtype == at::kHalf; }

Trial trial_update(const std::vector<at::Tensor>& writes,
                   const std::function<void(std::vector<at::Tensor>& copies)>& update) {
  std::vector<at::Tensor> copies;
  copies.reserve(writes.size());
  for (const at::Tensor& t : writes) copies.push_back(t.defined() ? t.detach().clone() : at::Tensor());
  update(copies);
  std::vector<at::Tensor> checked;
  std::vector<size_t> index;
  for (size_t i = 0; i < copies.size(); ++i)
    if (copies[i].defined() && at::isFloatingType(copies[i].scalar_type())) {
      checked.push_back(copies[i]);
      index.push_back(i);
    }
  // A finite fp16/bf16/fp32 tensor has a finite fp64 squared norm: only non-finite copies fail.
  const Offence o = first_offence(squared_norms(checked), std::numeric_limits<double>::infinity());
  Trial t;
  if (o.found()) {
    const size_t i = index[static_cast<size_t>(o.index)];
    t.index = static_cast<int64_t>(i);
    t.dtype = copies[i].scalar_type();
  }
  return t;
}

std::string overflow_problem(const std::string& tensor, at::ScalarType dtype) {
  return "this step would make its " + tensor + " non-finite (" + c10::toString(dtype) + ", largest finite value " +
         formatted("%.6g", largest_finite(dtype)) + ")";
}

}  // namespace lowbit::health
