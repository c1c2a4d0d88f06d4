// Seeded fuzzing of the codec (lowbit::QuantizedMatrix and the torch.ops.lowbit codec ops):
// random shapes (empty, one element, odd orders, non-square, block edges), options, input
// dtypes and extreme values (NaN, +-Inf, subnormals, +-3e38, values beyond float32), and
// corrupted states for from_state. Each case either raises a c10::Error whose message names
// the offending input, or returns a result checked against an independent reference: the
// error bound derived below for quantize, an element-by-element decode written here for
// from_state and the ops. Never a crash, a hang or a silently wrong result.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <lowbit/codebook.h>
#include <lowbit/quantized_matrix.h>

#include "codec_reference.h"
#include "fuzz_support.h"

namespace lowbit {
namespace {

using State = std::map<std::string, at::Tensor>;
using testing::CaseRng;
using testing::Outcome;
using testing::outcome_of;

// ------------------------------------------------------------------ the error bound
// One block with effective scale s (the stored fp32 absmax, or under double quantization
// the dequantized scale, which is rounded up so that s >= every |x| of the block). Let
// u = 2^-24 (fp32 unit roundoff) and t = 2^-149 (the smallest subnormal float).
//
// Nearest rounding picks index k = #{j : x > fl(m_j s)} with m_j the midpoints of the
// sorted table c_0 < ... < c_{n-1}, and returns y = fl(c_k s).
//  * With exact thresholds m_j s, c_k is the code nearest to x / s in [-1, 1], so
//    |x - c_k s| <= E s, where E = max_rounding_error(table): half the widest gap, or the
//    distance from -1 / +1 to the outermost code (the dynamic tree has no -1), which is
//    docs/codec.md's "half the codebook's largest gap x block absmax" made exact at the ends.
//  * fl(m_j s) differs from m_j s by at most u |m_j s| <= u s (normal range) or t/2
//    (subnormal range). x can only land on the other side of a threshold when it lies
//    within that distance of the exact midpoint, where both neighbours are at most
//    gap_j / 2 * s + u s + t/2 away: the bound grows by u s + t/2.
//  * fl(c_k s) adds |c_k s| u <= u s, or t/2 when the product is subnormal.
// So |x - y| <= s (E + 2u) + t. Stochastic rounding picks one of the two codes around
// q = fl(x / s) (|q - x / s| <= u, q clamped to the table): |x - c s| <= s (max(G, E) + u)
// with G the widest gap, and the product adds u s + t/2: |x - y| <= s (max(G, E) + 2u) + t.
// The bounds below use 2^-22 for 2u and 2t, leaving room for the test's own arithmetic
// (done in double, exact for these operands).
double nearest_bound(double s, double E) { return s * (E + 0x1p-22) + 0x1p-148; }
double stochastic_bound(double s, double G, double E) { return s * (std::max(G, E) + 0x1p-22) + 0x1p-148; }

// ------------------------------------------------------------------ generators
int64_t random_dim(CaseRng& r) {
  switch (r.between(0, 9)) {
    case 0: return 0;
    case 1: return 1;
    case 2:
    case 3: return 2 * r.between(0, 20) + 1;  // odd orders
    case 4:
    case 5:
    case 6: return r.between(2, 80);
    case 7: return r.between(100, 300);
    case 8: return (int64_t{16} << r.between(0, 3)) * r.between(1, 3) + r.between(-1, 1);  // block edges
    default: return r.between(1, 40);
  }
}

QuantOptions random_options(CaseRng& r) {
  QuantOptions o;
  o.bits = static_cast<int>(r.one_of(std::vector<int64_t>{3, 4, 8}));
  o.mapping = static_cast<Mapping>(r.between(0, 2));
  o.block_size = r.chance(0.85) ? (int64_t{16} << r.between(0, 4)) : (int64_t{16} << r.between(5, 8));
  o.rounding = r.chance(0.3) ? Rounding::Stochastic : Rounding::Nearest;
  o.seed = r.bits();
  o.double_quant_scales = r.chance(0.3);
  return o;
}

at::ScalarType random_dtype(CaseRng& r) {
  const int64_t k = r.between(0, 19);
  if (k < 10) return at::kFloat;
  if (k < 14) return at::kDouble;
  if (k < 17) return at::kBFloat16;
  return at::kHalf;
}

// Values of interest for each input dtype, given as doubles and cast to the dtype.
std::vector<double> special_values(at::ScalarType dtype) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  std::vector<double> v = {nan, inf, -inf, 0.0, -0.0, 1.0, -1.0};
  switch (dtype) {
    case at::kFloat:
      v.insert(v.end(), {FLT_MAX, -FLT_MAX, 3e38, -3e38, FLT_TRUE_MIN, -FLT_TRUE_MIN, 1e-40, FLT_MIN, 1e-30});
      break;
    case at::kDouble:
      // 3.4028235e38 rounds to FLT_MAX; 3.40282357e38 is past the half-ulp and overflows.
      v.insert(v.end(), {1e39, -1e300, 1e-310, -1e-320, FLT_MAX, 3.4028235e38, 3.40282357e38, DBL_MAX, FLT_TRUE_MIN});
      break;
    case at::kBFloat16:
      v.insert(v.end(), {3.3895313892515355e38, -3.3895313892515355e38, 9.2e-41, 1e-38});
      break;
    default:  // half
      v.insert(v.end(), {65504.0, -65504.0, 5.9604644775390625e-8, 6.1e-5, 65520.0});
      break;
  }
  return v;
}

// A rows x cols matrix of `dtype`: Gaussian rows at magnitudes from one of several regimes,
// sometimes with special values at random places, sometimes as a non-contiguous view.
at::Tensor random_matrix(CaseRng& r, int64_t rows, int64_t cols, at::ScalarType dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(r.bits());
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor m = at::randn({rows, cols}, gen, f64);
  double lo = -3, hi = 3;  // decimal exponents of the row magnitudes
  switch (r.between(0, 9)) {
    case 0: m.zero_(); break;
    case 1: lo = hi = 0; m.fill_(r.uniform(-2, 2)); break;  // constant
    case 2:
    case 3:  // the whole range of the dtype (overflowing its edges at times)
      if (dtype == at::kHalf) lo = -9, hi = 4.8;
      else if (dtype == at::kDouble) lo = -330, hi = 39;
      else lo = -46, hi = 38.5;
      break;
    case 4: lo = hi = dtype == at::kHalf ? -6 : -40; break;  // all subnormal (or flushed)
    default: break;
  }
  if (rows > 0) {
    const at::Tensor exps = at::empty({rows, 1}, f64).uniform_(lo, hi, gen);
    m = m * at::pow(10.0, exps);
  }
  if (rows * cols > 0 && r.chance(0.35)) {
    const std::vector<double> specials = special_values(dtype);
    for (int64_t k = r.between(1, 3); k > 0; --k)
      m[r.between(0, rows - 1)][r.between(0, cols - 1)] = r.one_of(specials);
  }
  at::Tensor out = m.to(dtype);
  switch (r.between(0, 9)) {
    case 0: out = out.t().contiguous().t(); break;  // column-major
    case 1: {  // every other column of a wider matrix
      at::Tensor wide = at::zeros({rows, 2 * cols}, out.options());
      wide.slice(1, 0, 2 * cols, 2).copy_(out);
      out = wide.slice(1, 0, 2 * cols, 2);
      break;
    }
    default: break;
  }
  return out;
}

// ------------------------------------------------------------------ reference decode
// y[r][c] = fl(table[code] * s_block) with s_block the fp32 scale, or under double
// quantization fl(scale_table[scale_code] * group_max[block / 256]); the diagonal, when
// given, replaces y[r][r]. Written from docs/codec.md's layout, independently of the kernels.
std::vector<float> reference_decode(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& group_max,
                                    const at::Tensor& table_t, const at::Tensor& diagonal, int bits,
                                    int64_t block_size, int64_t rows, int64_t cols) {
  const std::vector<int> idx = rows * cols > 0 ? testing::read_bitstream_codes(codes, bits, cols) : std::vector<int>{};
  const int64_t blocks = blocks_per_row(cols, block_size);
  std::vector<float> scale(rows * blocks);
  if (group_max.defined()) {
    const at::Tensor sc = scales.contiguous(), gm = group_max.contiguous();
    const std::vector<float> st = scale_codebook_values();
    for (int64_t i = 0; i < rows * blocks; ++i)
      scale[i] = st[sc.data_ptr<uint8_t>()[i]] * gm.data_ptr<float>()[i / kScaleGroupSize];
  } else if (rows * blocks > 0) {
    const at::Tensor sc = scales.contiguous();
    std::memcpy(scale.data(), sc.data_ptr<float>(), sizeof(float) * rows * blocks);
  }
  const at::Tensor table = table_t.contiguous();
  std::vector<float> y(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      y[r * cols + c] = table.data_ptr<float>()[idx[r * cols + c]] * scale[r * blocks + c / block_size];
  if (diagonal.defined() && diagonal.numel() > 0) {
    const at::Tensor d = diagonal.contiguous();
    for (int64_t r = 0; r < rows; ++r) y[r * cols + r] = d.data_ptr<float>()[r];
  }
  return y;
}

std::vector<float> as_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

// Bitwise equality of two float vectors (both computed by the same fp32 operations).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b, std::string* where) {
  if (a.size() != b.size()) {
    *where = "sizes " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      *where = "element " + std::to_string(i) + ": " + std::to_string(a[i]) + " vs " + std::to_string(b[i]);
      return false;
    }
  return true;
}

bool contains_any(const std::string& s, std::initializer_list<const char*> fragments) {
  for (const char* f : fragments)
    if (s.find(f) != std::string::npos) return true;
  return false;
}

// ------------------------------------------------------------------ case kinds
// quantize -> dequantize over valid options: an error exactly when the input has a value
// that is NaN/Inf in float32 (naming its first position), else the bound above and the
// layout, the state round trip and every output dtype.
void quantize_case(CaseRng& r) {
  int64_t rows = random_dim(r), cols = random_dim(r);
  QuantOptions o = random_options(r);
  if (r.chance(0.3)) {
    cols = rows;
    o.keep_diagonal = true;
  }
  if (rows * cols > 12000) rows = std::max<int64_t>(1, 12000 / std::max<int64_t>(cols, 1));
  if (o.keep_diagonal) cols = rows;
  const at::ScalarType dtype = random_dtype(r);
  const at::Tensor m = random_matrix(r, rows, cols, dtype);
  SCOPED_TRACE(::testing::Message() << rows << " x " << cols << " " << dtype << " bits " << o.bits << " mapping "
                                    << to_string(o.mapping) << " block " << o.block_size << " "
                                    << to_string(o.rounding) << " diag " << o.keep_diagonal << " dq "
                                    << o.double_quant_scales);

  // The values the kernels work on: the input converted to float32.
  const at::Tensor f = m.to(at::kFloat).contiguous();
  const at::Tensor bad = f.isfinite().logical_not().flatten().nonzero();
  QuantizedMatrix q;
  const Outcome got = outcome_of([&] { q = QuantizedMatrix::quantize(m, o); });
  if (bad.numel() > 0) {
    const int64_t first = bad[0].item<int64_t>();
    const std::string where = "first at [" + std::to_string(first / cols) + ", " + std::to_string(first % cols) + "]";
    ASSERT_TRUE(got.c10) << "a NaN/Inf input was not rejected with a c10::Error (" << got.message << ")";
    EXPECT_NE(got.message.find("NaN or Inf"), std::string::npos) << got.message;
    EXPECT_NE(got.message.find(where), std::string::npos) << got.message << " (expected " << where << ")";
    return;
  }
  ASSERT_FALSE(got.threw) << "a finite input was rejected: " << got.message;

  const int64_t blocks = blocks_per_row(cols, o.block_size);
  ASSERT_EQ(q.rows(), rows);
  ASSERT_EQ(q.cols(), cols);
  ASSERT_EQ(q.codes().sizes(), at::IntArrayRef({rows, (cols * o.bits + 7) / 8}));
  ASSERT_EQ(q.scales().sizes(), at::IntArrayRef({rows, blocks}));
  EXPECT_EQ(q.nbytes(), QuantizedMatrix::storage_bytes(rows, cols, o));
  const at::Tensor y_t = q.dequantize();
  ASSERT_EQ(y_t.sizes(), at::IntArrayRef({rows, cols}));
  ASSERT_TRUE(y_t.isfinite().all().item<bool>()) << "a finite input dequantized to NaN/Inf";

  const std::vector<float> table = codebook_values(o.mapping, o.bits);
  const double E = max_rounding_error(table), G = testing::max_gap(table);
  const std::vector<float> x = as_vector(f), y = as_vector(y_t), eff = as_vector(q.effective_scales());
  const testing::Dense xd(f);
  const std::vector<float> absmax = testing::reference_absmax(xd, o.block_size, o.keep_diagonal);
  const double scale_gap = testing::max_gap(scale_codebook_values());
  const std::vector<float> group_max = o.double_quant_scales ? as_vector(q.scale_group_max()) : std::vector<float>{};
  for (int64_t b = 0; b < rows * blocks; ++b) {
    if (!o.double_quant_scales) {
      ASSERT_EQ(eff[b], absmax[b]) << "block " << b << ": the scale is not the block's absmax";
    } else {
      // Rounded up to a code of the scale table times the group maximum M: never below the
      // absmax, above it by at most one gap of the table times M (plus the product's rounding).
      const double M = group_max[b / kScaleGroupSize];
      ASSERT_GE(eff[b], absmax[b]) << "block " << b << ": a double-quantized scale clips its block";
      ASSERT_LE(eff[b] - static_cast<double>(absmax[b]), (scale_gap + 0x1p-22) * M) << "block " << b;
    }
  }
  int reported = 0;
  for (int64_t rr = 0; rr < rows; ++rr)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = rr * cols + c;
      if (o.keep_diagonal && rr == c) {
        if (y[i] != x[i] && reported++ < 3) ADD_FAILURE() << "kept diagonal [" << rr << "] " << y[i] << " != " << x[i];
        continue;
      }
      const double s = eff[rr * blocks + c / o.block_size];
      const double bound = o.rounding == Rounding::Nearest ? nearest_bound(s, E) : stochastic_bound(s, G, E);
      const double err = std::fabs(static_cast<double>(x[i]) - y[i]);
      if (!(err <= bound) && reported++ < 3)
        ADD_FAILURE() << "[" << rr << ", " << c << "] x=" << x[i] << " y=" << y[i] << " error " << err << " > bound "
                      << bound << " (scale " << s << ")";
    }

