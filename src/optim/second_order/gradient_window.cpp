#include "optim/second_order/gradient_window.h"

#include <ATen/ATen.h>

#include <lowbit/codebook.h>

#include <algorithm>
#include <string>

#include "optim/second_order/optimizer_support.h"
#include "quant/codec_ops.h"
#include "quant/kashin_vector.h"
#include <lowbit/quantized_matrix.h>

namespace lowbit::mfac {
namespace {

at::Tensor table_for(const WindowLayout& layout, const at::Device& device) {
  return codebook(layout.mapping, layout.bits).to(device);
}

int64_t stored(const WindowTensors& w, const WindowLayout& layout) { return std::min(w.count, layout.size); }

// Row i of a Kashin window, as handles.
kashin::VectorCode kashin_row(const WindowTensors& w, int64_t i) { return {w.codes[i], w.scales[i], w.centroids[i]}; }

}  // namespace

WindowTensors make_window(const WindowLayout& layout, const at::TensorOptions& options) {
  WindowTensors w;
  const at::TensorOptions f32 = options.dtype(at::kFloat);
  if (layout.quantized()) {
    w.codes = at::zeros({layout.size, packed_row_bytes(layout.dim, layout.bits)}, options.dtype(at::kByte));
    w.scales = at::zeros({layout.size, blocks_per_row(layout.dim, layout.block_size)}, f32);
    if (layout.kashin()) w.centroids = at::zeros({layout.size, kashin::centroid_count(layout.bits), 2}, f32);
  } else {
    w.rows = at::zeros({layout.size, layout.dim}, f32);
  }
  w.gram = at::zeros({layout.size, layout.size}, options.dtype(at::kDouble));
  return w;
}

void check_window(const WindowTensors& w, const WindowLayout& layout, const std::string& who) {
  auto expect = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
    TORCH_CHECK(t.defined(), who, ": the M-FAC window has no \"", name, "\" tensor");
    TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == at::IntArrayRef(shape), who, ": M-FAC window tensor \"",
                name, "\" must be ", dtype, " of shape ", at::IntArrayRef(shape), "; got ", t.scalar_type(),
                " of shape ", t.sizes());
  };
  if (layout.quantized()) {
    expect(w.codes, "codes", at::kByte, {layout.size, packed_row_bytes(layout.dim, layout.bits)});
    expect(w.scales, "scales", at::kFloat, {layout.size, blocks_per_row(layout.dim, layout.block_size)});
    TORCH_CHECK(!w.rows.defined(), who, ": a ", layout.bits, "-bit M-FAC window has no fp32 \"rows\"");
    if (layout.kashin())
      expect(w.centroids, "centroids", at::kFloat, {layout.size, kashin::centroid_count(layout.bits), 2});
  } else {
    expect(w.rows, "rows", at::kFloat, {layout.size, layout.dim});
    TORCH_CHECK(!w.codes.defined() && !w.scales.defined(), who,
                ": an fp32 M-FAC window has no \"codes\" or \"scales\" (was it saved with bits=8 or 4?)");
  }
  TORCH_CHECK(layout.kashin() || !w.centroids.defined(), who,
              ": the M-FAC window has \"centroids\", which only a window with mapping \"kashin\" stores");
  expect(w.gram, "gram", at::kDouble, {layout.size, layout.size});
  TORCH_CHECK(w.count >= 0, who, ": M-FAC window count must be >= 0; got ", w.count);
}

