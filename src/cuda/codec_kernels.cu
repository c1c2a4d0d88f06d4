// CUDA kernels of the codec ops; see codec_kernels.cuh for the contract. Each kernel mirrors
// its CPU twin in src/quant/codec_cpu.cpp, sharing the bit packing (quant/packing.h) and the
// counter-based random numbers (quant/counter_rng.h). Floating-point operations that decide a
// code are written as __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn: these are never fused
// into an FMA, so each rounds exactly as the CPU's separate fp32 operation does (the build adds
// --fmad=false as a second guard).
#include "cuda/codec_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <type_traits>

#include <lowbit/quant_options.h>

#include "quant/counter_rng.h"
#include "quant/packing.h"

namespace lowbit::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerCta = 8;  // quantize / absmax: one warp per quantization block
constexpr int kThreads = kWarp * kWarpsPerCta;
constexpr unsigned kFullMask = 0xffffffffu;
// Dequantize: each thread writes a chunk of 8 consecutive elements of one row. Block sizes are
// multiples of 16 and start at multiples of 16, so a chunk never spans two scales, and its
// codes are a whole number of bytes (8 * bits / 8 = bits bytes) starting on a byte boundary.
constexpr int kChunk = 8;

static_assert(kScaleGroupSize == 256, "quantize_scales_kernel runs one 256-thread CTA per group");
static_assert(kMinBlockSize % kChunk == 0, "a dequantize chunk must stay inside one block");

// The block layout of codec_cpu.cpp's BlockGrid, plus log2(block_size) for cheap division.
struct Geometry {
  int64_t rows, cols, block_size, blocks_per_row;
  int block_shift;
  __device__ int64_t total() const { return rows * blocks_per_row; }
  __device__ int64_t row(int64_t b) const { return b / blocks_per_row; }
  __device__ int64_t first_col(int64_t b) const { return (b % blocks_per_row) << block_shift; }
  __device__ int64_t length(int64_t b) const {
    const int64_t rest = cols - first_col(b);
    return rest < block_size ? rest : block_size;
  }
  // Offset of the diagonal element inside block b, or -1 when the block holds none.
  __device__ int64_t diagonal_offset(int64_t b) const {
    const int64_t r = row(b), c0 = first_col(b);
    return (r >= c0 && r < c0 + length(b)) ? r - c0 : -1;
  }
};

Geometry make_geometry(BlockGrid g) {
  int shift = 0;
  while ((int64_t{1} << shift) < g.block_size) ++shift;
  return {g.rows, g.cols, g.block_size, (g.cols + g.block_size - 1) / g.block_size, shift};
}

// Bytes of one packed row (quantized_matrix.h's packed_row_bytes, which needs torch headers).
__host__ __device__ int64_t packed_row_bytes(int64_t cols, int bits) { return (cols * bits + 7) / 8; }

// ------------------------------------------------------------------ element conversions
// Widening to float and narrowing from float round exactly as static_cast does on the CPU
// (c10::Half / c10::BFloat16 round to nearest even, as the _rn intrinsics do).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, double>) return static_cast<double>(v);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

// Loads element i of a block whose first element has flat index `first`; a NaN/Inf (or a
// double beyond float range) lowers *first_bad to its flat index, as the CPU tracker does.
template <typename T>
__device__ __forceinline__ float load_checked(const T* x, int64_t i, int64_t first,
                                              unsigned long long* first_bad) {
  const float v = to_float(x[i]);
  if (!(fabsf(v) <= FLT_MAX)) atomicMin(first_bad, static_cast<unsigned long long>(first + i));
  return v;
}