  // The state round trip, other output dtypes, and (sometimes) determinism.
  const QuantizedMatrix back = QuantizedMatrix::from_state(q.state());
  std::string where;
  EXPECT_TRUE(same_bits(as_vector(back.dequantize()), y, &where)) << "from_state(state()) decodes differently: " << where;
  const at::ScalarType out_dtype = r.one_of(std::vector<at::ScalarType>{at::kHalf, at::kBFloat16, at::kDouble});
  EXPECT_TRUE(at::equal(q.dequantize(out_dtype), y_t.to(out_dtype))) << "dequantize(" << out_dtype << ")";
  if (r.chance(0.15)) {
    const QuantizedMatrix again = QuantizedMatrix::quantize(m, o);
    EXPECT_TRUE(at::equal(again.codes(), q.codes())) << "quantize is not a pure function of input and options";
  }
  if (r.chance(0.1) && rows * cols > 0) {  // a wrong output is refused before anything is written
    at::Tensor out = at::full({rows, cols + 1}, 7.0);
    const Outcome wrong = outcome_of([&] { q.dequantize_into(out); });
    EXPECT_TRUE(wrong.c10 && wrong.message.find("out must have shape") != std::string::npos) << wrong.message;
    EXPECT_TRUE(at::equal(out, at::full_like(out, 7.0)));
  }
}

