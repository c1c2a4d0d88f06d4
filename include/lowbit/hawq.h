// HAWQ: Hessian-aware mixed-precision quantization of a trained network's weights (Dong et
// al., HAWQ, ICCV 2019; HAWQ-V2, NeurIPS 2020). docs/hawq.md has the method; Python:
// lowbit.hawq (the same maths, tested against dense Hessians and brute force there too).
//
// Layer i at width b costs Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2, with H_i its
// block of the loss Hessian (Hutchinson's estimate) and Q_b lowbit's block-wise codec; the
// allocation minimizes sum_i Omega_i under a byte budget exactly (a Pareto frontier).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <lowbit/quant_options.h>

namespace torch::nn {
class Module;
}

namespace lowbit::hawq {

// ------------------------------------------------------------------ the exact allocation
// One option per layer: costs[i][j] / omegas[i][j] are bytes and Omega of option j of layer i.
struct Choice {
  int64_t bytes = 0;
  double omega = 0;
  std::vector<int> option;  // index of the chosen option, per layer
};
// Every non-dominated choice within `budget` (budget < 0: no limit), sorted by bytes, Omega
// strictly decreasing. A partial choice dominated after layer i stays dominated whatever the
// later layers take, so the frontier after the last layer holds an optimum for every budget.
std::vector<Choice> pareto_frontier(const std::vector<std::vector<int64_t>>& costs,
                                    const std::vector<std::vector<double>>& omegas, int64_t budget = -1);
// The choice of least Omega within `budget` (fewest bytes among ties); throws naming the
// smallest possible size when the budget is below it.
Choice best_choice(const std::vector<std::vector<int64_t>>& costs, const std::vector<std::vector<double>>& omegas,
                   int64_t budget);

// ------------------------------------------------------------------ curvature
// The loss of batch b (0 <= b < num_batches) with its autograd graph, computed by the caller
// (who chooses eval mode, the loss function, the data).
using BatchLoss = std::function<at::Tensor(int64_t batch)>;

struct TraceOptions {
  double rel_tol = 0.1;      // stop when every layer's half-width z * stderr <= rel_tol * |trace|
  double confidence = 0.95;  // two-sided normal-approximation level of the interval
  int64_t min_probes = 16, max_probes = 256;
  uint64_t seed = 0;
  void validate() const;
};

struct LayerTrace {
  std::string name;
  int64_t numel = 0;
  double trace = 0, stderr_of_mean = 0, low = 0, high = 0;
  int64_t probes = 0;
  bool converged = false;  // the stopping rule held before max_probes
};

// Hutchinson's estimate of Tr(H_i) for each weight, H_i its diagonal block of the Hessian of
// the mean loss over the batches. Probe k: a Rademacher z over all weights and one
// Hessian-vector product on batch k mod num_batches; the layer's sample is z_i^T (H z)_i
// (unbiased: the cross terms z_i^T H_ij z_j have mean 0). The stopping rule is checked after
// whole rounds over the batches, from min_probes on.
std::vector<LayerTrace> layer_traces(const std::vector<at::Tensor>& weights, const std::vector<std::string>& names,
                                     int64_t num_batches, const BatchLoss& loss, const TraceOptions& options = {});

struct LayerEigenvalue {
  std::string name;
  int64_t numel = 0;
  double value = 0, residual = 0;  // Rayleigh quotient; ||H_i v - value v|| bounds its error
  int64_t iterations = 0;
};
// HAWQ-V1: the eigenvalue of largest magnitude of each block H_i by power iteration, until
// the residual is at most rel_tol * |value| or max_iterations.
std::vector<LayerEigenvalue> top_eigenvalues(const std::vector<at::Tensor>& weights,
                                             const std::vector<std::string>& names, int64_t num_batches,
                                             const BatchLoss& loss, double rel_tol = 1e-3,
                                             int64_t max_iterations = 100, uint64_t seed = 0);

// ------------------------------------------------------------------ the plan
struct QuantizableLayer {
  std::string name;
  at::Tensor weight;  // the module's parameter (shares storage)
};
// The weights of the model's Linear and Conv2d modules in registration order; throws when
// there is none.
std::vector<QuantizableLayer> quantizable_layers(torch::nn::Module& model);

struct PlanOptions {
  std::vector<int64_t> widths{3, 4, 8};  // each a codec width (3, 4, 8)
  bool pin_edges = true;                 // first and last layer at 8 bits
  std::string scaling = "block";         // "block": block_size per fp32 scale; "channel": one per row
  int64_t block_size = 64;
  Mapping mapping = Mapping::Linear;
  void validate() const;
};

// Bytes the codec stores for a weight viewed as rows = shape[0], cols = numel / rows:
// rows * ceil(cols * bits / 8) + 4 * rows * ceil(cols / block) (QuantizedMatrix::storage_bytes).
int64_t weight_bytes(const at::Tensor& weight, int64_t bits, int64_t block);
// The codec block of a weight under `scaling` ("channel": the smallest power of two >= cols).
int64_t block_for(const at::Tensor& weight, const std::string& scaling, int64_t block_size);
// Q_b(W): the weight after a round trip through the codec, in its shape.
at::Tensor quantized_weight(const at::Tensor& weight, int64_t bits, int64_t block, Mapping mapping);

struct LayerChoice {
  std::string name;
  int64_t numel = 0, bits = 0, bytes = 0;
  double trace = 0, omega = 0;
};
struct Allocation {
  std::string method;
  int64_t budget_bytes = 0, fixed_bytes = 0;
  std::vector<LayerChoice> layers;
  int64_t weight_bytes() const;
  int64_t total_bytes() const { return weight_bytes() + fixed_bytes; }
};

// "hawq": Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2 (a negative trace counts as 0); "size": 4^-b, the
// relative noise power of a b-bit grid, alike for every layer, so bits go first where they cost
// the fewest bytes, to the small layers (allocation by layer size alone); "weight-error":
// ||Q_b(W_i) - W_i||^2; "uniform": the widest single width that fits.
const std::vector<std::string>& allocation_methods();

struct Plan {
  std::vector<std::string> names;
  std::vector<int64_t> numel;
  std::vector<int64_t> widths;
  std::vector<std::vector<int64_t>> bytes;          // [layer][width]
  std::vector<std::vector<double>> squared_error;   // [layer][width]
  std::vector<double> traces;                       // empty unless set (method "hawq" needs them)
  int64_t fixed_bytes = 0;                          // parameters left unquantized
  PlanOptions options;

  std::vector<int> options_of(size_t layer) const;  // width indices the layer may take
  int64_t minimum_bytes() const;
  Allocation allocate(int64_t budget_bytes, const std::string& method) const;
};
// Bytes and errors of every layer at every width; fixed_bytes counts every other parameter.
Plan make_plan(torch::nn::Module& model, const PlanOptions& options);
// Replaces each layer's weight by Q_b(W) at its chosen width, in place.
void apply(torch::nn::Module& model, const Allocation& allocation, const PlanOptions& options);

}  // namespace lowbit::hawq
