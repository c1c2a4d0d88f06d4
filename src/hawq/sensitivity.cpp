// Per-layer curvature: Hutchinson's trace with a stopping rule (HAWQ-V2) and the top
// eigenvalue by power iteration (HAWQ-V1), on the mean loss over a few batches.
#include <lowbit/hawq.h>
#include <lowbit/hessian.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>

namespace lowbit::hawq {
namespace {

// z with P(|N(0,1)| <= z) = confidence, by bisection on erf (monotone; 200 halvings of [0, 40]).
double normal_quantile(double confidence) {
  double lo = 0, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = (lo + hi) / 2;
    (std::erf(mid / std::sqrt(2.0)) < confidence ? lo : hi) = mid;
  }
  return (lo + hi) / 2;
}

std::vector<std::vector<at::Tensor>> gradient_graphs(const std::vector<at::Tensor>& weights, int64_t num_batches,
                                                     const BatchLoss& loss) {
  TORCH_CHECK(num_batches >= 1, "hawq: need at least one batch; got ", num_batches);
  TORCH_CHECK(!weights.empty(), "hawq: no weights to measure");
  std::vector<std::vector<at::Tensor>> graphs;
  for (int64_t b = 0; b < num_batches; ++b)
    graphs.push_back(torch::autograd::grad({loss(b)}, weights, {}, /*retain_graph=*/true, /*create_graph=*/true));
  return graphs;
}

struct Moments {  // Welford's running mean and variance
  int64_t n = 0;
  double mean = 0, m2 = 0;
  void add(double x) {
    ++n;
    const double d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  double stderr_of_mean() const { return n > 1 ? std::sqrt(m2 / (n - 1) / n) : INFINITY; }
};

}  // namespace

void TraceOptions::validate() const {
  TORCH_CHECK(rel_tol > 0, "hawq: rel_tol must be > 0; got ", rel_tol);
  TORCH_CHECK(confidence > 0 && confidence < 1, "hawq: confidence must be in (0, 1); got ", confidence);
  TORCH_CHECK(min_probes >= 2 && min_probes <= max_probes, "hawq: need 2 <= min_probes <= max_probes; got ",
              min_probes, " and ", max_probes);
}

std::vector<LayerTrace> layer_traces(const std::vector<at::Tensor>& weights, const std::vector<std::string>& names,
                                     int64_t num_batches, const BatchLoss& loss, const TraceOptions& options) {
  options.validate();
  TORCH_CHECK(names.size() == weights.size(), "hawq::layer_traces: ", weights.size(), " weights but ", names.size(),
              " names");
  const std::vector<std::vector<at::Tensor>> graphs = gradient_graphs(weights, num_batches, loss);
  const double z_value = normal_quantile(options.confidence);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  std::vector<Moments> samples(weights.size());
  bool converged = false;
  for (int64_t k = 1; k <= options.max_probes; ++k) {
    const std::vector<at::Tensor> z = rademacher_like(weights, generator);
    const std::vector<at::Tensor> hz = hessian_vector_products(graphs[(k - 1) % num_batches], weights, z);
    for (size_t i = 0; i < weights.size(); ++i)
      samples[i].add((z[i].to(at::kDouble) * hz[i].to(at::kDouble)).sum().item<double>());
    if (k >= options.min_probes && k % num_batches == 0) {
      converged = true;
      for (const Moments& s : samples)
        converged = converged && z_value * s.stderr_of_mean() <= options.rel_tol * std::abs(s.mean);
      if (converged) break;
    }
  }
  std::vector<LayerTrace> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const Moments& s = samples[i];
    const double se = s.stderr_of_mean();
    out.push_back({names[i], weights[i].numel(), s.mean, se, s.mean - z_value * se, s.mean + z_value * se, s.n,
                   converged});
  }
  return out;
}

std::vector<LayerEigenvalue> top_eigenvalues(const std::vector<at::Tensor>& weights,
                                             const std::vector<std::string>& names, int64_t num_batches,
                                             const BatchLoss& loss, double rel_tol, int64_t max_iterations,
                                             uint64_t seed) {
  TORCH_CHECK(rel_tol > 0 && max_iterations >= 1, "hawq: need rel_tol > 0 and max_iterations >= 1; got ", rel_tol,
              " and ", max_iterations);
  TORCH_CHECK(names.size() == weights.size(), "hawq::top_eigenvalues: ", weights.size(), " weights but ",
              names.size(), " names");
  const std::vector<std::vector<at::Tensor>> graphs = gradient_graphs(weights, num_batches, loss);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<LayerEigenvalue> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    // H_i v: the vector is zero outside layer i, and only layer i's part of H v is kept.
    auto block_product = [&](const at::Tensor& v) {
      std::vector<at::Tensor> vectors;
      for (size_t j = 0; j < weights.size(); ++j) vectors.push_back(j == i ? v : at::zeros_like(weights[j]));
      at::Tensor total = at::zeros_like(v);
      for (const auto& grads : graphs) total += hessian_vector_products(grads, weights, vectors)[i];
      return total / static_cast<double>(num_batches);
    };
    at::Tensor v = at::randn(weights[i].sizes(), generator, weights[i].options().device(at::kCPU).requires_grad(false))
                       .to(weights[i].device());
    v /= v.norm();
    LayerEigenvalue e{names[i], weights[i].numel()};
    for (e.iterations = 1; e.iterations <= max_iterations; ++e.iterations) {
      const at::Tensor hv = block_product(v);
      e.value = (v * hv).sum().item<double>();
      e.residual = (hv - e.value * v).norm().item<double>();
      const double norm = hv.norm().item<double>();
      if (e.residual <= rel_tol * std::abs(e.value) || norm == 0) break;
      v = hv / norm;
    }
    e.iterations = std::min(e.iterations, max_iterations);
    out.push_back(e);
  }
  return out;
}

}  // namespace lowbit::hawq
