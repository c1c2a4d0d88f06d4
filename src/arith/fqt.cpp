// The quantizers of 1-bit FQT (lowbit/arith.h): the 1-bit forward grids of activations and
// weights, and Activation Gradient Pruning for the neural gradient.
#include <ATen/ATen.h>

#include <lowbit/arith.h>

#include <cmath>

namespace lowbit::arith {
namespace {

constexpr int kLloydIterations = 4;  // from the mean threshold; the scales settle in 2-3 on ReLU outputs

// Codes 0/1 (any integer or bool tensor), 8 to a byte, code i in bit i % 8 of byte i / 8.
at::Tensor pack_bits(const at::Tensor& codes) {
  at::Tensor flat = codes.reshape({-1}).to(at::kInt);
  const int64_t pad = (8 - flat.numel() % 8) % 8;
  if (pad > 0) flat = at::cat({flat, at::zeros({pad}, flat.options())});
  const at::Tensor weights = at::pow(2, at::arange(8, flat.options()));
  return (flat.view({-1, 8}) * weights).sum(1).to(at::kByte).contiguous();
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t numel) {
  const at::Tensor shifts = at::arange(8, packed.options());
  return packed.unsqueeze(1).__rshift__(shifts).bitwise_and(1).reshape({-1}).narrow(0, 0, numel);
}

at::Tensor rows_of(const at::Tensor& x) {
  const int64_t samples = x.dim() == 0 ? 1 : x.size(0);
  return x.detach().to(at::kFloat).reshape({samples, -1});
}

// The mean of each row over the entries `above` selects (0 for a row with none).
at::Tensor mean_where(const at::Tensor& rows, const at::Tensor& above) {
  const at::Tensor count = above.sum(1).clamp_min(1).to(at::kFloat);
  return (rows * above).sum(1) / count;
}

}  // namespace

int64_t BinaryCodes::bytes() const { return packed.numel() + scales.numel() * 4 + 1; }

BinaryCodes binarize(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "binarize: expected a floating tensor; got ", x.scalar_type());
  const at::Tensor rows = rows_of(x).cpu();
  BinaryCodes c;
  c.numel = rows.numel();
  TORCH_CHECK(c.numel == 0 || rows.isfinite().all().item<bool>(),
              "binarize: the tensor holds NaN or Inf (a diverged forward pass?)");
  c.non_negative = c.numel == 0 || rows.min().item<float>() >= 0;
  at::Tensor codes;
  if (c.non_negative) {
    at::Tensor threshold = rows.mean(1, true);
    for (int i = 0; i < kLloydIterations; ++i) {
      codes = rows > threshold;
      threshold = (mean_where(rows, codes) / 2).unsqueeze(1);
    }
    codes = rows > threshold;
    c.scales = mean_where(rows, codes);
  } else {
    codes = rows >= 0;
    c.scales = rows.abs().mean(1);
  }
  c.packed = pack_bits(codes);
  return c;
}

at::Tensor debinarize(const BinaryCodes& c, at::IntArrayRef shape) {
  const at::Tensor codes = unpack_bits(c.packed, c.numel).to(at::kFloat).view({c.scales.numel(), -1});
  const at::Tensor sign = c.non_negative ? codes : codes * 2 - 1;
  return (sign * c.scales.unsqueeze(1)).reshape(shape);
}

at::Tensor binarize_weight(const at::Tensor& w) {
  const at::Tensor rows = rows_of(w);
  const at::Tensor alpha = rows.abs().mean(1, true);
  return at::where(rows >= 0, alpha, -alpha).reshape(w.sizes()).to(w.scalar_type());
}

at::Tensor agp_quantize(const at::Tensor& g, int64_t group_dim, int bits, at::Generator generator) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "agp_quantize: bits must be in [1, 8]; got ", bits);
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "agp_quantize: expected a floating tensor; got ", g.scalar_type());
  TORCH_CHECK(g.dim() >= 1 && group_dim >= 0 && group_dim < g.dim(), "agp_quantize: group_dim ", group_dim,
              " is not a dimension of a tensor of shape ", g.sizes());
  if (g.numel() == 0) return at::zeros_like(g);
  const at::Tensor moved = g.to(at::kFloat).movedim(group_dim, 0);
  const at::Tensor groups = moved.reshape({moved.size(0), -1});
  const auto [low, high] = at::aminmax(groups, 1, true);
  const at::Tensor range = high - low;
  TORCH_CHECK(range.isfinite().all().item<bool>(), "agp_quantize: the gradient holds NaN or Inf");
  const int64_t count = groups.size(0);
  const int64_t kept = (count + bits - 1) / bits;
  at::Tensor keep = at::ones({count, 1}, groups.options());
  if (kept < count) {
    keep = at::zeros({count, 1}, groups.options());
    keep.index_fill_(0, std::get<1>(at::topk(range.squeeze(1), kept)), 1.0);
  }
  const double levels = std::ldexp(1.0, bits) - 1;
  const at::Tensor step = at::where(range > 0, range / levels, at::ones_like(range));
  const at::Tensor u = at::rand(groups.sizes(), generator, groups.options().device(at::kCPU)).to(groups.device());
  const at::Tensor steps = at::floor((groups - low) / step + u).clamp(0, levels);
  const at::Tensor quantized = (low + steps * step) * keep;
  return quantized.view(moved.sizes()).movedim(0, group_dim).to(g.scalar_type()).contiguous();
}

}  // namespace lowbit::arith
