// Kashin quantization (src/quant/kashin.h): the decomposition, the centroid fitting, the bit
// layout and the codec mapping, each against a dense fp64 reference written here.
#include <gtest/gtest.h>

#include "expect_error.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include "quant/kashin.h"

namespace lowbit {
namespace {

using testing::expect_error;

constexpr double kEps32 = std::numeric_limits<float>::epsilon();

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }

// Inputs that stress the frame: Gaussian rows, a spike (sparse in the standard basis), a
// column of Q (sparse in Q's basis), a constant row, and rows with one large outlier.
at::Tensor hard_blocks(int64_t d) {
  at::manual_seed(3);
  const at::Tensor q = kashin::frame(d, at::kCPU);
  at::Tensor spike = at::zeros({1, d});
  spike[0][d / 3] = 5;
  at::Tensor outliers = at::randn({8, d});
  outliers.select(1, 1).mul_(40);
  return at::cat({at::randn({32, d}), spike, q.select(1, 7).unsqueeze(0) * 3, at::ones({1, d}), outliers});
}

// The Lyubarskii-Vershynin truncation in fp64, as the library documents it.
struct Reference {
  at::Tensor u, v, r;
};
Reference reference_decomposition(const at::Tensor& x32, const at::Tensor& q32, int64_t rounds) {
  const at::Tensor x = x32.to(at::kDouble), q = q32.to(at::kDouble);
  const int64_t d = x.size(1);
  Reference ref{at::zeros_like(x), at::zeros_like(x), x.clone()};
  at::Tensor level = x.norm(2, {1}, true) * (kashin::kFirstLevel / std::sqrt(static_cast<double>(d)));
  for (int64_t k = 0; k < rounds; ++k) {
    const at::Tensor a = at::clamp(ref.r / 2, -level, level);
    const at::Tensor b = at::clamp(at::matmul(q.t(), ref.r.t()).t() / 2, -level, level);
    ref.u += a;
    ref.v += b;
    ref.r = ref.r - a - at::matmul(q, b.t()).t();
    level = level * kashin::kLevelDecay;
  }
  return ref;
}

TEST(KashinFrame, IsOrthogonalAndTheSameOnEveryCall) {
  for (int64_t d : {1, 5, 64, 257}) {
    const at::Tensor q = kashin::frame(d, at::kCPU).to(at::kDouble);
    // fp64 QR rounded to fp32: each entry off by <= eps32/2 * |q_ij| (+ the QR's own ~d eps64),
    // so |Q^T Q - I| <= 2 * sum_k |q_ki q_kj| * eps32/2 <= eps32 per entry (Cauchy-Schwarz), doubled.
    EXPECT_LE(max_abs(at::matmul(q.t(), q) - at::eye(d, at::kDouble)), 2 * kEps32) << "order " << d;
    EXPECT_TRUE(at::equal(kashin::frame(d, at::kCPU), kashin::frame(d, at::kCPU)));
  }
}

TEST(KashinDecomposition, OneRoundMatchesTheFp64Reference) {
  const int64_t d = 64;
  const at::Tensor x = hard_blocks(d), q = kashin::frame(d, at::kCPU);
  const kashin::Decomposition got = kashin::decompose(x, q, 1);
  const Reference ref = reference_decomposition(x, q, 1);
  // One round is clip(x/2) and clip(x Q / 2): the only fp32 error is the d-term product x Q,
  // at most gamma_d ||x||_2 ||Q e_j||_2 = d eps ||x||_2 per entry (clip is 1-Lipschitz); r
  // gains another such product. Both scaled by the row norm.
  const at::Tensor norms = x.to(at::kDouble).norm(2, {1}, true);
  const double tol = 2 * (d + 2) * kEps32;
  EXPECT_LE(max_abs((got.u.to(at::kDouble) - ref.u) / norms), tol);
  EXPECT_LE(max_abs((got.v.to(at::kDouble) - ref.v) / norms), tol);
  EXPECT_LE(max_abs((got.residual.to(at::kDouble) - ref.r) / norms), 2 * tol);
}

TEST(KashinDecomposition, ReconstructsExactlyAndBothFactorsAreFlat) {
  for (int64_t d : {16, 64, 256}) {
    const at::Tensor x = hard_blocks(d), q = kashin::frame(d, at::kCPU);
    const kashin::Decomposition got = kashin::decompose(x, q);
    const at::Tensor xd = x.to(at::kDouble), qd = q.to(at::kDouble);
    const at::Tensor u = got.u.to(at::kDouble), v = got.v.to(at::kDouble), r = got.residual.to(at::kDouble);
    const at::Tensor norms = xd.norm(2, {1}, true);
    // x = u + Q v + r holds in exact arithmetic every round (r is updated by exactly what
    // u and v gain). In fp32 each of the K rounds adds the rounding of one d-term product
    // (<= d eps ||r_k|| <= d eps ||x||) and of three additions: <= K (d + 3) eps ||x||.
    const at::Tensor identity = xd - u - at::matmul(v, qd.t()) - r;
    EXPECT_LE(max_abs(identity / norms), kashin::kIterations * (d + 3) * kEps32) << "order " << d;
    // ||u||_inf, ||v||_inf <= sum_k M_k = kFirstLevel (1 - eta^K) / (1 - eta) ||x||_2 / sqrt(d):
    // every round adds a term clipped at M_k (K fp32 additions: relative K eps on top).
    const double eta = kashin::kLevelDecay;
    const double levels = kashin::kFirstLevel * (1 - std::pow(eta, kashin::kIterations)) / (1 - eta);
    const double bound = levels * (1 + kashin::kIterations * kEps32) / std::sqrt(static_cast<double>(d));
    EXPECT_LE(max_abs(u / norms), bound) << "order " << d;
    EXPECT_LE(max_abs(v / norms), bound) << "order " << d;
    // Lyubarskii-Vershynin (Thm 3.5): if [I, Q] / sqrt(2) satisfies the uncertainty principle
    // with (eta, delta) and M_k = eta^k ||x|| / sqrt(delta N) (here N = 2d, M_0 = kFirstLevel
    // ||x|| / sqrt(d), delta = 5.6), then ||r_k|| <= eta^k ||x||. The spike and the column of Q
    // are the inputs a frame without the principle fails on (with Q = I a spike of order 64 keeps 0.6 of
    // its norm), and levels too low for the frame fail on them too (kashin.h); the fp32 floor
    // is the identity's bound above.
    const double floor = kashin::kIterations * (d + 3) * kEps32 * std::sqrt(static_cast<double>(d));
    EXPECT_LE(r.norm(2, {1}, true).div(norms).max().item<double>(),
              std::pow(eta, kashin::kIterations) + floor)
        << "order " << d;
  }
}

// Absorbed entries of the residual shrink by cancellation towards the denormal range, where
// x86 products are an order of magnitude slower (kashin.cpp); the decomposition sets them to
// 0 below 2^-60 of the block's norm, so no factor or residual holds a denormal.
TEST(KashinDecomposition, NoDenormalsAreLeftInTheFactors) {
  const int64_t d = 128;
  const kashin::Decomposition got = kashin::decompose(hard_blocks(d), kashin::frame(d, at::kCPU));
  for (const at::Tensor& t : {got.u, got.v, got.residual}) {
    const at::Tensor magnitude = t.abs();
    EXPECT_FALSE(((magnitude > 0) & (magnitude < std::numeric_limits<float>::min())).any().item<bool>());
  }
}

TEST(KashinCentroids, GridIsThePapersInitialisation) {
  const at::Tensor points = at::tensor({-2.0, 1.0, 4.0, -1.0, 0.5, 3.0}, at::kDouble).view({3, 2});
  for (int64_t bits : {3, 4}) {
    const at::Tensor grid = kashin::grid_centroids(points, bits);
    const int64_t nu = bits == 4 ? 4 : 4, nv = bits == 4 ? 4 : 2;
    ASSERT_EQ(grid.size(0), nu * nv);
    for (int64_t i = 0; i < nu; ++i)
      for (int64_t j = 0; j < nv; ++j) {
        EXPECT_NEAR(grid[i * nv + j][0].item<double>(), -2.0 + 6.0 * i / (nu - 1), 1e-12);
        EXPECT_NEAR(grid[i * nv + j][1].item<double>(), -1.0 + 4.0 * j / (nv - 1), 1e-12);
      }
  }
}

// The fp64 reference Lloyd step: nearest centroid by explicit distances, then cell means.
at::Tensor reference_lloyd_step(const at::Tensor& p, const at::Tensor& c) {
  const at::Tensor pd = p.to(at::kDouble), cd = c.to(at::kDouble);
  at::Tensor out = cd.clone();
  const auto n = pd.size(0), k = cd.size(0);
  std::vector<double> sx(k, 0), sy(k, 0), count(k, 0);
  auto pa = pd.accessor<double, 2>();
  auto ca = cd.accessor<double, 2>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t best = 0;
    double best_d = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      const double dx = pa[i][0] - ca[j][0], dy = pa[i][1] - ca[j][1], dist = dx * dx + dy * dy;
      if (dist < best_d) best_d = dist, best = j;
    }
    sx[best] += pa[i][0], sy[best] += pa[i][1], count[best] += 1;
  }
  for (int64_t j = 0; j < k; ++j)
    if (count[j] > 0) out[j][0] = sx[j] / count[j], out[j][1] = sy[j] / count[j];
  return out;
}

