// CUDA kernels of the codec ops, behind host launchers that take raw device pointers and a
// stream. No torch header is included here, so this file (and codec_kernels.cu) compiles with
// nvcc on any machine, also against a CPU-only LibTorch: CI builds it so it cannot rot. The
// torch glue (argument checks, allocation, dispatch) lives in codec_cuda_ops.cpp.
//
// Every launcher reproduces the CPU kernel of the same op (src/quant/codec_cpu.cpp) bit for
// bit: the same fp32 operations in the same order, rounded the same way (no FMA contraction).
// Launchers only enqueue work on `stream` and return the launch status; none synchronizes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lowbit::cuda {

// Element type of a floating matrix (input of quantize, output of dequantize).
enum class FloatType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A rows x cols row-major matrix split into blocks of block_size elements of one row
// (block_size a power of two in [16, 4096], already validated).
struct BlockGrid {
  int64_t rows, cols, block_size;
};

// Flat index of the first NaN/Inf input seen by a kernel: the launcher sets *first_bad to
// kNoBadValue before its kernel, and the kernel lowers it with atomicMin. Reading it back is
// the caller's business (and a host synchronization).
constexpr unsigned long long kNoBadValue = ~0ull;

// scales[r, b] = max |x| over block b of row r (the diagonal element left out when
// skip_diagonal); float32 [rows, ceil(cols / block_size)].
cudaError_t launch_block_absmax(const void* input, FloatType type, BlockGrid grid, bool skip_diagonal,
                                float* scales, unsigned long long* first_bad, cudaStream_t stream);

struct QuantizeArgs {
  const void* input;          // [rows, cols] of `type`
  FloatType type;
  BlockGrid grid;
  const float* codebook;      // 2^bits ascending values, on the device
  int bits;                   // 3, 4 or 8
  bool keep_diagonal;         // square input: diagonal to `diagonal`, quantized as 0
  bool stochastic;
  uint64_t seed;
  bool given_scales;          // true: read `scales`; false: write the block absmax there
  float* scales;              // [rows, ceil(cols / block_size)]
  uint8_t* codes;             // [rows, ceil(cols * bits / 8)]
  float* diagonal;            // [rows] when keep_diagonal, else unused
  unsigned long long* first_bad;
};
cudaError_t launch_quantize_blockwise(const QuantizeArgs& args, cudaStream_t stream);

// out[r, c] = codebook[code] * scale of its block, with diagonal[r] at (r, r) when given.
cudaError_t launch_dequantize_blockwise(const uint8_t* codes, const float* scales, const float* codebook,
                                        const float* diagonal_or_null, int bits, BlockGrid grid,
                                        void* out, FloatType out_type, cudaStream_t stream);

// Double quantization of n block scales (groups of kScaleGroupSize share their maximum).
// Negative or non-finite scales are reported through first_bad, as for inputs above.
cudaError_t launch_quantize_scales(const float* scales, int64_t n, const float* scale_codebook,
                                   uint8_t* codes, float* group_max, unsigned long long* first_bad,
                                   cudaStream_t stream);
cudaError_t launch_dequantize_scales(const uint8_t* codes, int64_t n, const float* group_max,
                                     const float* scale_codebook, float* out, cudaStream_t stream);

}  // namespace lowbit::cuda
