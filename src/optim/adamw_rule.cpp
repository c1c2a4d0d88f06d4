#include "optim/adamw_rule.h"

#include <ATen/ATen.h>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include <algorithm>
#include <cmath>

#include "optim/gradient_health.h"
#include "optim/second_order/optimizer_support.h"
#include "quant/codec_ops.h"
#include "quant/kashin_vector.h"

namespace lowbit::adamw {
namespace {

using support::bytes_of;

int64_t code_bytes(const MomentLayout& l) { return packed_row_bytes(l.numel, l.bits); }
int64_t scale_count(const MomentLayout& l) { return blocks_per_row(l.numel, l.block_size); }

kashin::VectorCode first_moment_code(const Moments& m) {
  return {m.exp_avg_codes, m.exp_avg_scales, m.exp_avg_centroids};
}

}  // namespace

int64_t resolved_block_size(int64_t bits, int64_t block_size) {
  if (block_size != 0) return block_size;
  return bits == 4 ? 128 : 256;
}

std::string resolved_second_moment_mapping(int64_t bits, const std::string& second_moment_mapping) {
  if (second_moment_mapping != "auto") return second_moment_mapping;
  return bits == 4 ? "linear" : "dynamic";
}

MomentLayout layout_for(int64_t numel, int64_t bits, const std::string& mapping,
                        const std::string& second_moment_mapping, int64_t block_size, int64_t min_quant_numel) {
  MomentLayout l;
  l.numel = numel;
  // Small tensors (biases, norms) cost little and are the most sensitive: fp32, as in
  // bitsandbytes' min_8bit_size.
  l.bits = (bits == 32 || numel < std::max<int64_t>(1, min_quant_numel)) ? 32 : static_cast<int>(bits);
  if (!l.quantized()) return l;
  l.mapping = parse_mapping(mapping);
  l.second_moment_mapping = parse_mapping(resolved_second_moment_mapping(bits, second_moment_mapping));
  l.block_size = resolved_block_size(bits, block_size);
  return l;
}

Moments make_moments(const MomentLayout& l, const at::Tensor& p) {
  Moments m;
  if (!l.quantized()) {
    m.exp_avg = at::zeros_like(p, at::MemoryFormat::Preserve).detach();
    m.exp_avg_sq = at::zeros_like(p, at::MemoryFormat::Preserve).detach();
    return m;
  }
  const at::TensorOptions bytes = p.options().dtype(at::kByte), f32 = p.options().dtype(at::kFloat);
  m.exp_avg_codes = at::zeros({code_bytes(l)}, bytes);
  m.exp_avg_sq_codes = at::zeros({code_bytes(l)}, bytes);
  m.exp_avg_scales = at::zeros({scale_count(l)}, f32);
  m.exp_avg_sq_scales = at::zeros({scale_count(l)}, f32);
  if (l.kashin_first_moment()) m.exp_avg_centroids = at::zeros({kashin::centroid_count(l.bits), 2}, f32);
  return m;
}

void check_moments(const Moments& m, const MomentLayout& l, const at::Tensor& p, const std::string& who) {
  auto expect = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    TORCH_CHECK(t.defined(), who, ": the AdamW state has no \"", name, "\" (a ",
                l.quantized() ? std::to_string(l.bits) + "-bit" : std::string("fp32"), " state of ", l.numel,
                " elements)");
    TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == shape, who, ": AdamW state \"", name, "\" must be ", dtype,
                " of shape ", shape, "; got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.device() == p.device(), who, ": AdamW state \"", name, "\" is on ", t.device(),
                " but the parameter is on ", p.device());
  };
  if (l.quantized()) {
    const std::vector<int64_t> codes{code_bytes(l)}, scales{scale_count(l)};
    expect(m.exp_avg_codes, "exp_avg_codes", at::kByte, codes);
    expect(m.exp_avg_scales, "exp_avg_scales", at::kFloat, scales);
    expect(m.exp_avg_sq_codes, "exp_avg_sq_codes", at::kByte, codes);
    expect(m.exp_avg_sq_scales, "exp_avg_sq_scales", at::kFloat, scales);
    TORCH_CHECK(!m.exp_avg.defined() && !m.exp_avg_sq.defined(), who, ": a ", l.bits,
                "-bit AdamW state has no fp32 \"exp_avg\" / \"exp_avg_sq\" (was it saved with bits=32, or with a "
                "larger min_quant_numel?)");
    for (const auto& [s, name] : {std::make_pair(&m.exp_avg_scales, "exp_avg_scales"),
                                  std::make_pair(&m.exp_avg_sq_scales, "exp_avg_sq_scales")}) {
      const bool ok = s->numel() == 0 || (s->ge(0).all().item<bool>() && s->isfinite().all().item<bool>());
      TORCH_CHECK(ok, who, ": AdamW state \"", name, "\" holds a NaN, Inf or negative block scale; scales are "
                  "finite and >= 0");
    }
    if (l.kashin_first_moment()) {
      expect(m.exp_avg_centroids, "exp_avg_centroids", at::kFloat, {kashin::centroid_count(l.bits), 2});
      TORCH_CHECK(m.exp_avg_centroids.isfinite().all().item<bool>(), who,
                  ": AdamW state \"exp_avg_centroids\" holds a NaN or Inf; the checkpoint is corrupt");
    }
  } else {
    expect(m.exp_avg, "exp_avg", p.scalar_type(), p.sizes());
    expect(m.exp_avg_sq, "exp_avg_sq", p.scalar_type(), p.sizes());
    TORCH_CHECK(!m.exp_avg_codes.defined() && !m.exp_avg_scales.defined() && !m.exp_avg_sq_codes.defined() &&
                    !m.exp_avg_sq_scales.defined(),
                who, ": an fp32 AdamW state has no codes or scales (was it saved with bits=8 or 4, or with a "
                "smaller min_quant_numel?)");
  }
  TORCH_CHECK(l.kashin_first_moment() || !m.exp_avg_centroids.defined(), who,
              ": the AdamW state has \"exp_avg_centroids\", which only a 4-bit first moment with mapping "
              "\"kashin\" stores");
}

