#include <lowbit/layer_statistics.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>

#include <variant>

namespace lowbit {
namespace {

constexpr const char* kWho = "lowbit::LayerStatistics";

std::vector<int64_t> pair_of(const torch::ExpandingArray<2>& a) { return {(*a)[0], (*a)[1]}; }

// a with a trailing column of ones: the homogeneous coordinate that carries the bias.
at::Tensor with_ones(const at::Tensor& a) { return at::cat({a, at::ones({a.size(0), 1}, a.options())}, 1); }

}  // namespace

KfacLayer KfacLayer::linear(const torch::nn::Linear& layer) {
  KfacLayer out;
  out.weight = layer->weight;
  out.bias = layer->bias;
  return out;
}

KfacLayer KfacLayer::conv2d(const torch::nn::Conv2d& layer) {
  const auto& o = layer->options;
  const auto* padding = std::get_if<torch::ExpandingArray<2>>(&o.padding());
  TORCH_CHECK(padding != nullptr, kWho, ": Conv2d layers with padding \"same\" / \"valid\" are not supported; give the padding as numbers");
  TORCH_CHECK(o.groups() == 1, kWho, ": grouped Conv2d (groups=", o.groups(), ") is not supported");
  TORCH_CHECK(std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode()), kWho,
              ": Conv2d padding_mode must be zeros");
  KfacLayer out;
  out.weight = layer->weight;
  out.bias = layer->bias;
  out.stride = pair_of(o.stride());
  out.padding = pair_of(*padding);
  out.dilation = pair_of(o.dilation());
  return out;
}

int64_t KfacLayer::input_order() const {
  return weight.numel() / weight.size(0) + (bias.defined() ? 1 : 0);
}

torch::Tensor KfacLayer::gradient_matrix() const {
  const at::Tensor w = weight.grad().reshape({weight.size(0), -1});
  if (!bias.defined()) return w;
  TORCH_CHECK(bias.grad().defined(), kWho, ": a layer's weight has a gradient and its bias has none");
  return at::cat({w, bias.grad().reshape({-1, 1})}, 1);
}

std::vector<KfacLayer> kfac_layers(torch::nn::Module& module) {
  std::vector<KfacLayer> layers;
  for (const auto& m : module.modules(/*include_self=*/true)) {
    if (auto* linear = m->as<torch::nn::Linear>()) {
      layers.push_back(KfacLayer::linear(torch::nn::Linear(std::dynamic_pointer_cast<torch::nn::LinearImpl>(m))));
    } else if (auto* conv = m->as<torch::nn::Conv2d>()) {
      layers.push_back(KfacLayer::conv2d(torch::nn::Conv2d(std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m))));
    }
  }
  return layers;
}

LayerStatistics::LayerStatistics(std::vector<KfacLayer> layers) : layers_(std::move(layers)), pending_(layers_.size()) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    const KfacLayer& l = layers_[i];
    TORCH_CHECK(l.weight.defined() && (l.weight.dim() == 2 || l.weight.dim() == 4), kWho, ": layer ", i,
                " needs a 2-D (Linear) or 4-D (Conv2d) weight");
    TORCH_CHECK(!l.bias.defined() || l.bias.sizes() == at::IntArrayRef{l.weight.size(0)}, kWho, ": layer ", i,
                "'s bias must have shape [", l.weight.size(0), "]");
    TORCH_CHECK(!l.is_conv() || (l.stride.size() == 2 && l.padding.size() == 2 && l.dilation.size() == 2), kWho,
                ": layer ", i, ": stride, padding and dilation need two entries");
  }
}

size_t LayerStatistics::index_of(const torch::Tensor& weight) const {
  for (size_t i = 0; i < layers_.size(); ++i)
    if (layers_[i].weight.is_same(weight)) return i;
  return layers_.size();
}