// Invalid options and inputs: each names what is wrong.
void invalid_input_case(CaseRng& r) {
  QuantOptions o = random_options(r);
  at::Tensor m = at::randn({r.between(1, 20), r.between(1, 20)});
  std::vector<std::string> expect;
  switch (r.between(0, 8)) {
    case 0:
      o.bits = static_cast<int>(r.one_of(std::vector<int64_t>{-8, 0, 1, 2, 5, 6, 7, 9, 16, 32, INT32_MAX, INT32_MIN}));
      expect = {"QuantOptions.bits must be 3, 4 or 8; got " + std::to_string(o.bits)};
      break;
    case 1:
      o.block_size = r.one_of(std::vector<int64_t>{0, -64, 1, 8, 15, 48, 100, 8192, 1 << 20, INT64_MAX, INT64_MIN});
      expect = {"QuantOptions.block_size must be a power of two from 16 to 4096; got " + std::to_string(o.block_size)};
      break;
    case 2:
      o.mapping = static_cast<Mapping>(r.one_of(std::vector<int64_t>{4, 5, -1, 100}));
      expect = {"QuantOptions.mapping is not a known Mapping"};
      break;
    case 3:
      o.rounding = static_cast<Rounding>(r.one_of(std::vector<int64_t>{2, -1, 77}));
      expect = {"QuantOptions.rounding is not a known Rounding"};
      break;
    case 4:
      m = at::randn({r.between(1, 9), r.between(10, 19)});
      if (r.chance(0.5)) m = m.t();
      o.keep_diagonal = true;
      expect = {"keep_diagonal needs a square matrix"};
      break;
    case 5:
      m = m.to(r.one_of(std::vector<at::ScalarType>{at::kInt, at::kLong, at::kBool, at::kByte, at::kComplexFloat}));
      expect = {"matrix must be float32, bfloat16, float16 or float64"};
      break;
    case 6:
      m = r.chance(0.5) ? at::randn({r.between(0, 9)}) : at::randn({2, 3, r.between(0, 4)});
      if (r.chance(0.3)) m = at::scalar_tensor(1.0);
      expect = {"matrix must be a 2-D matrix"};
      break;
    case 7:
      m = at::Tensor();
      expect = {"matrix is an undefined tensor"};
      break;
    default:
      m = m.to_sparse();
      expect = {"matrix must be a dense (strided) tensor"};
      break;
  }
  const Outcome got = outcome_of([&] { QuantizedMatrix::quantize(m, o); });
  ASSERT_TRUE(got.c10) << "expected a c10::Error naming \"" << expect[0] << "\"; " << (got.threw ? got.message : "none");
  for (const std::string& e : expect) EXPECT_NE(got.message.find(e), std::string::npos) << got.message;
}