void check_window_values(const WindowTensors& w, const WindowLayout& layout, const std::string& who) {
  if (layout.quantized()) {
    TORCH_CHECK(w.scales.isfinite().all().item<bool>() && w.scales.ge(0).all().item<bool>(), who,
                ": M-FAC window \"scales\" must be finite and >= 0; the checkpoint is corrupt");
    if (layout.kashin())
      TORCH_CHECK(w.centroids.isfinite().all().item<bool>(), who,
                  ": M-FAC window \"centroids\" holds NaN or Inf values; the checkpoint is corrupt");
  } else {
    TORCH_CHECK(w.rows.isfinite().all().item<bool>(), who,
                ": M-FAC window \"rows\" holds NaN or Inf values; the checkpoint is corrupt");
  }
  TORCH_CHECK(w.gram.isfinite().all().item<bool>(), who,
              ": M-FAC window \"gram\" holds NaN or Inf values; the checkpoint is corrupt");
  // push() computed each entry as a float64 dot product of two stored rows; recomputed in
  // another order the rounding differs by about dim * 2^-53 of |r_i| . |r_j|, far below the
  // 1e-9 allowed here and far above what any corruption of an exponent or sign bit leaves.
  const int64_t n = stored(w, layout);
  const at::Tensor rows = stored_rows(w, layout).to(at::kDouble);
  const at::Tensor gram = w.gram.narrow(0, 0, n).narrow(1, 0, n);
  const at::Tensor bound = at::mm(rows.abs(), rows.abs().t()) * 1e-9 + 1e-300;
  TORCH_CHECK(((gram - at::mm(rows, rows.t())).abs() <= bound).all().item<bool>(), who,
              ": M-FAC window \"gram\" is not the Gram matrix of the stored gradients; the checkpoint is corrupt");
}

at::Tensor stored_rows(const WindowTensors& w, const WindowLayout& layout) {
  const int64_t n = stored(w, layout);
  if (!layout.quantized()) return w.rows.narrow(0, 0, n);
  if (layout.kashin()) {  // centroids differ from row to row: one decode per row
    at::Tensor out = at::empty({n, layout.dim}, w.scales.options());
    for (int64_t i = 0; i < n; ++i)
      out[i].copy_(kashin::decode_vector(kashin_row(w, i), layout.bits, layout.block_size, layout.dim));
    return out;
  }
  at::Tensor out = at::empty({n, layout.dim}, w.scales.options());
  ops::dequantize_blockwise_out(w.codes.narrow(0, 0, n), w.scales.narrow(0, 0, n),
                                table_for(layout, w.codes.device()), c10::nullopt, layout.bits, layout.block_size,
                                out);
  return out;
}

at::Tensor push(WindowTensors& w, const WindowLayout& layout, const at::Tensor& gradient) {
  const int64_t slot = w.count % layout.size;
  const at::Tensor g = gradient.reshape({1, layout.dim}).to(at::kFloat);
  if (layout.kashin()) {
    kashin::encode_vector_into(g, layout.bits, layout.block_size, kashin_row(w, slot));
  } else if (layout.quantized()) {
    auto [codes, scales, unused] = ops::quantize_blockwise(g.contiguous(), table_for(layout, g.device()), layout.bits,
                                                           layout.block_size, false, false, 0, c10::nullopt);
    w.codes[slot].copy_(codes[0]);
    w.scales[slot].copy_(scales[0]);
  } else {
    w.rows[slot].copy_(g[0]);
  }
  ++w.count;
  // The new row against every stored row (itself included), as stored: the Gram matrix
  // is exactly that of the rows the products read.
  const at::Tensor rows = stored_rows(w, layout).to(at::kDouble);
  const at::Tensor products = at::mv(rows, rows[slot]);
  const int64_t n = rows.size(0);
  w.gram[slot].narrow(0, 0, n).copy_(products);
  w.gram.select(1, slot).narrow(0, 0, n).copy_(products);
  return rows;
}

at::Tensor inverse_fisher_product(const WindowTensors& w, const at::Tensor& rows, const at::Tensor& v, double damping) {
  const int64_t n = rows.size(0);
  const at::Tensor flat = v.reshape({rows.size(1)}).to(at::kDouble);
  if (n == 0) return (flat / damping).to(v.scalar_type()).view(v.sizes());
  const at::Tensor gram = w.gram.narrow(0, 0, n).narrow(1, 0, n);
  const at::Tensor system = gram + at::eye(n, gram.options()) * (static_cast<double>(n) * damping);
  const at::Tensor coefficients = at::linalg_solve(system, at::mv(rows, flat));
  const at::Tensor result = (flat - at::mv(rows.t(), coefficients)) / damping;
  return result.to(v.scalar_type()).view(v.sizes());
}

int64_t window_bytes(const WindowTensors& w) {
  using support::bytes_of;
  return bytes_of(w.rows) + bytes_of(w.codes) + bytes_of(w.scales) + bytes_of(w.centroids) + bytes_of(w.gram);
}

}  // namespace lowbit::mfac
