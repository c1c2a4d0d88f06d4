#include "quant/kashin.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <map>
#include <mutex>
#include <vector>

#include <lowbit/quantized_matrix.h>

#include "quant/counter_rng.h"

namespace lowbit::kashin {
namespace {

// A standard normal number as a pure function of (seed, index): Box-Muller on two 53-bit
// uniforms in (0, 1), so the frame does not depend on torch's generator or its version.
double gaussian(uint64_t seed, uint64_t index) {
  constexpr double kTwoPi = 6.283185307179586;
  const double u1 = (static_cast<double>(mix64(seed, 2 * index) >> 11) + 0.5) * 0x1.0p-53;
  const double u2 = (static_cast<double>(mix64(seed, 2 * index + 1) >> 11) + 0.5) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

at::Tensor make_frame(int64_t order) {
  std::vector<double> values(static_cast<size_t>(order * order));
  for (size_t i = 0; i < values.size(); ++i) values[i] = gaussian(kFrameSeed + static_cast<uint64_t>(order), i);
  const at::Tensor g = at::tensor(values, at::kDouble).view({order, order});
  auto [q, r] = at::linalg_qr(g);
  // Q R with R's diagonal made positive: the Haar-distributed Q of the Gaussian matrix.
  q = q * at::sign(r.diagonal()).unsqueeze(0);
  return q.to(at::kFloat).contiguous();
}

struct Part {  // the full blocks or the partial last block of every row, as [n, len]
  at::Tensor blocks;
  int64_t len = 0;
};

}  // namespace

at::Tensor frame(int64_t order, const at::Device& device) {
  TORCH_CHECK(order >= 1, "lowbit::kashin::frame: order must be >= 1; got ", order);
  static std::mutex mutex;
  static std::map<std::pair<int64_t, std::string>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& cpu = cache[{order, "cpu"}];
  if (!cpu.defined()) cpu = make_frame(order);
  if (device.is_cpu()) return cpu;
  auto& on_device = cache[{order, device.str()}];
  if (!on_device.defined()) on_device = cpu.to(device);
  return on_device;
}

Decomposition decompose(const at::Tensor& blocks, const at::Tensor& q, int64_t iterations, double first_level,
                        double level_decay) {
  TORCH_CHECK(blocks.dim() == 2 && q.dim() == 2 && q.size(0) == blocks.size(1) && q.size(1) == blocks.size(1),
              "lowbit::kashin::decompose: blocks must be [n, d] and the frame [d, d]");
  const int64_t d = blocks.size(1);
  at::Tensor r = blocks.clone();
  at::Tensor u = at::zeros_like(blocks);
  at::Tensor v = at::zeros_like(blocks);
  // Rows are blocks: Q^T r is r Q and Q b is b Q^T in row form.
  const at::Tensor qt = q.t();
  const at::Tensor norms = blocks.norm(2, {1}, /*keepdim=*/true);
  at::Tensor level = norms * (first_level / std::sqrt(static_cast<double>(d)));
  // Entries the rounds have absorbed keep shrinking (by cancellation, to 1e-24 of ||x|| in 5
  // rounds) into the denormal range, where x86 products run ~45x slower: a 400k-element
  // AdamW moment took 7 s to encode, 5.5 s of it in the two products below. Under 2^-60
  // ||x|| (fp32 resolves 2^-24 of it) they are set to 0.
  const at::Tensor negligible = norms * 0x1p-60;
  for (int64_t k = 0; k < iterations; ++k) {
    // Coefficients of r in the tight frame [I, Q] (frame bound 2), truncated at the level.
    const at::Tensor a = at::maximum(at::minimum(r * 0.5, level), -level);
    const at::Tensor b = at::maximum(at::minimum(at::matmul(r, q) * 0.5, level), -level);
    u.add_(a);
    v.add_(b);
    r = r - a - at::matmul(b, qt);
    r.masked_fill_(r.abs() < negligible, 0);
    level = level * level_decay;
  }
  return {u, v, r};
}

at::Tensor grid_centroids(const at::Tensor& points, int64_t bits) {
  const int64_t nu = int64_t{1} << ((bits + 1) / 2), nv = int64_t{1} << (bits / 2);
  const at::Tensor lo = std::get<0>(points.min(0)), hi = std::get<0>(points.max(0));
  const at::Tensor steps_u = at::arange(nu, points.options()) / static_cast<double>(nu - 1);
  const at::Tensor steps_v = at::arange(nv, points.options()) / static_cast<double>(std::max<int64_t>(nv - 1, 1));
  const at::Tensor gu = lo[0] + (hi[0] - lo[0]) * steps_u;
  const at::Tensor gv = lo[1] + (hi[1] - lo[1]) * steps_v;
  return at::stack({gu.repeat_interleave(nv), gv.repeat({nu})}, 1);
}

at::Tensor nearest_centroid(const at::Tensor& points, const at::Tensor& centroids) {
  // Differences, not the expanded |p|^2 - 2 p.c + |c|^2, so that near-ties are decided by
  // the true distances and not by cancellation.
  // In chunks, so the [chunk, 2^bits, 2] differences stay a few MB whatever the matrix.
  constexpr int64_t kChunk = 65536;
  std::vector<at::Tensor> cells;
  for (int64_t start = 0; start < points.size(0); start += kChunk) {
    const at::Tensor p = points.narrow(0, start, std::min(kChunk, points.size(0) - start));
    cells.push_back((p.unsqueeze(1) - centroids.unsqueeze(0)).pow(2).sum(2).argmin(1));
  }
  if (cells.empty()) return at::empty({0}, points.options().dtype(at::kLong));
  return at::cat(cells);
}

at::Tensor lloyd_step(const at::Tensor& points, const at::Tensor& centroids) {
  const int64_t k = centroids.size(0);
  const at::Tensor cell = nearest_centroid(points, centroids);
  const at::Tensor sums = at::zeros_like(centroids).index_add_(0, cell, points);
  const at::Tensor counts = at::zeros({k}, points.options()).index_add_(0, cell, at::ones_like(cell, points.options()));
  const at::Tensor empty = (counts == 0).unsqueeze(1);
  return at::where(empty, centroids, sums / counts.clamp_min(1).unsqueeze(1));
}

at::Tensor fit_centroids(const at::Tensor& points, int64_t bits, int64_t iterations) {
  const int64_t k = int64_t{1} << bits;
  if (points.size(0) == 0) return at::zeros({k, 2}, points.options().dtype(at::kFloat));
  at::Tensor centroids = grid_centroids(points, bits);
  for (int64_t i = 0; i < iterations; ++i) centroids = lloyd_step(points, centroids);
  return centroids.to(at::kFloat);
}

namespace {

std::vector<Part> parts_of(const at::Tensor& matrix, int64_t block_size) {
  const int64_t rows = matrix.size(0), cols = matrix.size(1);
  const int64_t full = cols / block_size, tail = cols % block_size;
  std::vector<Part> parts;
  if (full > 0)
    parts.push_back({matrix.narrow(1, 0, full * block_size).reshape({rows * full, block_size}), block_size});
  if (tail > 0) parts.push_back({matrix.narrow(1, full * block_size, tail), tail});
  return parts;
}

}  // namespace

Code encode(const at::Tensor& matrix, int64_t bits, int64_t block_size) {
  TORCH_CHECK(bits == 3 || bits == 4, "lowbit::kashin::encode: bits must be 3 or 4; got ", bits);
  const at::Tensor x = matrix.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t full = cols / block_size;
  std::vector<Part> parts = parts_of(x, block_size);
  std::vector<at::Tensor> scale_parts, u_parts, v_parts, nonzero;
  for (const Part& p : parts) {
    const at::Tensor scale = p.blocks.norm(2, {1}, true) / std::sqrt(static_cast<double>(p.len));
    Decomposition dec = decompose(p.blocks, frame(p.len, x.device()));
    // The residual after the last round (below eta^K ||x||) goes into u, so that the pair
    // (u, v) represents x exactly before its entries are rounded to centroids.
    const at::Tensor safe = at::where(scale > 0, scale, at::ones_like(scale));
    scale_parts.push_back(scale);
    u_parts.push_back(((dec.u + dec.residual) / safe).reshape({-1}));
    v_parts.push_back((dec.v / safe).reshape({-1}));
    nonzero.push_back((scale > 0).expand({p.blocks.size(0), p.len}).reshape({-1}));
  }
  const at::Tensor points = at::stack({at::cat(u_parts), at::cat(v_parts)}, 1);
  // Blocks that are all zero decode to 0 whatever their index; they take no part in fitting.
  at::Tensor fitting = points.index({at::cat(nonzero)});
  if (fitting.size(0) > kLloydMaxPoints) {
    const int64_t stride = (fitting.size(0) + kLloydMaxPoints - 1) / kLloydMaxPoints;
    fitting = fitting.slice(0, 0, fitting.size(0), stride);
  }
  Code code;
  code.centroids = fit_centroids(fitting, bits);
  const at::Tensor all_indices = nearest_centroid(points, code.centroids).to(at::kByte);
  code.indices = at::empty({rows, cols}, x.options().dtype(at::kByte));
  code.scales = at::empty({rows, blocks_per_row(cols, block_size)}, x.options());
  int64_t offset = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Part& p = parts[i];
    const int64_t n = p.blocks.numel();
    const at::Tensor idx = all_indices.narrow(0, offset, n);
    offset += n;
    if (p.len == block_size && full > 0) {
      code.indices.narrow(1, 0, full * block_size).copy_(idx.view({rows, full * block_size}));
      code.scales.narrow(1, 0, full).copy_(scale_parts[i].view({rows, full}));
    } else {
      code.indices.narrow(1, full * block_size, p.len).copy_(idx.view({rows, p.len}));
      code.scales.narrow(1, full, 1).copy_(scale_parts[i].view({rows, 1}));
    }
  }
  return code;
}

void decode_into(const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& centroids, int64_t block_size,
                 const at::Tensor& out) {
  const int64_t rows = indices.size(0), cols = indices.size(1);
  const int64_t full = cols / block_size, tail = cols % block_size;
  const at::Tensor idx = indices.to(at::kLong);
  const at::Tensor c = centroids.to(out.device(), at::kFloat);
  const at::Tensor cu = c.select(1, 0).index({idx});
  const at::Tensor cv = c.select(1, 1).index({idx});
  auto block_values = [&](int64_t start, int64_t len, int64_t count, const at::Tensor& s) {
    const at::Tensor u = cu.narrow(1, start, count * len).reshape({rows * count, len});
    const at::Tensor v = cv.narrow(1, start, count * len).reshape({rows * count, len});
    return ((u + at::matmul(v, frame(len, out.device()).t())) * s.reshape({rows * count, 1})).view({rows, count * len});
  };
  if (full > 0) out.narrow(1, 0, full * block_size).copy_(block_values(0, block_size, full, scales.narrow(1, 0, full)));
  if (tail > 0) out.narrow(1, full * block_size, tail).copy_(block_values(full * block_size, tail, 1, scales.narrow(1, full, 1)));
}

at::Tensor pack_rows(const at::Tensor& indices, int64_t bits) {
  TORCH_CHECK(bits == 3 || bits == 4, "lowbit::kashin::pack_rows: bits must be 3 or 4; got ", bits);
  const int64_t rows = indices.size(0), cols = indices.size(1);
  const int64_t group = bits == 4 ? 2 : 8;  // codes that fill whole bytes: 2 x 4 bits, 8 x 3 bits
  const int64_t padded = (cols + group - 1) / group * group;
  at::Tensor c = at::zeros({rows, padded}, indices.options().dtype(at::kInt));
  c.narrow(1, 0, cols).copy_(indices);
  c = c.view({rows, padded / group, group});
  const at::Tensor shifts = at::arange(group, c.options()) * bits;
  const at::Tensor word = at::bitwise_left_shift(c, shifts).sum(2, false, at::kInt);
  const int64_t bytes_per_group = group * bits / 8;
  std::vector<at::Tensor> bytes;
  for (int64_t b = 0; b < bytes_per_group; ++b) bytes.push_back(at::bitwise_and(at::bitwise_right_shift(word, 8 * b), 255));
  const at::Tensor packed = at::stack(bytes, 2).view({rows, padded / group * bytes_per_group});
  return packed.narrow(1, 0, packed_row_bytes(cols, bits)).to(at::kByte).contiguous();
}

at::Tensor unpack_rows(const at::Tensor& packed, int64_t bits, int64_t cols) {
  TORCH_CHECK(bits == 3 || bits == 4, "lowbit::kashin::unpack_rows: bits must be 3 or 4; got ", bits);
  const int64_t rows = packed.size(0), width = packed.size(1);
  const int64_t group = bits == 4 ? 2 : 8;
  const int64_t bytes_per_group = group * bits / 8;
  const int64_t groups = (width + bytes_per_group - 1) / bytes_per_group;
  at::Tensor p = at::zeros({rows, groups * bytes_per_group}, packed.options().dtype(at::kInt));
  p.narrow(1, 0, width).copy_(packed);
  p = p.view({rows, groups, bytes_per_group});
  const at::Tensor byte_shifts = at::arange(bytes_per_group, p.options()) * 8;
  const at::Tensor word = at::bitwise_left_shift(p, byte_shifts).sum(2, true, at::kInt);
  const at::Tensor code_shifts = at::arange(group, p.options()) * bits;
  const at::Tensor codes = at::bitwise_and(at::bitwise_right_shift(word, code_shifts), (1 << bits) - 1);
  return codes.view({rows, groups * group}).narrow(1, 0, cols).to(at::kByte).contiguous();
}

}  // namespace lowbit::kashin
