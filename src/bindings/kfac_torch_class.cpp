// K-FAC and AdaBK for Python: torch.classes.lowbit.KroneckerLayerEngine holds the C++
// optimizer (lowbit/kfac.h) and its LayerStatistics. The Python package's module hooks feed
// record_input / record_output_grad; step, state_dict and load_state_dict are the C++ ones.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <lowbit/kfac.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/options_dict.h"

namespace lowbit::bindings {
namespace {

constexpr const char* kKfacWho = "lowbit.KFAC / AdaBK: ";

KfacOptions kfac_options_from_dict(const c10::Dict<std::string, c10::IValue>& dict) {
  KfacOptions o;
  for (const auto& entry : dict) {
    const std::string& n = entry.key();
    const c10::IValue& v = entry.value();
    if (n == "lr") o.lr(as_number(n, v, kKfacWho));
    else if (n == "rule") o.rule(as_string(n, v, kKfacWho));
    else if (n == "momentum") o.momentum(as_number(n, v, kKfacWho));
    else if (n == "betas") {
      const auto pair = as_pair(n, v, kKfacWho);
      o.betas({as_number(n, pair[0], kKfacWho), as_number(n, pair[1], kKfacWho)});
    } else if (n == "eps") o.eps(as_number(n, v, kKfacWho));
    else if (n == "weight_decay") o.weight_decay(as_number(n, v, kKfacWho));
    else if (n == "stat_decay") o.stat_decay(as_number(n, v, kKfacWho));
    else if (n == "stat_interval") o.stat_interval(as_int(n, v, kKfacWho));
    else if (n == "root_interval") o.root_interval(as_int(n, v, kKfacWho));
    else if (n == "damping") o.damping(as_number(n, v, kKfacWho));
    else if (n == "damping_mode") o.damping_mode(as_string(n, v, kKfacWho));
    else if (n == "damping_input") o.damping_input(as_number(n, v, kKfacWho));
    else if (n == "damping_output") o.damping_output(as_number(n, v, kKfacWho));
    else if (n == "kl_clip") o.kl_clip(as_number(n, v, kKfacWho));
    else if (n == "factor") o.factor(as_string(n, v, kKfacWho));
    else if (n == "bjorck_steps") o.bjorck_steps(as_int(n, v, kKfacWho));
    else if (n == "eigen_update") o.eigen_update(as_string(n, v, kKfacWho));
    else if (n == "skip_nonfinite") o.skip_nonfinite(as_bool(n, v, kKfacWho));
    else TORCH_CHECK(false, kKfacWho, "unknown option \"", n, "\"");
  }
  o.validate();
  return o;
}

struct KroneckerLayerEngine : torch::CustomClassHolder {
  // layers: one (weight, bias or None, [stride, stride, padding, padding, dilation, dilation])
  // per Linear / Conv2d module, in the Python optimizer's order.
  KroneckerLayerEngine(bool adabk, const std::vector<at::Tensor>& weights, const std::vector<c10::optional<at::Tensor>>& biases,
                       const std::vector<std::vector<int64_t>>& geometry, const std::vector<at::Tensor>& params,
                       const c10::Dict<std::string, c10::IValue>& options) {
    TORCH_CHECK(weights.size() == biases.size() && biases.size() == geometry.size(), kKfacWho,
                "one bias and one geometry per layer weight");
    std::vector<KfacLayer> layers;
    for (size_t i = 0; i < weights.size(); ++i) {
      KfacLayer l;
      l.weight = weights[i];
      if (biases[i]) l.bias = *biases[i];
      TORCH_CHECK(geometry[i].size() == 6, kKfacWho, "layer ", i, ": geometry needs 6 entries");
      l.stride = {geometry[i][0], geometry[i][1]};
      l.padding = {geometry[i][2], geometry[i][3]};
      l.dilation = {geometry[i][4], geometry[i][5]};
      layers.push_back(l);
    }
    statistics = std::make_shared<LayerStatistics>(layers);
    const KfacOptions o = kfac_options_from_dict(options);
    if (adabk) optimizer = std::make_unique<AdaBK>(statistics, params, o);
    else optimizer = std::make_unique<KFAC>(statistics, params, o);
  }
  std::shared_ptr<LayerStatistics> statistics;
  std::unique_ptr<KroneckerLayerOptimizer> optimizer;
};

}  // namespace
}  // namespace lowbit::bindings

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  using lowbit::bindings::KroneckerLayerEngine;
  m.class_<KroneckerLayerEngine>("KroneckerLayerEngine")
      .def(torch::init<bool, std::vector<at::Tensor>, std::vector<c10::optional<at::Tensor>>,
                       std::vector<std::vector<int64_t>>, std::vector<at::Tensor>, c10::Dict<std::string, c10::IValue>>())
      .def("capturing", [](const c10::intrusive_ptr<KroneckerLayerEngine>& self) { return self->statistics->capturing(); })
      .def("record_input", [](const c10::intrusive_ptr<KroneckerLayerEngine>& self, int64_t index, const at::Tensor& x) {
        TORCH_CHECK(index >= 0, "layer index must be >= 0");
        self->statistics->record_input(static_cast<size_t>(index), x);
      })
      .def("record_output_grad",
           [](const c10::intrusive_ptr<KroneckerLayerEngine>& self, int64_t index, const at::Tensor& g) {
             TORCH_CHECK(index >= 0, "layer index must be >= 0");
             self->statistics->record_output_grad(static_cast<size_t>(index), g);
           })
      .def("step", [](const c10::intrusive_ptr<KroneckerLayerEngine>& self, double lr) {
        self->optimizer->param_groups().front().options().set_lr(lr);
        self->optimizer->step();
      })
      .def("steps", [](const c10::intrusive_ptr<KroneckerLayerEngine>& self) { return self->optimizer->steps(); })
      .def("skipped_steps",
           [](const c10::intrusive_ptr<KroneckerLayerEngine>& self) { return self->optimizer->skipped_steps(); })
      .def("state_dict",
           [](const c10::intrusive_ptr<KroneckerLayerEngine>& self) {
             c10::Dict<std::string, at::Tensor> out;
             for (const auto& [key, t] : self->optimizer->state_dict()) out.insert(key, t);
             return out;
           })
      .def("load_state_dict",
           [](const c10::intrusive_ptr<KroneckerLayerEngine>& self, const c10::Dict<std::string, at::Tensor>& state) {
             std::map<std::string, at::Tensor> in;
             for (const auto& entry : state) in[entry.key()] = entry.value();
             self->optimizer->load_state_dict(in);
           })
      .def("state_bytes", [](const c10::intrusive_ptr<KroneckerLayerEngine>& self) {
        const lowbit::StateBytes b = self->optimizer->state_bytes();
        return std::vector<int64_t>{b.preconditioner, b.first_order};
      });
}
