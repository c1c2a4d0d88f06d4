// The layers HAWQ quantizes, their bytes and quantization errors per width, the allocations
// (HAWQ-V2 and the baselines), and applying one to a model.
#include <lowbit/hawq.h>
#include <lowbit/quantized_matrix.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_set>

namespace lowbit::hawq {
namespace {

at::Tensor as_matrix(const at::Tensor& weight) { return weight.reshape({weight.size(0), -1}); }

std::string join(const std::vector<int64_t>& values) {
  std::string out;
  for (int64_t v : values) out += (out.empty() ? "" : ", ") + std::to_string(v);
  return out;
}

}  // namespace

std::vector<QuantizableLayer> quantizable_layers(torch::nn::Module& model) {
  std::vector<QuantizableLayer> layers;
  for (const auto& item : model.named_modules()) {
    const std::shared_ptr<torch::nn::Module>& m = item.value();
    if (auto* linear = dynamic_cast<torch::nn::LinearImpl*>(m.get())) {
      layers.push_back({item.key(), linear->weight});
    } else if (auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(m.get())) {
      layers.push_back({item.key(), conv->weight});
    }
  }
  TORCH_CHECK(!layers.empty(), "hawq: the model (", model.name(), ") has no quantizable layer: HAWQ quantizes the "
              "weights of Linear and Conv2d modules");
  return layers;
}

void PlanOptions::validate() const {
  TORCH_CHECK(!widths.empty(), "hawq: widths is empty; give at least one of 3, 4, 8");
  for (int64_t w : widths)
    TORCH_CHECK(w == 3 || w == 4 || w == 8, "hawq: widths: ", w, " is not a width of lowbit's codec (expected each "
                "of 3, 4, 8; got ", join(widths), ")");
  TORCH_CHECK(!pin_edges || std::count(widths.begin(), widths.end(), 8) > 0,
              "hawq: pinning the first and last layer to 8 bits needs 8 among the widths (got ", join(widths), ")");
  TORCH_CHECK(scaling == "block" || scaling == "channel", "hawq: scaling must be \"block\" or \"channel\"; got \"",
              scaling, "\"");
  check_block_size(block_size, "hawq: block_size");
}

int64_t weight_bytes(const at::Tensor& weight, int64_t bits, int64_t block) {
  QuantOptions o;
  o.bits = static_cast<int>(bits);
  o.block_size = block;
  return QuantizedMatrix::storage_bytes(weight.size(0), weight.numel() / weight.size(0), o);
}

int64_t block_for(const at::Tensor& weight, const std::string& scaling, int64_t block_size) {
  if (scaling == "block") return block_size;
  const int64_t cols = weight.numel() / weight.size(0);
  int64_t block = kMinBlockSize;
  while (block < cols) block *= 2;
  TORCH_CHECK(block <= kMaxBlockSize, "hawq: scaling \"channel\": rows of ", cols,
              " elements exceed the codec's largest block (", kMaxBlockSize, "); use scaling \"block\"");
  return block;
}

at::Tensor quantized_weight(const at::Tensor& weight, int64_t bits, int64_t block, Mapping mapping) {
  QuantOptions o;
  o.bits = static_cast<int>(bits);
  o.block_size = block;
  o.mapping = mapping;
  const at::Tensor w = weight.detach();
  return QuantizedMatrix::quantize(as_matrix(w), o).dequantize(w.scalar_type()).reshape(w.sizes());
}

int64_t Allocation::weight_bytes() const {
  int64_t total = 0;
  for (const LayerChoice& c : layers) total += c.bytes;
  return total;
}

const std::vector<std::string>& allocation_methods() {
  static const std::vector<std::string> methods{"hawq", "size", "weight-error", "uniform"};
  return methods;
}

std::vector<int> Plan::options_of(size_t layer) const {
  if (options.pin_edges && (layer == 0 || layer + 1 == names.size()))
    return {static_cast<int>(std::find(widths.begin(), widths.end(), 8) - widths.begin())};
  std::vector<int> all(widths.size());
  for (size_t j = 0; j < widths.size(); ++j) all[j] = static_cast<int>(j);
  return all;
}

int64_t Plan::minimum_bytes() const {
  int64_t total = fixed_bytes;
  for (size_t i = 0; i < names.size(); ++i) {
    int64_t least = INT64_MAX;
    for (int j : options_of(i)) least = std::min(least, bytes[i][j]);
    total += least;
  }
  return total;
}

Allocation Plan::allocate(int64_t budget_bytes, const std::string& method) const {
  const auto& methods = allocation_methods();
  TORCH_CHECK(std::count(methods.begin(), methods.end(), method) > 0, "hawq: method must be one of hawq, size, "
              "weight-error, uniform; got \"", method, "\"");
  TORCH_CHECK(budget_bytes >= minimum_bytes(), "hawq: budget ", budget_bytes, " bytes is below the smallest model "
              "this plan can make, ", minimum_bytes(), " bytes (every layer at ", widths.front(), " bits",
              options.pin_edges ? ", first and last at 8" : "", ", plus ", fixed_bytes,
              " bytes of unquantized parameters)");
  TORCH_CHECK(method != "hawq" || traces.size() == names.size(), "hawq: method \"hawq\" needs the layer traces");
  const size_t n = names.size();
  std::vector<std::vector<double>> omega(n, std::vector<double>(widths.size(), NAN));
  for (size_t i = 0; i < n && method != "uniform"; ++i)
    for (size_t j = 0; j < widths.size(); ++j) {
      if (method == "hawq") {
        // A negative estimate would reward error; the quadratic model then predicts no loss increase.
        omega[i][j] = std::max(traces[i], 0.0) / numel[i] * squared_error[i][j];
      } else if (method == "size") {
        omega[i][j] = std::pow(4.0, -static_cast<double>(widths[j]));
      } else {
        omega[i][j] = squared_error[i][j];
      }
    }
  std::vector<int> picked(n);
  const int64_t weight_budget = budget_bytes - fixed_bytes;
  if (method == "uniform") {
    for (int j = static_cast<int>(widths.size()) - 1; j >= 0; --j) {  // the widest single width that fits
      int64_t total = 0;
      for (size_t i = 0; i < n; ++i) {
        const std::vector<int> allowed = options_of(i);
        picked[i] = std::count(allowed.begin(), allowed.end(), j) ? j : allowed.front();
        total += bytes[i][picked[i]];
      }
      if (total <= weight_budget) break;
    }
  } else {
    std::vector<std::vector<int64_t>> costs(n);
    std::vector<std::vector<double>> values(n);
    for (size_t i = 0; i < n; ++i)
      for (int j : options_of(i)) {
        costs[i].push_back(bytes[i][j]);
        values[i].push_back(omega[i][j]);
      }
    const Choice best = best_choice(costs, values, weight_budget);
    for (size_t i = 0; i < n; ++i) picked[i] = options_of(i)[best.option[i]];
  }
  Allocation a{method, budget_bytes, fixed_bytes, {}};
  for (size_t i = 0; i < n; ++i)
    a.layers.push_back({names[i], numel[i], widths[picked[i]], bytes[i][picked[i]],
                        traces.empty() ? NAN : traces[i], omega[i][picked[i]]});
  return a;
}

Plan make_plan(torch::nn::Module& model, const PlanOptions& options) {
  options.validate();
  Plan plan;
  plan.options = options;
  plan.widths = options.widths;
  std::sort(plan.widths.begin(), plan.widths.end());
  plan.widths.erase(std::unique(plan.widths.begin(), plan.widths.end()), plan.widths.end());
  std::unordered_set<const void*> quantized;
  for (const QuantizableLayer& layer : quantizable_layers(model)) {
    quantized.insert(layer.weight.unsafeGetTensorImpl());
    const int64_t block = block_for(layer.weight, options.scaling, options.block_size);
    const at::Tensor w = layer.weight.detach().to(at::kDouble);
    plan.names.push_back(layer.name);
    plan.numel.push_back(layer.weight.numel());
    plan.bytes.emplace_back();
    plan.squared_error.emplace_back();
    for (int64_t b : plan.widths) {
      plan.bytes.back().push_back(weight_bytes(layer.weight, b, block));
      plan.squared_error.back().push_back(
          (quantized_weight(layer.weight, b, block, options.mapping).to(at::kDouble) - w).pow(2).sum().item<double>());
    }
  }
  for (const at::Tensor& p : model.parameters())
    if (!quantized.count(p.unsafeGetTensorImpl())) plan.fixed_bytes += p.numel() * p.element_size();
  return plan;
}

void apply(torch::nn::Module& model, const Allocation& allocation, const PlanOptions& options) {
  const std::vector<QuantizableLayer> layers = quantizable_layers(model);
  TORCH_CHECK(layers.size() == allocation.layers.size(), "hawq::apply: the model has ", layers.size(),
              " quantizable layers but the allocation ", allocation.layers.size());
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerChoice& c = allocation.layers[i];
    TORCH_CHECK(layers[i].name == c.name && layers[i].weight.numel() == c.numel, "hawq::apply: layer ", i, " is ",
                layers[i].name, " but the allocation has ", c.name);
    const int64_t block = block_for(layers[i].weight, options.scaling, options.block_size);
    layers[i].weight.copy_(quantized_weight(layers[i].weight, c.bits, block, options.mapping));
  }
}

}  // namespace lowbit::hawq
