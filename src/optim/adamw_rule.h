// One step of low-bit AdamW (see lowbit/adamw.h) on plain tensors: one implementation for
// the C++ optimizer and the Python op (torch.ops.lowbit.adamw_update_).
#pragma once

#include <ATen/core/Tensor.h>

#include <lowbit/quant_options.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace lowbit::adamw {

// How one parameter's moments are stored.
struct MomentLayout {
  int bits = 32;                                  // 32: fp32 moments shaped like the parameter
  Mapping mapping = Mapping::DynamicTree;         // m: signed table, or Kashin (fitted centroids)
  Mapping second_moment_mapping = Mapping::Linear;// v: positive table (no zero)
  int64_t block_size = 128;
  int64_t numel = 0;
  bool quantized() const { return bits != 32; }
  bool kashin_first_moment() const { return quantized() && mapping == Mapping::Kashin; }
};

// The layout the options give a parameter of `numel` elements: fp32 when bits == 32 or
// numel < min_quant_numel; block_size 0 means 256 at 8 bits and 128 at 4; the second
// moment's mapping "auto" means "dynamic" at 8 bits and "linear" at 4. Options must be valid.
MomentLayout layout_for(int64_t numel, int64_t bits, const std::string& mapping,
                        const std::string& second_moment_mapping, int64_t block_size, int64_t min_quant_numel);
int64_t resolved_block_size(int64_t bits, int64_t block_size);
std::string resolved_second_moment_mapping(int64_t bits, const std::string& second_moment_mapping);

// A parameter's moments (handles; update() writes them in place). fp32: exp_avg and
// exp_avg_sq shaped like the parameter. Quantized: uint8 codes [ceil(numel bits / 8)] and
// fp32 block absmax scales [ceil(numel / block_size)] of the flattened moment. A Kashin first
// moment (quant/kashin_vector.h) has block norms as exp_avg_scales and its fitted centroids,
// fp32 [2^bits, 2], as exp_avg_centroids; the second moment is never Kashin-coded (its
// decoded values could be negative or 0, and the update divides by sqrt(v)).
struct Moments {
  at::Tensor exp_avg, exp_avg_sq;
  at::Tensor exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales;
  at::Tensor exp_avg_centroids;
};

// Whether an optimizer state can hold Kashin centroids (lowbit::AdamW's can; Shampoo's graft,
// always table-coded, has no such field).
template <typename State, typename = void>
struct holds_centroids : std::false_type {};
template <typename State>
struct holds_centroids<State, std::void_t<decltype(std::declval<const State&>().exp_avg_centroids())>>
    : std::true_type {};

// The moments held by an optimizer state with the tensor fields above (lowbit::AdamW's and
// Shampoo's graft), as handles; and back.
template <typename State>
Moments moments_of(const State& s) {
  Moments m;
  m.exp_avg = s.exp_avg();
  m.exp_avg_sq = s.exp_avg_sq();
  m.exp_avg_codes = s.exp_avg_codes();
  m.exp_avg_scales = s.exp_avg_scales();
  m.exp_avg_sq_codes = s.exp_avg_sq_codes();
  m.exp_avg_sq_scales = s.exp_avg_sq_scales();
  if constexpr (holds_centroids<State>::value) m.exp_avg_centroids = s.exp_avg_centroids();
  return m;
}
template <typename State>
void store_moments(State& s, const Moments& m) {
  s.exp_avg(m.exp_avg);
  s.exp_avg_sq(m.exp_avg_sq);
  s.exp_avg_codes(m.exp_avg_codes);
  s.exp_avg_scales(m.exp_avg_scales);
  s.exp_avg_sq_codes(m.exp_avg_sq_codes);
  s.exp_avg_sq_scales(m.exp_avg_sq_scales);
  if constexpr (holds_centroids<State>::value) s.exp_avg_centroids(m.exp_avg_centroids);
}