int64_t moments_bytes(const Moments& m) {
  return bytes_of(m.exp_avg) + bytes_of(m.exp_avg_sq) + bytes_of(m.exp_avg_codes) + bytes_of(m.exp_avg_scales) +
         bytes_of(m.exp_avg_sq_codes) + bytes_of(m.exp_avg_sq_scales) + bytes_of(m.exp_avg_centroids);
}

int64_t expected_moments_bytes(const MomentLayout& l) {
  if (!l.quantized()) return 2 * 4 * l.numel;
  const int64_t centroid_bytes = l.kashin_first_moment() ? 4 * 2 * kashin::centroid_count(l.bits) : 0;
  return 2 * (code_bytes(l) + 4 * scale_count(l)) + centroid_bytes;
}

const at::Tensor& first_moment_table(const MomentLayout& l) {
  static const at::Tensor fitted_per_moment;  // Kashin: the centroids live in the state
  return l.kashin_first_moment() ? fitted_per_moment : codebook(l.mapping, l.bits);
}
const at::Tensor& second_moment_table(const MomentLayout& l) {
  return positive_codebook(l.second_moment_mapping, l.bits);
}

at::Tensor dequantize_moment(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table,
                             const MomentLayout& l) {
  at::Tensor out = at::empty({1, l.numel}, scales.options().dtype(at::kFloat));
  ops::dequantize_blockwise_out(codes.view({1, -1}), scales.view({1, -1}), codebook_on(table, codes.device()), c10::nullopt,
                                l.bits, l.block_size, out);
  return out.view({l.numel});
}

int64_t encoding_seed(const Encoding& e, int64_t step, int moment) {
  uint64_t s = support::probe_seed(e.seed, step);
  s ^= static_cast<uint64_t>(e.param_index) * 0xD1B54A32D192ED03ull + static_cast<uint64_t>(moment) * 0x94D049BB133111EBull;
  return static_cast<int64_t>(s >> 1);  // the codec takes a non-negative int64
}

void quantize_moment_into(const at::Tensor& value, const at::Tensor& table, const MomentLayout& l, at::Tensor& codes,
                          at::Tensor& scales, bool stochastic, int64_t seed) {
  auto [new_codes, new_scales, unused] =
      ops::quantize_blockwise(value.reshape({1, l.numel}).contiguous(), codebook_on(table, value.device()), l.bits,
                              l.block_size, false, stochastic, seed, c10::nullopt);
  codes.copy_(new_codes.view({-1}));
  scales.copy_(new_scales.view({-1}));
}

namespace {

// The quantized first moment, decoded with `table` or, Kashin, with the state's centroids.
at::Tensor read_first_moment(const Moments& s, const at::Tensor& table, const MomentLayout& l) {
  if (l.kashin_first_moment()) return kashin::decode_vector(first_moment_code(s), l.bits, l.block_size, l.numel);
  return dequantize_moment(s.exp_avg_codes, s.exp_avg_scales, table, l);
}

void write_first_moment(const at::Tensor& m, Moments& s, const at::Tensor& table, const MomentLayout& l,
                        const Encoding& e, int64_t step) {
  if (l.kashin_first_moment()) {
    kashin::encode_vector_into(m, l.bits, l.block_size, first_moment_code(s));  // nearest: the options refuse stochastic
    return;
  }
  quantize_moment_into(m, table, l, s.exp_avg_codes, s.exp_avg_scales, e.stochastic,
                       e.stochastic ? encoding_seed(e, step, 0) : 0);
}

at::Tensor flat_fp32(const at::Tensor& t, int64_t numel) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.view({numel});
  return t.reshape({numel}).to(at::kFloat);
}

}  // namespace