// max |x| over the block held by the calling warp, leaving out offset `skip` (-1: none).
// All 32 lanes must call it; every lane gets the result.
template <typename T>
__device__ float warp_block_absmax(const T* x, int64_t n, int64_t skip, int64_t first,
                                   unsigned long long* first_bad, int lane) {
  float m = 0.f;
  for (int64_t i = lane; i < n; i += kWarp) {
    const float v = load_checked(x, i, first, first_bad);
    if (i != skip) m = fmaxf(m, fabsf(v));
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    m = fmaxf(m, __shfl_xor_sync(kFullMask, m, offset));
  return m;
}

// ------------------------------------------------------------------ code table
// The codebook in the forms the kernels use, built per CTA in shared memory from the
// device copy of the codebook (so no host round trip is needed to launch).
struct CodeTable {
  float values[256];
  float midpoints[255];
  int zero_index;
};

// Called by every thread of the CTA (it synchronizes).
__device__ void load_code_table(CodeTable& t, const float* codebook, int size) {
  for (int k = threadIdx.x; k < size; k += blockDim.x) t.values[k] = codebook[k];
  if (threadIdx.x == 0) t.zero_index = 0;
  __syncthreads();
  for (int k = threadIdx.x; k + 1 < size; k += blockDim.x) {
    t.midpoints[k] = __fmul_rn(__fadd_rn(t.values[k], t.values[k + 1]), 0.5f);
    // A strictly ascending table holds at most one exact zero, so one writer at most.
    if (t.values[k] == 0.f) t.zero_index = k;
  }
  if (threadIdx.x == 0 && t.values[size - 1] == 0.f) t.zero_index = size - 1;
  __syncthreads();
}

// Nearest code: #{k : x > midpoint_k * scale}. The thresholds ascend, so a binary search
// finds the same count as the CPU's linear scan (and the same as its 8-bit search).
template <int Bits>
__device__ __forceinline__ uint8_t nearest_code(float x, float scale, const CodeTable& t) {
  int count = 0;
  for (int step = (1 << Bits) / 2; step > 0; step >>= 1)
    count += (x > __fmul_rn(t.midpoints[count + step - 1], scale)) ? step : 0;
  return static_cast<uint8_t>(count);
}

// Stochastic rounding between the two codes around x / scale (CPU: stochastic_indices).
template <int Bits>
__device__ __forceinline__ uint8_t stochastic_code(float v, float scale, const CodeTable& t,
                                                   uint64_t seed, uint64_t index) {
  constexpr int kSize = 1 << Bits;
  const float x = __fdiv_rn(v, scale);
  int first = 0, count = kSize;  // std::upper_bound: first k with values[k] > x
  while (count > 0) {
    const int step = count / 2;
    if (!(x < t.values[first + step])) {
      first += step + 1;
      count -= step + 1;
    } else {
      count = step;
    }
  }
  if (first == 0) return 0;
  const int lo = first - 1;
  if (lo == kSize - 1 || x == t.values[lo]) return static_cast<uint8_t>(lo);
  const float p = __fdiv_rn(__fsub_rn(x, t.values[lo]), __fsub_rn(t.values[lo + 1], t.values[lo]));
  return static_cast<uint8_t>(lo + (uniform01(seed, index) < p ? 1 : 0));
}

// ------------------------------------------------------------------ kernels
template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_absmax_kernel(const T* __restrict__ input, Geometry g, bool skip_diagonal,
                        float* __restrict__ scales, unsigned long long* first_bad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (b >= g.total()) return;  // the whole warp leaves together
  const int64_t first = g.row(b) * g.cols + g.first_col(b);
  const int64_t skip = skip_diagonal ? g.diagonal_offset(b) : -1;
  const float m = warp_block_absmax(input + first, g.length(b), skip, first, first_bad, lane);
  if (lane == 0) scales[b] = m;
}

// One warp per block: its scale (absmax, or the given one), then its codes. Lanes take
// groups of elements that pack into whole bytes (8 at 3 bits, 2 at 4 bits, 1 at 8 bits), so
// the CPU's packing::pack writes each group and no byte is shared between lanes.
template <typename T, int Bits>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ input, Geometry g, const float* __restrict__ codebook,
                    bool keep_diagonal, bool stochastic, uint64_t seed, bool given_scales,
                    float* __restrict__ scales, uint8_t* __restrict__ codes,
                    float* __restrict__ diagonal, unsigned long long* first_bad) {
  constexpr int kGroup = Bits == 3 ? 8 : (Bits == 4 ? 2 : 1);
  constexpr int kGroupBytes = kGroup * Bits / 8;
  __shared__ CodeTable table;
  load_code_table(table, codebook, 1 << Bits);

  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (b >= g.total()) return;  // after the CTA-wide barriers; the whole warp leaves together
  const int64_t r = g.row(b), c0 = g.first_col(b), n = g.length(b);
  const int64_t first = r * g.cols + c0;
  const T* x = input + first;
  // The kept diagonal is stored exactly and quantized (and scaled) as 0.
  const int64_t d = keep_diagonal ? g.diagonal_offset(b) : -1;

  float scale;
  if (given_scales) {
    scale = scales[b];
  } else {
    scale = warp_block_absmax(x, n, d, first, first_bad, lane);
    if (lane == 0) scales[b] = scale;
  }
  const bool zero_block = !(scale > 0.f);
  uint8_t* out = codes + r * packed_row_bytes(g.cols, Bits) + c0 * Bits / 8;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  for (int64_t u = lane; u < groups; u += kWarp) {
    const int64_t start = u * kGroup;
    const int count = n - start < kGroup ? static_cast<int>(n - start) : kGroup;
    uint8_t idx[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      idx[k] = 0;  // past the block's end: zero bits, as the CPU's packing of a partial group
      if (k >= count) continue;
      const int64_t i = start + k;
      float v = load_checked(x, i, first, first_bad);
      if (i == d) {
        diagonal[r] = v;
        v = 0.f;
      }
      if (zero_block) idx[k] = static_cast<uint8_t>(table.zero_index);
      else if (stochastic) idx[k] = stochastic_code<Bits>(v, scale, table, seed, first + i);
      else idx[k] = nearest_code<Bits>(v, scale, table);
    }
    // Packing a whole group (compile-time count, so it stays in registers) gives the bytes
    // that packing a partial one would; only the bytes the block owns are stored.
    uint8_t bytes[kGroupBytes];
    packing::pack<Bits>(idx, kGroup, bytes);
    const int owned = (count * Bits + 7) / 8;
#pragma unroll
    for (int j = 0; j < kGroupBytes; ++j)
      if (j < owned) out[u * kGroupBytes + j] = bytes[j];
  }
}