void LayerStatistics::record_input(size_t index, const torch::Tensor& input) {
  TORCH_CHECK(index < layers_.size(), kWho, ".record_input: layer ", index, " of ", layers_.size());
  if (!capturing_) return;
  const KfacLayer& l = layers_[index];
  at::NoGradGuard no_grad;
  at::Tensor a;  // [rows, in (x kh x kw)]
  int64_t batch = 0;
  if (l.is_conv()) {
    TORCH_CHECK(input.dim() == 4 && input.size(1) == l.weight.size(1), kWho, ".record_input: layer ", index,
                " (Conv2d) needs input [B, ", l.weight.size(1), ", H, W]; got ", input.sizes());
    batch = input.size(0);
    // [B, C kh kw, L] -> [B L, C kh kw]: the patch of each output position (KFC's a_t), in
    // the order weight.view(out, -1) reads.
    const at::Tensor patches = at::im2col(input.detach().to(at::kFloat), {l.weight.size(2), l.weight.size(3)},
                                          l.dilation, l.padding, l.stride);
    a = patches.transpose(1, 2).reshape({-1, patches.size(1)});
  } else {
    TORCH_CHECK(input.dim() >= 2 && input.size(-1) == l.weight.size(1), kWho, ".record_input: layer ", index,
                " (Linear) needs input [..., ", l.weight.size(1), "]; got ", input.sizes());
    a = input.detach().to(at::kFloat).reshape({-1, input.size(-1)});
    batch = a.size(0);
  }
  if (l.bias.defined()) a = with_ones(a);
  // KFC's Omega = E_i[sum_t a_t a_t^T]: summed over positions, averaged over examples.
  const at::Tensor product = at::matmul(a.t(), a).div_(static_cast<double>(batch));
  Pending& p = pending_[index];
  p.input_sum = p.inputs == 0 ? product : p.input_sum + product;
  ++p.inputs;
}

void LayerStatistics::record_output_grad(size_t index, const torch::Tensor& grad_output) {
  TORCH_CHECK(index < layers_.size(), kWho, ".record_output_grad: layer ", index, " of ", layers_.size());
  if (!capturing_) return;
  const KfacLayer& l = layers_[index];
  at::NoGradGuard no_grad;
  const int64_t out = l.weight.size(0);
  at::Tensor g;
  int64_t batch = 0, positions = 1;
  if (l.is_conv()) {
    TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(1) == out, kWho, ".record_output_grad: layer ", index,
                " (Conv2d) needs [B, ", out, ", H', W']; got ", grad_output.sizes());
    batch = grad_output.size(0);
    positions = grad_output.size(2) * grad_output.size(3);
    g = grad_output.detach().to(at::kFloat).permute({0, 2, 3, 1}).reshape({-1, out});
  } else {
    TORCH_CHECK(grad_output.dim() >= 2 && grad_output.size(-1) == out, kWho, ".record_output_grad: layer ", index,
                " (Linear) needs [..., ", out, "]; got ", grad_output.sizes());
    g = grad_output.detach().to(at::kFloat).reshape({-1, out});
    batch = g.size(0);
  }
  // The loss is a batch mean, so B g is the per-example derivative Ds; KFC's
  // Gamma = E_i[(1/|T|) sum_t Ds_t Ds_t^T] = (B / |T|) sum_{i,t} g g^T.
  const at::Tensor product = at::matmul(g.t(), g).mul_(static_cast<double>(batch) / static_cast<double>(positions));
  Pending& p = pending_[index];
  p.output_sum = p.outputs == 0 ? product : p.output_sum + product;
  ++p.outputs;
}

void LayerStatistics::observe(const torch::Tensor& weight, const torch::Tensor& input, const torch::Tensor& output) {
  if (!capturing_ || !output.requires_grad()) return;  // evaluation passes are not statistics
  const size_t index = index_of(weight);
  if (index == layers_.size()) return;
  record_input(index, input);
  torch::Tensor hooked = output;
  hooked.register_hook([this, index](const torch::Tensor& grad) { record_output_grad(index, grad); });
}

bool LayerStatistics::recorded(size_t index) const {
  return index < pending_.size() && pending_[index].inputs > 0 && pending_[index].outputs > 0;
}

std::pair<torch::Tensor, torch::Tensor> LayerStatistics::take(size_t index) {
  TORCH_CHECK(recorded(index), kWho, ": layer ", index, " has no recorded statistics (its input and output "
              "gradient must both be recorded on a capturing step)");
  Pending& p = pending_[index];
  std::pair<torch::Tensor, torch::Tensor> out{p.input_sum / static_cast<double>(p.inputs),
                                              p.output_sum / static_cast<double>(p.outputs)};
  p = Pending{};
  return out;
}

void LayerStatistics::clear() {
  for (Pending& p : pending_) p = Pending{};
}

}  // namespace lowbit