std::pair<at::Tensor, at::Tensor> read_moments(const Moments& s, const MomentLayout& l) {
  if (!l.quantized()) return {flat_fp32(s.exp_avg, l.numel), flat_fp32(s.exp_avg_sq, l.numel)};
  return {read_first_moment(s, first_moment_table(l), l),
          dequantize_moment(s.exp_avg_sq_codes, s.exp_avg_sq_scales, second_moment_table(l), l)};
}

void write_moments(const at::Tensor& m, const at::Tensor& v, Moments& s, const MomentLayout& l, int64_t step,
                   const Encoding& e) {
  if (!l.quantized()) {
    for (auto [value, target] : {std::pair{&m, &s.exp_avg}, std::pair{&v, &s.exp_avg_sq}})
      if (!value->is_alias_of(*target)) target->copy_(value->view(target->sizes()));
    return;
  }
  write_first_moment(m, s, first_moment_table(l), l, e, step);
  quantize_moment_into(v, second_moment_table(l), l, s.exp_avg_sq_codes, s.exp_avg_sq_scales, e.stochastic,
                       e.stochastic ? encoding_seed(e, step, 1) : 0);
}

void update_with_tables(at::Tensor& p, const at::Tensor& grad, Moments& s, const MomentLayout& l, int64_t step,
                        double lr, double beta1, double beta2, double eps, double weight_decay,
                        const at::Tensor& first_table, const at::Tensor& second_table, const Encoding& e) {
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
  const double step_size = lr / bias_correction1;
  if (!l.quantized()) {
    // The operations of torch::optim::AdamW, in its order, so bits=32 is bit-identical to it.
    if (weight_decay != 0) p.mul_(1 - lr * weight_decay);
    s.exp_avg.mul_(beta1).add_(grad, 1 - beta1);
    s.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const at::Tensor denom = (s.exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(eps);
    p.addcdiv_(s.exp_avg, denom, -step_size);
    return;
  }
  // Decode, update and use the moments in fp32, re-encode (bitsandbytes, torchao and Li et
  // al. alike): the rounding of this step's moments enters from the next step on.
  at::Tensor m = read_first_moment(s, first_table, l);
  at::Tensor v = dequantize_moment(s.exp_avg_sq_codes, s.exp_avg_sq_scales, second_table, l);
  const at::Tensor g = grad.reshape({l.numel}).to(at::kFloat);
  const bool fp32_param = p.scalar_type() == at::kFloat && p.is_contiguous();
  at::Tensor flat = fp32_param ? p.view({l.numel}) : p.reshape({l.numel}).to(at::kFloat);
  if (weight_decay != 0) flat.mul_(1 - lr * weight_decay);
  m.mul_(beta1).add_(g, 1 - beta1);
  v.mul_(beta2).addcmul_(g, g, 1 - beta2);
  const at::Tensor denom = (v.sqrt() / std::sqrt(bias_correction2)).add_(eps);
  flat.addcdiv_(m, denom, -step_size);
  if (!fp32_param) p.copy_(flat.view(p.sizes()));
  write_first_moment(m, s, first_table, l, e, step);
  quantize_moment_into(v, second_table, l, s.exp_avg_sq_codes, s.exp_avg_sq_scales, e.stochastic,
                       e.stochastic ? encoding_seed(e, step, 1) : 0);
}

bool update_bounded(double lr, double beta1, double eps, double weight_decay) {
  return lr * 0x1p52 / ((1 - beta1) * eps) <= health::kMaxUncheckedUpdate && lr * weight_decay <= 2;
}

void update(at::Tensor& p, const at::Tensor& grad, Moments& s, const MomentLayout& l, int64_t step, double lr,
            double beta1, double beta2, double eps, double weight_decay, const Encoding& encoding) {
  if (!l.quantized()) {
    update_with_tables(p, grad, s, l, step, lr, beta1, beta2, eps, weight_decay, at::Tensor(), at::Tensor());
    return;
  }
  update_with_tables(p, grad, s, l, step, lr, beta1, beta2, eps, weight_decay, first_moment_table(l),
                     second_moment_table(l), encoding);
}

}  // namespace lowbit::adamw