double distortion(const at::Tensor& p, const at::Tensor& c) {
  const at::Tensor pd = p.to(at::kDouble), cd = c.to(at::kDouble);
  return std::get<0>((pd.unsqueeze(1) - cd.unsqueeze(0)).pow(2).sum(2).min(1)).sum().item<double>();
}

TEST(KashinCentroids, LloydStepMovesEachCentroidToTheMeanOfItsCell) {
  // Four tight clusters (spread 0.05) far apart (>= 2) and one centroid with no points: no
  // point is near a tie, so fp32 and fp64 assign identically.
  at::manual_seed(5);
  const at::Tensor centers = at::tensor({0.0f, 0.0f, 2.0f, 0.0f, 0.0f, 2.0f, 2.0f, 2.0f}).view({4, 2});
  const at::Tensor points = (centers.repeat({250, 1}) + 0.05 * at::randn({1000, 2})).contiguous();
  const at::Tensor start = at::cat({centers + 0.3, at::full({1, 2}, 9.0f)});
  const at::Tensor got = kashin::lloyd_step(points, start).to(at::kDouble);
  const at::Tensor want = reference_lloyd_step(points, start);
  // A mean of n fp32 values: <= n eps max|p| (sequential sum), n <= 1000.
  EXPECT_LE(max_abs(got - want), 1000 * kEps32 * max_abs(points));
  EXPECT_EQ(got[4][0].item<double>(), 9.0);  // the empty cell's centroid stays
}