// A valid state, edited by one to three random corruptions. from_state either raises an
// error naming an entry or option, or returns a matrix whose decode is finite and equals
// the reference decode of its own state (and the original's when every edit was harmless).
void from_state_case(CaseRng& r) {
  QuantOptions o = random_options(r);
  const int64_t rows = random_dim(r) % 70;
  const int64_t cols = r.chance(0.3) ? rows : random_dim(r) % 70;
  o.keep_diagonal = rows == cols && r.chance(0.5);
  o.rounding = Rounding::Nearest;
  const QuantizedMatrix original = QuantizedMatrix::quantize(random_matrix(r, rows, cols, at::kFloat).nan_to_num(0, 1, -1), o);
  State s = original.state();
  for (auto& [k, v] : s) v = v.clone();
  const std::vector<std::string> names = {"meta", "codes", "scales", "scale_group_max", "diagonal"};
  bool harmless = true;
  std::string edits;
  for (int64_t n = r.between(1, 3); n > 0; --n) {
    std::vector<std::string> present;
    for (const auto& [k, v] : s) present.push_back(k);
    if (present.empty()) break;
    const std::string key = r.one_of(present);
    at::Tensor& t = s[key];
    const int64_t kind = r.between(0, 10);
    edits += " " + key + ":" + std::to_string(kind);
    if (!t.defined() && kind >= 3) continue;  // (made undefined by an earlier edit)
    switch (kind) {
      case 0: s.erase(key); harmless = false; break;
      case 1: {  // renamed
        at::Tensor v = t;
        s.erase(key);
        s[r.chance(0.5) ? key + "_" : key.substr(1)] = v;
        harmless = false;
        break;
      }
      case 2:  // an extra entry nobody reads
        s["extra" + std::to_string(r.between(0, 9))] = at::randn({r.between(0, 3)});
        break;
      case 3: {  // a meta field set to an interesting value
        if (key != "meta" || t.scalar_type() != at::kLong || t.dim() != 1 || t.numel() == 0) {
          harmless = false;
          t = at::tensor(std::vector<int64_t>{rows, cols, o.bits, 0, 64, 0, 0}, at::kLong);
          break;
        }
        const int64_t field = r.between(0, t.numel() - 1);
        const int64_t old = t[field].item<int64_t>();
        const int64_t v = r.one_of(std::vector<int64_t>{-1, 0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 4096, 8192, old + 1,
                                                        old - 1, INT64_MAX, INT64_MIN, INT64_MAX / 2, (int64_t{1} << 32) + 4,
                                                        (int64_t{1} << 61) + 1});
        t[field] = v;
        harmless = harmless && v == old;
        break;
      }
      case 4:  // another dtype
        t = t.to(r.one_of(std::vector<at::ScalarType>{at::kFloat, at::kDouble, at::kHalf, at::kInt, at::kByte,
                                                       at::kLong, at::kBool, at::kChar}));
        harmless = false;  // (a no-op conversion still counts: rare, and the property below holds regardless)
        break;
      case 5: {  // another shape
        switch (r.between(0, 5)) {
          case 0: t = t.dim() > 0 && t.size(0) > 0 ? t.narrow(0, 0, t.size(0) - 1) : t.unsqueeze(0); break;
          case 1: t = t.dim() > 0 ? at::cat({t, t.narrow(0, 0, std::min<int64_t>(1, t.size(0)))}) : t.unsqueeze(0); break;
          case 2: t = t.reshape({-1}); break;
          case 3: t = t.dim() == 2 ? t.t() : t.unsqueeze(-1); break;
          case 4: t = t.unsqueeze(0); break;
          default: t = at::empty({0}, t.options()); break;
        }
        harmless = false;
        break;
      }
      case 6: {  // a corrupted value in a float tensor
        if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) break;
        const double v = r.one_of(std::vector<double>{std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY,
                                                      -1.0, -1e-30, 3e38, FLT_TRUE_MIN, 0.0});
        t.view(-1)[r.between(0, t.numel() - 1)] = v;
        harmless = false;
        break;
      }
      case 7:  // random codes: every bit pattern is a valid code
        if (key == "codes" && t.scalar_type() == at::kByte) {
          t = at::randint(0, 256, t.sizes(), at::kByte);
          harmless = false;
        }
        break;
      case 8:  // an undefined tensor
        t = at::Tensor();
        harmless = false;
        break;
      case 9:  // the same values as a non-contiguous view
        if (t.dim() == 2) t = t.t().contiguous().t();
        break;
      default: {  // a flipped bit in the raw bytes of a tensor
        if (!t.defined() || t.numel() == 0 || !t.is_contiguous()) break;
        const at::Tensor bytes = t.view(-1).view(at::kByte);
        const int64_t i = r.between(0, bytes.numel() - 1);
        bytes[i] = static_cast<int64_t>(bytes[i].item<uint8_t>() ^ (1u << r.between(0, 7)));
        harmless = false;
        break;
      }
    }
  }
  SCOPED_TRACE("edits:" + edits);

  QuantizedMatrix q;
  const Outcome got = outcome_of([&] { q = QuantizedMatrix::from_state(s); });
  if (got.threw) {
    ASSERT_TRUE(got.c10) << "not a c10::Error: " << got.message;
    EXPECT_NE(got.message.find("lowbit::QuantizedMatrix::from_state"), std::string::npos) << got.message;
    EXPECT_TRUE(contains_any(got.message, {"\"meta\"", "codes", "scales", "scale_group_max", "diagonal", "bits",
                                           "block_size", "mapping", "keep_diagonal", "double_quant"}))
        << "the message names no entry or option: " << got.message;
    EXPECT_FALSE(harmless) << "a harmless edit was rejected: " << got.message;
    return;
  }
  // Accepted: the state is self-consistent, so its decode must be finite and exact.
  const QuantOptions& qo = q.options();
  ASSERT_EQ(q.codes().sizes(), at::IntArrayRef({q.rows(), packed_row_bytes(q.cols(), qo.bits)}));
  const at::Tensor group_max = qo.double_quant_scales ? q.scale_group_max() : at::Tensor();
  if (qo.double_quant_scales)
    EXPECT_TRUE(group_max.isfinite().all().item<bool>() && group_max.ge(0).all().item<bool>())
        << "accepted scale_group_max with NaN/Inf or negative values";
  else
    EXPECT_TRUE(q.scales().isfinite().all().item<bool>() && q.scales().ge(0).all().item<bool>())
        << "accepted block scales with NaN/Inf or negative values";
  if (q.diagonal().defined()) EXPECT_TRUE(q.diagonal().isfinite().all().item<bool>()) << "accepted a NaN/Inf diagonal";
  at::Tensor y_t;
  const Outcome decoded = outcome_of([&] { y_t = q.dequantize(); });
  ASSERT_FALSE(decoded.threw) << "from_state accepted a state that dequantize rejects: " << decoded.message;
  ASSERT_TRUE(y_t.isfinite().all().item<bool>()) << "from_state accepted a state that decodes to NaN/Inf";
  const std::vector<float> expected =
      reference_decode(q.codes(), q.scales(), group_max, codebook(qo.mapping, qo.bits), q.diagonal(), qo.bits,
                       qo.block_size, q.rows(), q.cols());
  std::string where;
  EXPECT_TRUE(same_bits(as_vector(y_t), expected, &where)) << "decode differs from the reference: " << where;
  if (harmless)
    EXPECT_TRUE(same_bits(as_vector(y_t), as_vector(original.dequantize()), &where)) << "harmless edits changed: " << where;
}