// A chunk of kChunk elements of type T, for one wide store.
template <typename T>
struct alignas(sizeof(T) * kChunk) Chunk {
  T v[kChunk];
};

// One thread per chunk of 8 elements of a row. kWide (chosen by the launcher when the row
// strides and pointers are aligned) reads the chunk's codes as one word and writes its 8
// outputs with vector stores; otherwise bytes and elements go one at a time.
template <typename T, int Bits, bool kWide>
__global__ void __launch_bounds__(256)
    dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                      const float* __restrict__ codebook, const float* __restrict__ diagonal,
                      Geometry g, int64_t chunks_per_row, T* __restrict__ out) {
  __shared__ float values[1 << Bits];
  for (int k = threadIdx.x; k < (1 << Bits); k += blockDim.x) values[k] = codebook[k];
  __syncthreads();
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= g.rows * chunks_per_row) return;
  const int64_t r = id / chunks_per_row, c = (id - r * chunks_per_row) * kChunk;
  const int n = g.cols - c < kChunk ? static_cast<int>(g.cols - c) : kChunk;
  const float scale = scales[r * g.blocks_per_row + (c >> g.block_shift)];
  const uint8_t* src = codes + r * packed_row_bytes(g.cols, Bits) + c * Bits / 8;

  // The chunk's Bits bytes of codes: one aligned little-endian word when kWide (4 bytes at 4
  // bits, 8 at 8 bits), else byte by byte; bytes past the row's end read as 0.
  uint8_t bytes[Bits];
  if constexpr (kWide && Bits == 4) {
    const unsigned int w = n == kChunk ? __ldg(reinterpret_cast<const unsigned int*>(src)) : 0u;
#pragma unroll
    for (int k = 0; k < 4; ++k) bytes[k] = static_cast<uint8_t>(w >> (8 * k));
  } else if constexpr (kWide && Bits == 8) {
    const uint2 w = n == kChunk ? __ldg(reinterpret_cast<const uint2*>(src)) : make_uint2(0u, 0u);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      bytes[k] = static_cast<uint8_t>(w.x >> (8 * k));
      bytes[4 + k] = static_cast<uint8_t>(w.y >> (8 * k));
    }
  } else {
    const int owned = (n * Bits + 7) / 8;
#pragma unroll
    for (int k = 0; k < Bits; ++k) bytes[k] = k < owned ? src[k] : 0;
  }
  // Unpacking all 8 (a compile-time count keeps everything in registers) gives the first n
  // codes exactly as unpacking n would.
  uint8_t idx[kChunk];
  packing::unpack<Bits>(bytes, kChunk, idx);

  const bool has_diagonal = diagonal != nullptr && r >= c && r < c + n;
  const float diagonal_value = has_diagonal ? diagonal[r] : 0.f;
  Chunk<T> chunk;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    const float v = __fmul_rn(values[idx[k]], scale);
    chunk.v[k] = from_float<T>(has_diagonal && c + k == r ? diagonal_value : v);
  }

  T* dst = out + r * g.cols + c;
  if (kWide) {  // kWide implies cols % 8 == 0, so every chunk is whole
    *reinterpret_cast<Chunk<T>*>(dst) = chunk;
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k)
      if (k < n) dst[k] = chunk.v[k];
  }
}