TEST(KashinCentroids, DistortionNeverIncreasesOnKashinPairs) {
  at::manual_seed(6);
  const at::Tensor x = at::randn({64, 64});
  const kashin::Decomposition dec = kashin::decompose(x, kashin::frame(64, at::kCPU));
  const at::Tensor s = x.norm(2, {1}, true) / 8;
  const at::Tensor points = at::stack({((dec.u + dec.residual) / s).reshape({-1}), (dec.v / s).reshape({-1})}, 1);
  const int64_t n = points.size(0);
  at::Tensor c = kashin::grid_centroids(points, 4);
  double previous = distortion(points, c);
  for (int i = 0; i < 12; ++i) {
    c = kashin::lloyd_step(points, c);
    // Exact Lloyd never increases the distortion. The fp32 means are off by <= n eps max|p|
    // per coordinate, which moves each point's squared distance by <= 2 * 2R * that (R: the
    // largest coordinate distance, <= 2 max|p|) plus its square.
    const double delta = n * kEps32 * max_abs(points), radius = 2 * max_abs(points);
    const double now = distortion(points, c);
    EXPECT_LE(now, previous + n * (4 * radius * delta + 2 * delta * delta)) << "step " << i;
    previous = now;
  }
}

TEST(KashinPacking, MatchesTheCodecBitLayout) {
  at::manual_seed(7);
  for (int64_t bits : {3, 4})
    for (int64_t cols : {1, 7, 8, 9, 64, 1057}) {
      const at::Tensor idx = at::randint(0, 1 << bits, {3, cols}, at::kByte);
      const at::Tensor packed = kashin::pack_rows(idx, bits);
      ASSERT_EQ(packed.size(1), packed_row_bytes(cols, bits));
      // Reference: element k of a row in bits k*bits .. k*bits+bits-1 of its little-endian stream.
      for (int64_t r = 0; r < 3; ++r)
        for (int64_t k = 0; k < cols; ++k) {
          int64_t value = 0;
          for (int64_t b = 0; b < bits; ++b) {
            const int64_t bit = k * bits + b;
            value |= ((packed[r][bit / 8].item<int64_t>() >> (bit % 8)) & 1) << b;
          }
          ASSERT_EQ(value, idx[r][k].item<int64_t>()) << "bits " << bits << " cols " << cols;
        }
      EXPECT_TRUE(at::equal(kashin::unpack_rows(packed, bits, cols), idx));
    }
}

