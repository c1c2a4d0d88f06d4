#include "analysis/quant_error.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include <lowbit/quantized_matrix.h>

#include "linalg/matrix_functions.h"
#include "precond/cholesky_storage.h"

namespace lowbit::analysis {
namespace {

constexpr double kInverseRootPower = 4.0;
constexpr int kRectificationSteps = 4;  // the paper's t2

std::string known_names() {
  std::string joined;
  for (const std::string& name : synthetic_matrix_names()) joined += (joined.empty() ? "" : ", ") + name;
  return joined;
}

at::Tensor geometric(int64_t order, double cond) {
  if (order == 1) return at::ones({1}, at::kDouble);
  return at::pow(cond, -at::arange(order, at::kDouble) / static_cast<double>(order - 1));
}

linalg::Eigen exact_eigen(const at::Tensor& a) {
  const std::optional<linalg::Eigen> e = linalg::eigh_with_fallback(a.to(at::kDouble));
  TORCH_CHECK(e, "quant-error: the fp64 eigendecomposition failed");
  return *e;
}

// The statistic as an optimizer holds it (fp32), stored at low bits and read back in fp64.
at::Tensor round_trip(const at::Tensor& m, const QuantOptions& options) {
  return QuantizedMatrix::quantize(m.to(at::kFloat).contiguous(), options).dequantize(at::kDouble);
}

QuantErrorRow measure(const at::Tensor& f, const at::Tensor& g, QuantErrorRow row) {
  row.nre = normalized_relative_error(f, g);
  row.angle_deg = angle_error_deg(f, g);
  return row;
}

constexpr double kChainDecay = 0.95;   // the paper's beta
constexpr double kErrorDecay = 0.0;    // ShampooOptions::error_feedback_decay's default

// Cholesky-quantized Shampoo on A: the factor C of (A + epsilon lambda_max I) is stored
// (fp32 diagonal, low-bit triangle) and g = (C~ C~^T)^(-1/4), the ridge being inside the
// factor already. With updates > 1 the factor then goes through a chain of EMA updates
// S = b C~ C~^T + (1 - b)(A + ridge I), C = chol(S), stored again each time: the exact chain
// stays at A + ridge I, so what moves it is the compounded rounding.
at::Tensor cholesky_root(const at::Tensor& a, double ridge, const QuantOptions& options, int updates,
                         bool error_feedback) {
  const at::Tensor target = a + at::eye(a.size(0), a.options()) * ridge;
  precond::QuantizedCholesky stored =
      precond::store_cholesky(at::linalg_cholesky(target), options, error_feedback, kErrorDecay, nullptr);
  for (int k = 1; k < updates; ++k) {
    const at::Tensor c = precond::reconstruct_factor(stored).to(at::kDouble);
    const at::Tensor s = at::matmul(c, c.t()) * kChainDecay + target * (1 - kChainDecay);
    stored = precond::store_cholesky(at::linalg_cholesky(s), options, error_feedback, kErrorDecay, &stored);
  }
  const at::Tensor c = precond::reconstruct_factor(stored).to(at::kDouble);
  return linalg::inverse_root_from_eigen(exact_eigen(at::matmul(c, c.t())), kInverseRootPower, 0.0);
}

}  // namespace

const std::vector<std::string>& synthetic_matrix_names() {
  static const std::vector<std::string> names{"geometric-1e2", "geometric-1e4", "geometric-1e6",
                                              "fast-decay", "two-clusters"};
  return names;
}

at::Tensor synthetic_spectrum(const std::string& name, int64_t order) {
  TORCH_CHECK(order >= 1, "matrix order must be positive; got ", order);
  if (name == "geometric-1e2") return geometric(order, 1e2);
  if (name == "geometric-1e4") return geometric(order, 1e4);
  if (name == "geometric-1e6") return geometric(order, 1e6);
  if (name == "fast-decay") return at::pow(at::arange(1, order + 1, at::kDouble), -4.0);
  if (name == "two-clusters") {
    at::Tensor values = at::full({order}, 1e-3, at::kDouble);
    values.narrow(0, 0, order / 2).fill_(1.0);
    return values;
  }
  TORCH_CHECK(false, "unknown matrix \"", name, "\"; known: ", known_names());
}

at::Tensor synthetic_spd_matrix(const std::string& name, int64_t order, uint64_t seed) {
  const at::Tensor spectrum = synthetic_spectrum(name, order);
  // A private generator: the global torch seed stays untouched and every matrix of the
  // same seed shares Q, so spectra are compared on the same eigenbasis.
  const at::Tensor gaussian = at::randn({order, order}, at::detail::createCPUGenerator(seed), at::kDouble);
  const at::Tensor q = std::get<0>(at::linalg_qr(gaussian));
  const at::Tensor a = at::matmul(q * spectrum.unsqueeze(0), q.t());
  return (a + a.t()) * 0.5;  // exactly symmetric, as a statistic G G^T would be
}

at::Tensor reference_inverse_fourth_root(const at::Tensor& a, double epsilon) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1), "expected a square matrix; got ", a.sizes());
  return linalg::inverse_root_from_eigen(exact_eigen(a), kInverseRootPower, epsilon);
}

double normalized_relative_error(const at::Tensor& f, const at::Tensor& g) {
  TORCH_CHECK(f.sizes() == g.sizes(), "shapes differ: ", f.sizes(), " vs ", g.sizes());
  const at::Tensor f64 = f.to(at::kDouble);
  const double f_norm = f64.norm().item<double>();
  TORCH_CHECK(f_norm > 0, "normalized relative error of a zero reference");
  return (f64 - g.to(at::kDouble)).norm().item<double>() / f_norm;
}