// Index and value of a group's maximum with std::max_element's choice among equal values
// (the first), so even the sign of a zero maximum matches the CPU.
struct ArgMax {
  float value;
  int index;
};

__device__ __forceinline__ ArgMax later_wins_if_greater(ArgMax a, ArgMax b) {
  // a and b from disjoint ranges; the result is the larger, the earlier one on ties.
  const bool take_b = a.value < b.value || (!(b.value < a.value) && b.index < a.index);
  return take_b ? b : a;
}

__device__ ArgMax warp_argmax(ArgMax m) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    ArgMax other{__shfl_xor_sync(kFullMask, m.value, offset), __shfl_xor_sync(kFullMask, m.index, offset)};
    m = later_wins_if_greater(m, other);
  }
  return m;
}

// One CTA per group of kScaleGroupSize scales, one thread per scale.
__global__ void __launch_bounds__(kScaleGroupSize)
    quantize_scales_kernel(const float* __restrict__ scales, int64_t n,
                           const float* __restrict__ scale_codebook, uint8_t* __restrict__ codes,
                           float* __restrict__ group_max, unsigned long long* first_bad) {
  __shared__ float table[256];
  __shared__ ArgMax warp_best[kScaleGroupSize / kWarp];
  __shared__ float group_m;
  table[threadIdx.x] = scale_codebook[threadIdx.x];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kScaleGroupSize + threadIdx.x;
  const bool valid = i < n;
  const float s = valid ? scales[i] : -INFINITY;  // padding never wins the maximum
  if (valid && !(s >= 0.f && s <= FLT_MAX)) atomicMin(first_bad, static_cast<unsigned long long>(i));

  const ArgMax best = warp_argmax({s, static_cast<int>(threadIdx.x)});
  if (threadIdx.x % kWarp == 0) warp_best[threadIdx.x / kWarp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    ArgMax m = warp_best[0];
    for (int w = 1; w < kScaleGroupSize / kWarp; ++w) m = later_wins_if_greater(m, warp_best[w]);
    group_m = m.value;
    group_max[blockIdx.x] = m.value;
  }
  __syncthreads();
  if (!valid) return;
  // The smallest code c with table[c] * M >= s (CPU: the same lower_bound loop).
  const float m = group_m;
  int first = 0, count = 256;
  while (count > 0) {
    const int half = count / 2;
    if (__fmul_rn(table[first + half], m) < s) {
      first += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  codes[i] = static_cast<uint8_t>(first < 255 ? first : 255);
}

__global__ void __launch_bounds__(256)
    dequantize_scales_kernel(const uint8_t* __restrict__ codes, int64_t n,
                             const float* __restrict__ group_max,
                             const float* __restrict__ scale_codebook, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __fmul_rn(__ldg(scale_codebook + codes[i]), group_max[i / kScaleGroupSize]);
}

// ------------------------------------------------------------------ launch helpers
// CTAs for `work` items at `per_cta` items each, or 0 when the grid would be too large.
unsigned grid_size(int64_t work, int64_t per_cta) {
  const int64_t ctas = (work + per_cta - 1) / per_cta;
  return ctas > INT_MAX ? 0u : static_cast<unsigned>(ctas);
}

cudaError_t reset_first_bad(unsigned long long* first_bad, cudaStream_t stream) {
  return cudaMemsetAsync(first_bad, 0xFF, sizeof(unsigned long long), stream);  // kNoBadValue
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls fn(T{}) with the element type behind `type`.
template <typename Fn>
void with_float_type(FloatType type, Fn&& fn) {
  switch (type) {
    case FloatType::kFloat32: return fn(float{});
    case FloatType::kFloat64: return fn(double{});
    case FloatType::kFloat16: return fn(__half{});
    case FloatType::kBFloat16: return fn(__nv_bfloat16{});
  }
}

template <typename Fn>
cudaError_t with_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 3: fn(std::integral_constant<int, 3>{}); return cudaSuccess;
    case 4: fn(std::integral_constant<int, 4>{}); return cudaSuccess;
    case 8: fn(std::integral_constant<int, 8>{}); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_block_absmax(const void* input, FloatType type, BlockGrid grid, bool skip_diagonal,
                                float* scales, unsigned long long* first_bad, cudaStream_t stream) {
  if (cudaError_t e = reset_first_bad(first_bad, stream); e != cudaSuccess) return e;
  const Geometry g = make_geometry(grid);
  const int64_t blocks = g.rows * g.blocks_per_row;
  if (blocks == 0) return cudaSuccess;
  const unsigned ctas = grid_size(blocks, kWarpsPerCta);
  if (ctas == 0) return cudaErrorInvalidConfiguration;
  with_float_type(type, [&](auto zero) {
    using T = decltype(zero);
    block_absmax_kernel<T><<<ctas, kThreads, 0, stream>>>(static_cast<const T*>(input), g, skip_diagonal,
                                                          scales, first_bad);
  });
  return cudaGetLastError();
}

cudaError_t launch_quantize_blockwise(const QuantizeArgs& a, cudaStream_t stream) {
  if (cudaError_t e = reset_first_bad(a.first_bad, stream); e != cudaSuccess) return e;
  const Geometry g = make_geometry(a.grid);
  const int64_t blocks = g.rows * g.blocks_per_row;
  if (blocks == 0) return cudaSuccess;
  const unsigned ctas = grid_size(blocks, kWarpsPerCta);
  if (ctas == 0) return cudaErrorInvalidConfiguration;
  const cudaError_t bits_ok = with_bits(a.bits, [&](auto bits) {
    constexpr int kBits = decltype(bits)::value;
    with_float_type(a.type, [&](auto zero) {
      using T = decltype(zero);
      quantize_kernel<T, kBits><<<ctas, kThreads, 0, stream>>>(
          static_cast<const T*>(a.input), g, a.codebook, a.keep_diagonal, a.stochastic, a.seed,
          a.given_scales, a.scales, a.codes, a.diagonal, a.first_bad);
    });
  });
  return bits_ok != cudaSuccess ? bits_ok : cudaGetLastError();
}

cudaError_t launch_dequantize_blockwise(const uint8_t* codes, const float* scales, const float* codebook,
                                        const float* diagonal_or_null, int bits, BlockGrid grid,
                                        void* out, FloatType out_type, cudaStream_t stream) {
  const Geometry g = make_geometry(grid);
  const int64_t chunks_per_row = (g.cols + kChunk - 1) / kChunk;
  const int64_t chunks = g.rows * chunks_per_row;
  if (chunks == 0) return cudaSuccess;
  const unsigned ctas = grid_size(chunks, 256);
  if (ctas == 0) return cudaErrorInvalidConfiguration;
  const cudaError_t bits_ok = with_bits(bits, [&](auto bits_c) {
    constexpr int kBits = decltype(bits_c)::value;
    with_float_type(out_type, [&](auto zero) {
      using T = decltype(zero);
      // Whole rows of chunks (cols % 8 == 0) keep every chunk's codes word-aligned and its
      // outputs aligned for one Chunk<T> store, given aligned base pointers.
      const bool wide = g.cols % kChunk == 0 && aligned(out, sizeof(Chunk<T>)) &&
                        (kBits == 3 || aligned(codes, kBits));
      auto launch = [&](auto wide_c) {
        dequantize_kernel<T, kBits, decltype(wide_c)::value><<<ctas, 256, 0, stream>>>(
            codes, scales, codebook, diagonal_or_null, g, chunks_per_row, static_cast<T*>(out));
      };
      if (wide) launch(std::true_type{});
      else launch(std::false_type{});
    });
  });
  return bits_ok != cudaSuccess ? bits_ok : cudaGetLastError();
}

cudaError_t launch_quantize_scales(const float* scales, int64_t n, const float* scale_codebook,
                                   uint8_t* codes, float* group_max, unsigned long long* first_bad,
                                   cudaStream_t stream) {
  if (cudaError_t e = reset_first_bad(first_bad, stream); e != cudaSuccess) return e;
  if (n == 0) return cudaSuccess;
  const unsigned ctas = grid_size(n, kScaleGroupSize);
  if (ctas == 0) return cudaErrorInvalidConfiguration;
  quantize_scales_kernel<<<ctas, kScaleGroupSize, 0, stream>>>(scales, n, scale_codebook, codes,
                                                               group_max, first_bad);
  return cudaGetLastError();
}

cudaError_t launch_dequantize_scales(const uint8_t* codes, int64_t n, const float* group_max,
                                     const float* scale_codebook, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned ctas = grid_size(n, 256);
  if (ctas == 0) return cudaErrorInvalidConfiguration;
  dequantize_scales_kernel<<<ctas, 256, 0, stream>>>(codes, n, group_max, scale_codebook, out);
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