QuantOptions kashin_options(int bits = 4, int64_t block = 64, bool keep_diagonal = false) {
  QuantOptions o;
  o.mapping = Mapping::Kashin;
  o.bits = bits;
  o.block_size = block;
  o.keep_diagonal = keep_diagonal;
  return o;
}

// Decodes q in fp64 from its stored parts and the frame: s * (c_u[i] + Q c_v[i]) per block.
at::Tensor reference_decode(const QuantizedMatrix& q) {
  const int64_t rows = q.rows(), cols = q.cols(), block = q.options().block_size;
  const at::Tensor idx = kashin::unpack_rows(q.codes(), q.options().bits, cols).to(at::kLong);
  const at::Tensor c = q.centroids().to(at::kDouble), s = q.scales().to(at::kDouble);
  at::Tensor out = at::zeros({rows, cols}, at::kDouble);
  for (int64_t start = 0, b = 0; start < cols; start += block, ++b) {
    const int64_t len = std::min(block, cols - start);
    const at::Tensor qd = kashin::frame(len, at::kCPU).to(at::kDouble);
    const at::Tensor i = idx.narrow(1, start, len);
    const at::Tensor x = c.select(1, 0).index({i}) + at::matmul(c.select(1, 1).index({i}), qd.t());
    out.narrow(1, start, len).copy_(x * s.narrow(1, b, 1));
  }
  if (q.diagonal().defined()) out.diagonal().copy_(q.diagonal());
  return out;
}

TEST(KashinCodec, DecodesAsTheFp64ReferenceOnOddShapes) {
  at::manual_seed(8);
  struct Case {
    int64_t rows, cols;
    QuantOptions options;
  };
  for (const Case& c : {Case{33, 1057, kashin_options()}, Case{67, 67, kashin_options(4, 16, true)},
                        Case{5, 40, kashin_options(3, 64)}, Case{1, 3, kashin_options(3, 16)},
                        Case{130, 64, kashin_options(4, 64)}}) {
    const at::Tensor m = at::randn({c.rows, c.cols}) * at::rand({c.rows, 1}) * 10;
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, c.options);
    const at::Tensor got = q.dequantize(at::kDouble), want = reference_decode(q);
    // fp32 decode: s (c_u + Q c_v) with a len-term product: <= (len + 2) eps s (|c| + |c| sqrt(len)).
    const double len = static_cast<double>(std::min(c.options.block_size, c.cols));
    const double tol = (len + 2) * kEps32 * max_abs(q.scales()) * max_abs(q.centroids()) * (1 + std::sqrt(len));
    EXPECT_LE(max_abs(got - want), tol) << c.rows << " x " << c.cols;
    EXPECT_TRUE(at::isfinite(got).all().item<bool>());
  }
}

TEST(KashinCodec, ZeroBlocksDecodeToZeroAndTheIdentityKeepsItsDiagonal) {
  const at::Tensor eye = at::eye(200);
  const QuantizedMatrix q = QuantizedMatrix::quantize(eye, kashin_options(4, 64, true));
  EXPECT_TRUE(at::equal(q.dequantize(), eye));  // every off-diagonal block is zero: scale 0
  const QuantizedMatrix z = QuantizedMatrix::quantize(at::zeros({3, 70}), kashin_options());
  EXPECT_TRUE(at::equal(z.dequantize(), at::zeros({3, 70})));
}

TEST(KashinCodec, StateRoundTripAndStorage) {
  at::manual_seed(9);
  const at::Tensor m = at::randn({67, 67});
  for (const QuantOptions& o : {kashin_options(), kashin_options(3, 16, true)}) {
    const QuantizedMatrix q = QuantizedMatrix::quantize(m, o);
    const QuantizedMatrix back = QuantizedMatrix::from_state(q.state());
    EXPECT_TRUE(at::equal(back.dequantize(), q.dequantize()));
    EXPECT_EQ(back.options(), q.options());
    EXPECT_EQ(q.nbytes(), QuantizedMatrix::storage_bytes(67, 67, o));
  }
  // 4-bit codes of (u_i, v_i) + one fp32 norm per 64 elements + 16 fp32 centroid pairs:
  // 4.5 bits per element, as 4-bit linear-2, plus 128 bytes per matrix.
  QuantOptions linear2;
  EXPECT_EQ(QuantizedMatrix::storage_bytes(1024, 1024, kashin_options()),
            QuantizedMatrix::storage_bytes(1024, 1024, linear2) + 128);
  EXPECT_EQ(QuantizedMatrix::storage_bytes(1024, 1024, linear2) * 8, 1024 * 1024 * 9 / 2);
}