double angle_error_deg(const at::Tensor& f, const at::Tensor& g) {
  TORCH_CHECK(f.sizes() == g.sizes(), "shapes differ: ", f.sizes(), " vs ", g.sizes());
  const at::Tensor f64 = f.to(at::kDouble);
  const at::Tensor g64 = g.to(at::kDouble);
  const double norms = f64.norm().item<double>() * g64.norm().item<double>();
  TORCH_CHECK(norms > 0, "angle with a zero matrix is undefined");
  // Round-off can push the cosine of (nearly) parallel matrices just past +-1.
  const double cosine = std::clamp((f64 * g64).sum().item<double>() / norms, -1.0, 1.0);
  return std::acos(cosine) * 180.0 / M_PI;
}

std::vector<QuantErrorRow> quant_error_rows(const std::string& label, const at::Tensor& a,
                                            int64_t block_size, double epsilon) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1), "expected a square matrix; got ", a.sizes());
  TORCH_CHECK(epsilon > 0, "epsilon must be positive; got ", epsilon);
  check_block_size(block_size, "block size");
  const linalg::Eigen exact = exact_eigen(a);
  const at::Tensor f = linalg::inverse_root_from_eigen(exact, kInverseRootPower, epsilon);
  // 4-bit Shampoo keeps the eigenvalues in fp32.
  const at::Tensor values_fp32 = exact.values.to(at::kFloat).to(at::kDouble);
  // Rows of U^T are eigenvectors, so every quantization block lies inside one of them.
  const at::Tensor eigenvectors_as_rows = exact.vectors.t();

  std::vector<QuantErrorRow> rows;
  for (const Mapping mapping : {Mapping::Linear2, Mapping::DynamicTree, Mapping::Kashin}) {
    const bool kashin = mapping == Mapping::Kashin;
    for (const int bits : {8, 4, 3}) {
      if (kashin && bits == 8) continue;  // Kashin codes are 3 or 4 bits (docs/codec.md)
      QuantOptions options;
      options.bits = bits;
      options.mapping = mapping;
      options.block_size = block_size;
      const QuantErrorRow base{label, to_string(mapping), bits, "matrix", false, 0, 0};

      // Naive low-bit Shampoo stores A as fp32 diagonal + low-bit off-diagonal.
      QuantOptions matrix_options = options;
      matrix_options.keep_diagonal = true;
      const std::optional<at::Tensor> naive =
          linalg::inverse_root_eigen(round_trip(a, matrix_options), kInverseRootPower, epsilon);
      TORCH_CHECK(naive, "quant-error: the fp64 eigendecomposition of the dequantized matrix failed");
      rows.push_back(measure(f, *naive, base));

      const at::Tensor v = round_trip(eigenvectors_as_rows, options).t();
      for (const bool rectify : {false, true}) {
        QuantErrorRow row = base;
        row.quantized = "eigenvectors";
        row.rectified = rectify;
        const linalg::Eigen approx{values_fp32, rectify ? linalg::bjorck_orthonormalize(v, kRectificationSteps) : v};
        rows.push_back(measure(f, linalg::inverse_root_from_eigen(approx, kInverseRootPower, epsilon), row));
      }
      // What the paper's 4-bit Shampoo applies: the root from the rectified eigenvectors,
      // quantized a second time (fp32 diagonal + low-bit off-diagonal). The rectified row
      // above is what root_storage "eigen" applies (no second rounding).
      {
        QuantErrorRow row = base;
        row.quantized = "eigenvectors+root";
        row.rectified = true;
        const linalg::Eigen approx{values_fp32, linalg::bjorck_orthonormalize(v, kRectificationSteps)};
        QuantOptions root_options = options;
        root_options.keep_diagonal = true;
        const at::Tensor root = linalg::inverse_root_from_eigen(approx, kInverseRootPower, epsilon);
        rows.push_back(measure(f, round_trip(root, root_options), row));
      }

      // Kashin rows measure the stored eigenvectors and roots; the Cholesky chains (60 stores
      // each) are left to the table codecs.
      if (kashin) continue;
      const double ridge = epsilon * exact.values.max().item<double>();
      const at::Tensor a64 = a.to(at::kDouble);
      for (const auto& [updates, error_feedback] :
           {std::pair{1, false}, std::pair{kCholeskyChainUpdates, false}, std::pair{kCholeskyChainUpdates, true}}) {
        QuantErrorRow row = base;
        row.quantized = "cholesky";
        row.updates = updates;
        row.error_feedback = error_feedback;
        rows.push_back(measure(f, cholesky_root(a64, ridge, options, updates, error_feedback), row));
      }
    }
  }
  return rows;
}

std::vector<QuantErrorRow> quant_error_table(const QuantErrorOptions& options) {
  TORCH_CHECK(options.order >= 1, "matrix order must be positive; got ", options.order);
  // Reject a bad name before spending eigendecompositions on the good ones.
  for (const std::string& name : options.matrices) synthetic_spectrum(name, 1);
  std::vector<QuantErrorRow> rows;
  for (const std::string& name : options.matrices) {
    const at::Tensor a = synthetic_spd_matrix(name, options.order, options.seed);
    for (QuantErrorRow& row : quant_error_rows(name, a, options.block_size, options.epsilon))
      rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace lowbit::analysis