// The torch ops directly, with arguments taken from a valid matrix and some of them spoiled.
void ops_case(CaseRng& r) {
  auto& dispatcher = c10::Dispatcher::singleton();
  const int64_t rows = random_dim(r) % 50, cols = random_dim(r) % 90;
  QuantOptions o = random_options(r);
  o.double_quant_scales = false;
  o.rounding = Rounding::Nearest;
  o.keep_diagonal = rows == cols && r.chance(0.4);
  const at::Tensor m = random_matrix(r, rows, cols, at::kFloat).nan_to_num(0, 1e30, -1e30);
  const QuantizedMatrix q = QuantizedMatrix::quantize(m, o);
  switch (r.between(0, 3)) {
    case 0: {  // dequantize_blockwise (functional) with spoiled arguments
      static const auto op = dispatcher.findSchemaOrThrow("lowbit::dequantize_blockwise", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                                   at::ScalarType)>();
      at::Tensor codes = q.codes(), scales = q.scales(), table = codebook(o.mapping, o.bits).clone();
      c10::optional<at::Tensor> diag = q.diagonal().defined() ? c10::optional<at::Tensor>(q.diagonal()) : c10::nullopt;
      int64_t bits = o.bits, block = o.block_size, n = cols;
      at::ScalarType dtype = at::kFloat;
      for (int64_t k = r.between(0, 2); k > 0; --k) switch (r.between(0, 9)) {
          case 0: n = r.one_of(std::vector<int64_t>{-1, 0, n + 1, n - 1, n + 8, INT64_MAX, INT64_MAX / 2, int64_t{1} << 40}); break;
          case 1: bits = r.one_of(std::vector<int64_t>{3, 4, 8, 0, 5, -4, 64}); break;
          case 2: block = r.one_of(std::vector<int64_t>{16, 32, 4096, 0, 24, -16, int64_t{1} << 40}); break;
          case 3: codes = codes.to(r.one_of(std::vector<at::ScalarType>{at::kChar, at::kInt, at::kFloat})); break;
          case 4: codes = codes.dim() == 2 && codes.size(1) > 0 ? codes.narrow(1, 0, codes.size(1) - 1) : codes.reshape({-1}); break;
          case 5: scales = r.chance(0.5) ? scales.to(at::kDouble) : at::cat({scales, scales}, 1); break;
          case 6: table = r.chance(0.5) ? table.flip(0) : table.narrow(0, 0, table.size(0) / 2); break;
          case 7: diag = at::randn({r.between(0, 3) + rows}); break;
          case 8: dtype = r.one_of(std::vector<at::ScalarType>{at::kHalf, at::kDouble, at::kInt, at::kBool}); break;
          default: table = table.clone(); table[0] = std::numeric_limits<float>::quiet_NaN(); break;
        }
      at::Tensor out;
      const Outcome got = outcome_of([&] { out = op.call(codes, scales, table, diag, bits, block, n, dtype); });
      if (got.threw) {
        ASSERT_TRUE(got.c10) << "not a c10::Error: " << got.message;
        EXPECT_NE(got.message.find("lowbit::dequantize_blockwise"), std::string::npos) << got.message;
        return;
      }
      ASSERT_EQ(out.sizes(), at::IntArrayRef({codes.size(0), n}));
      const at::Tensor d = diag.has_value() ? *diag : at::Tensor();
      std::string where;
      EXPECT_TRUE(same_bits(as_vector(out), as_vector(at::from_blob(
                                                const_cast<float*>(reference_decode(codes, scales, at::Tensor(), table, d,
                                                                                    static_cast<int>(bits), block,
                                                                                    codes.size(0), n).data()),
                                                {codes.size(0) * n}).to(dtype)), &where))
          << where;
      return;
    }
    case 1: {  // quantize_blockwise with given scales
      static const auto op = dispatcher.findSchemaOrThrow("lowbit::quantize_blockwise", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                     const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, bool, int64_t,
                                     const c10::optional<at::Tensor>&, bool)>();
      at::Tensor given = q.scales().clone();
      bool valid = true;
      if (given.numel() > 0 && r.chance(0.6)) {
        const double v = r.one_of(std::vector<double>{std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY, -1.0});
        given.view(-1)[r.between(0, given.numel() - 1)] = v;
        valid = false;
      } else if (r.chance(0.3)) {
        given = given.narrow(1, 0, std::max<int64_t>(0, given.size(1) - 1));
        valid = given.sizes() == q.scales().sizes();
      } else {
        given = (given * 1.5 + 0.25).clamp_max(FLT_MAX);  // at least every absmax: no clipping
      }
      const bool stochastic = r.chance(0.3);
      std::tuple<at::Tensor, at::Tensor, at::Tensor> res;
      const Outcome got = outcome_of([&] {
        res = op.call(m, codebook(o.mapping, o.bits), o.bits, o.block_size, o.keep_diagonal, stochastic, 7, given, true);
      });
      if (!valid) {
        ASSERT_TRUE(got.c10) << "spoiled scales were accepted" << (got.threw ? ": " + got.message : "");
        EXPECT_NE(got.message.find("lowbit::quantize_blockwise"), std::string::npos) << got.message;
        EXPECT_NE(got.message.find("scales"), std::string::npos) << got.message;
        return;
      }
      ASSERT_FALSE(got.threw) << got.message;
      const auto& [codes, scales, diag] = res;
      EXPECT_TRUE(at::equal(scales, given)) << "given scales are returned as they were";
      const std::vector<float> y = reference_decode(codes, scales, at::Tensor(), codebook(o.mapping, o.bits),
                                                    o.keep_diagonal ? diag : at::Tensor(), o.bits, o.block_size, rows, cols);
      const std::vector<float> x = as_vector(m), s = as_vector(scales), table = codebook_values(o.mapping, o.bits);
      const double E = max_rounding_error(table), G = testing::max_gap(table);
      const int64_t blocks = blocks_per_row(cols, o.block_size);
      for (int64_t i = 0; i < rows * cols; ++i) {
        if (o.keep_diagonal && i / cols == i % cols) continue;
        const double sc = s[(i / cols) * blocks + (i % cols) / o.block_size];
        const double bound = stochastic ? stochastic_bound(sc, G, E) : nearest_bound(sc, E);
        ASSERT_LE(std::fabs(static_cast<double>(x[i]) - y[i]), bound) << "element " << i;
      }
      return;
    }
    case 2: {  // quantize_scales / dequantize_scales
      static const auto qs = dispatcher.findSchemaOrThrow("lowbit::quantize_scales", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool)>();
      static const auto ds = dispatcher.findSchemaOrThrow("lowbit::dequantize_scales", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
      at::Tensor s = at::rand({r.between(0, 700)}) * std::pow(10.0, r.uniform(-40, 38));
      bool valid = true;
      if (s.numel() > 0 && r.chance(0.3)) {
        s[r.between(0, s.numel() - 1)] = r.one_of(std::vector<double>{NAN, INFINITY, -1.0, -INFINITY});
        valid = false;
      }
      std::tuple<at::Tensor, at::Tensor> res;
      const Outcome got = outcome_of([&] { res = qs.call(s, scale_codebook(), true); });
      if (!valid) {
        ASSERT_TRUE(got.c10) << "bad scales were accepted";
        EXPECT_NE(got.message.find("scales must be finite and non-negative"), std::string::npos) << got.message;
        return;
      }
      ASSERT_FALSE(got.threw) << got.message;
      const auto& [codes, group_max] = res;
      const at::Tensor eff = ds.call(codes, group_max, scale_codebook());
      EXPECT_TRUE(eff.ge(s).all().item<bool>()) << "a double-quantized scale is below its block's absmax";
      at::Tensor wrong_max = at::cat({group_max, at::ones({1})});
      const Outcome bad = outcome_of([&] { ds.call(codes, wrong_max, scale_codebook()); });
      EXPECT_TRUE(bad.c10 && bad.message.find("group_max must be float32 of shape") != std::string::npos) << bad.message;
      return;
    }
    default: {  // the codebook op
      static const auto op =
          dispatcher.findSchemaOrThrow("lowbit::codebook", "").typed<at::Tensor(c10::string_view, int64_t)>();
      const std::string mapping = r.one_of(std::vector<std::string>{"linear2", "dynamic", "linear", "cubic", "", "LINEAR"});
      const int64_t bits = r.one_of(std::vector<int64_t>{3, 4, 8, 0, 2, 16, -1, INT64_MAX});
      at::Tensor t;
      const Outcome got = outcome_of([&] { t = op.call(mapping, bits); });
      const bool valid = (bits == 3 || bits == 4 || bits == 8) && (mapping == "linear2" || mapping == "dynamic" || mapping == "linear");
      if (!valid) {
        ASSERT_TRUE(got.c10) << mapping << " " << bits;
        EXPECT_TRUE(contains_any(got.message, {"bits", "mapping"})) << got.message;
        return;
      }
      ASSERT_FALSE(got.threw) << got.message;
      EXPECT_EQ(t.numel(), int64_t{1} << bits);
      return;
    }
  }
}

TEST(CodecFuzz, EveryCaseIsAClearErrorOrACorrectResult) {
  const int64_t ran = testing::run_fuzz("codec fuzz", 0x10b17c0dec, 4000, [](uint64_t seed) {
    CaseRng r(seed);
    const int64_t kind = r.between(0, 19);
    if (kind < 9) quantize_case(r);
    else if (kind < 11) invalid_input_case(r);
    else if (kind < 16) from_state_case(r);
    else ops_case(r);
  });
  EXPECT_GE(ran, 1);
}

}  // namespace
}  // namespace lowbit