TEST(KashinCodec, StacksAndSelectEqualSeparateCalls) {
  at::manual_seed(10);
  const at::Tensor stack = at::randn({3, 40, 40});
  const auto coded = QuantizedMatrix::quantize_stack(stack, kashin_options(4, 16, true));
  at::Tensor out = at::empty({3, 40, 40});
  std::vector<const QuantizedMatrix*> ptrs;
  for (const auto& q : coded) ptrs.push_back(&q);
  QuantizedMatrix::dequantize_stack(ptrs, out);
  for (int64_t i = 0; i < 3; ++i) {
    const QuantizedMatrix alone = QuantizedMatrix::quantize(stack[i], kashin_options(4, 16, true));
    EXPECT_TRUE(at::equal(out[i], alone.dequantize()));
  }
  const QuantizedMatrix chosen = QuantizedMatrix::select(at::scalar_tensor(false, at::kBool), coded[0], coded[1]);
  EXPECT_TRUE(at::equal(chosen.dequantize(), coded[1].dequantize()));
}

TEST(KashinCodec, RejectsUnsupportedOptionsAndBadStates) {
  const at::Tensor m = at::randn({8, 32});
  QuantOptions o = kashin_options(8);
  expect_error([&] { QuantizedMatrix::quantize(m, o); }, "QuantOptions.bits must be 3 or 4 with mapping \"kashin\"");
  o = kashin_options();
  o.rounding = Rounding::Stochastic;
  expect_error([&] { QuantizedMatrix::quantize(m, o); }, "QuantOptions.rounding must be \"nearest\"");
  o = kashin_options();
  o.double_quant_scales = true;
  expect_error([&] { QuantizedMatrix::quantize(m, o); }, "QuantOptions.double_quant_scales is not supported");
  expect_error([&] { codebook(Mapping::Kashin, 4); }, "mapping \"kashin\" has no fixed code table");
  // Non-finite input is refused as by the table codec (first bad element named); a double
  // beyond float32 range counts, as it would become Inf.
  at::Tensor bad = m.clone();
  bad[5][17] = std::numeric_limits<float>::infinity();
  expect_error([&] { QuantizedMatrix::quantize(bad, kashin_options()); }, "NaN or Inf (or a value beyond float32 range), first at [5, 17]");
  at::Tensor huge = m.to(at::kDouble);
  huge[2][3] = 1e300;
  expect_error([&] { QuantizedMatrix::quantize(huge, kashin_options()); }, "first at [2, 3]");
  EXPECT_EQ(parse_mapping("kashin"), Mapping::Kashin);
  EXPECT_EQ(to_string(Mapping::Kashin), "kashin");

  const auto state = QuantizedMatrix::quantize(m, kashin_options()).state();
  auto without = state;
  without.erase("centroids");
  expect_error([&] { QuantizedMatrix::from_state(without); }, "the state has no \"centroids\" entry");
  auto wrong_shape = state;
  wrong_shape["centroids"] = at::zeros({8, 2});
  expect_error([&] { QuantizedMatrix::from_state(wrong_shape); }, "\"centroids\" must be float32 of shape [16, 2]");
  auto nan = state;
  nan["centroids"] = at::full({16, 2}, std::nan(""));
  expect_error([&] { QuantizedMatrix::from_state(nan); }, "centroids");
  auto eight = state;
  eight["meta"] = state.at("meta").clone();
  eight["meta"][2] = 8;
  expect_error([&] { QuantizedMatrix::from_state(eight); }, "with mapping kashin; expected 3 or 4");
  // A table-coded state with centroids is not what it claims to be; one without loads as before.
  auto table = QuantizedMatrix::quantize(m, QuantOptions{}).state();
  EXPECT_TRUE(at::equal(QuantizedMatrix::from_state(table).dequantize(), QuantizedMatrix::quantize(m).dequantize()));
  table["centroids"] = at::zeros({16, 2});
  expect_error([&] { QuantizedMatrix::from_state(table); }, "its mapping is not kashin");
}

}  // namespace
}  // namespace lowbit