// Zero moments (all codes and scales 0 decode to exactly 0) on p's device.
Moments make_moments(const MomentLayout& layout, const at::Tensor& p);

// Checks the tensors against the layout (which are present, dtypes, shapes); `who` starts
// the message. p: the parameter (shape of fp32 moments, device of all).
void check_moments(const Moments& m, const MomentLayout& layout, const at::Tensor& p, const std::string& who);

int64_t moments_bytes(const Moments& m);
// The formula: 2 (ceil(numel bits / 8) + 4 ceil(numel / block_size)) quantized (+ 8 2^bits
// for a Kashin first moment's centroids), 8 numel fp32.
int64_t expected_moments_bytes(const MomentLayout& layout);

// The two code tables of a quantized layout (undefined for a Kashin first moment: its
// centroids are fitted per moment and stored in the state).
const at::Tensor& first_moment_table(const MomentLayout& layout);
const at::Tensor& second_moment_table(const MomentLayout& layout);

// A flat fp32 moment from its codes and scales, numel elements, and back (nearest rounding
// unless `stochastic`, then with the codec seed `seed`).
at::Tensor dequantize_moment(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& table,
                             const MomentLayout& layout);
void quantize_moment_into(const at::Tensor& value, const at::Tensor& table, const MomentLayout& layout,
                          at::Tensor& codes, at::Tensor& scales, bool stochastic = false, int64_t seed = 0);

// How moments are re-encoded: nearest code, or stochastic rounding (unbiased) with random
// numbers that are a function of (seed, parameter index, step, moment) and the element's
// index only, so a resumed run rounds as an uninterrupted one would.
struct Encoding {
  bool stochastic = false;
  int64_t seed = 0;
  int64_t param_index = 0;  // position of the parameter over all param groups
};
// The codec seed of moment `moment` (0: m, 1: v) of a parameter at `step`.
int64_t encoding_seed(const Encoding& e, int64_t step, int moment);

// The moments as flat fp32 [numel] tensors: decoded from their codes, or (fp32 layout) the
// state's own storage when that is fp32 and contiguous, else an fp32 copy. write_moments
// stores them back: re-encoded (with the encoding's rounding at `step`), or copied.
std::pair<at::Tensor, at::Tensor> read_moments(const Moments& moments, const MomentLayout& layout);
void write_moments(const at::Tensor& m, const at::Tensor& v, Moments& moments, const MomentLayout& layout,
                   int64_t step, const Encoding& encoding = {});

// One AdamW step at `step` (1-based, already counted), the arithmetic of torch::optim::AdamW:
//   p *= 1 - lr wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Quantized: m and v are decoded first, updated and used in fp32, then re-encoded.
void update(at::Tensor& p, const at::Tensor& grad, Moments& moments, const MomentLayout& layout, int64_t step,
            double lr, double beta1, double beta2, double eps, double weight_decay, const Encoding& encoding = {});
// Whether the options bound the change of an fp32 / bf16 parameter by
// health::kMaxUncheckedUpdate when every gradient obeys the rule of optim/gradient_health.h
// (so |g| <= 2^52): the step is lr / (1 - b1^t) * m / (sqrt(v_hat) + eps) with |m| <= 2^52 (an
// EMA of such gradients, or a code times a block absmax of one), 1 - b1^t >= 1 - b1 and a
// denominator >= eps, so at most lr 2^52 / ((1 - b1) eps); the decoupled decay
// p (1 - lr wd) does not grow |p| when lr wd <= 2. Otherwise a step is tried on copies first.
bool update_bounded(double lr, double beta1, double eps, double weight_decay);

// The same with given code tables (tests: a second-moment table with a zero).
void update_with_tables(at::Tensor& p, const at::Tensor& grad, Moments& moments, const MomentLayout& layout,
                        int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                        const at::Tensor& first_table, const at::Tensor& second_table, const Encoding& encoding = {});

}  // namespace lowbit::adamw
