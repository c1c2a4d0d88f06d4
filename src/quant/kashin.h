// Kashin quantization (seed 004, arXiv 2404.09737): a block x of d elements is written as
// x = u + Q v over the redundant frame [I, Q] (Q a fixed d x d orthogonal matrix), with both
// ||u||_inf and ||v||_inf small; each element index i then carries the pair (u_i, v_i),
// which is replaced by the nearest of 2^bits two-dimensional centroids fitted by Lloyd
// iterations. Everything is written with ATen ops, so the same code runs on any device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace lowbit::kashin {

// Constants of the format: the decoder rebuilds the same frame and needs nothing stored.
constexpr uint64_t kFrameSeed = 0x4B415348494E0004ull;  // "KASHIN", seed 004
constexpr int64_t kIterations = 24;  // truncation rounds; the residual left is below eta^24 ||x|| = 0.5% ||x||
constexpr double kLevelDecay = 0.8;  // eta: each round clips at eta times the previous level
// First level, in units of ||x||_2 / sqrt(d) (LV's M_0 = ||x|| / sqrt(delta N), N = 2d: delta =
// 5.6). Lower levels give flatter factors but break the uncertainty principle on spiky blocks:
// at 1/sqrt(32) a spike kept 26% of its norm after 24 rounds; 0.3 is the lowest of 0.25, 0.3,
// 0.35 that leaves no residual on spikes, columns of Q and outlier rows at orders 16-256
// (tests/kashin_test.cpp).
constexpr double kFirstLevel = 0.3;
constexpr int64_t kLloydIterations = 16;
constexpr int64_t kLloydMaxPoints = 65536;  // centroids are fitted on an evenly strided subset of this size

// The d x d orthogonal frame Q, float32 on `device`: the Q factor (signs fixed so that R has
// a positive diagonal) of a d x d standard Gaussian matrix drawn from counter-based
// numbers seeded with kFrameSeed, in fp64. Cached per order on the CPU.
at::Tensor frame(int64_t order, const at::Device& device);

struct Decomposition {
  at::Tensor u;         // [n, d]
  at::Tensor v;         // [n, d]: x = u + v Q^T + residual, row by row (x^T = u^T + Q v^T)
  at::Tensor residual;  // [n, d]
};

// Lyubarskii-Vershynin truncation over the tight frame [I, Q] (frame bound 2), for each row
// x of `blocks` [n, d] (floating): with r_0 = x and levels M_k = kFirstLevel * eta^k *
// ||x||_2 / sqrt(d), round k adds a_k = clip(r_k / 2, M_k) to u and b_k = clip(Q^T r_k / 2,
// M_k) to v, and r_{k+1} = r_k - a_k - Q b_k. So ||u||_inf and ||v||_inf never exceed
// sum_k M_k < kFirstLevel / (1 - eta) * ||x||_2 / sqrt(d) = 1.5 ||x||_2 / sqrt(d), and x = u + Q v + r_K exactly.
// `frame` is Q itself (kashin::frame of order d).
Decomposition decompose(const at::Tensor& blocks, const at::Tensor& frame, int64_t iterations = kIterations,
                        double first_level = kFirstLevel, double level_decay = kLevelDecay);

// The first centroids (the paper's initialisation): a uniform grid over the bounding box of
// the points [N, 2], 2^ceil(bits/2) values of the first coordinate times 2^floor(bits/2) of
// the second, [2^bits, 2].
at::Tensor grid_centroids(const at::Tensor& points, int64_t bits);
// Index of the nearest centroid (Euclidean; the first on ties) of each point, int64 [N].
at::Tensor nearest_centroid(const at::Tensor& points, const at::Tensor& centroids);
// One Lloyd step: every centroid moves to the mean of the points nearest to it; a centroid
// with no points stays where it was.
at::Tensor lloyd_step(const at::Tensor& points, const at::Tensor& centroids);
// grid_centroids, then `iterations` Lloyd steps, float32 [2^bits, 2].
at::Tensor fit_centroids(const at::Tensor& points, int64_t bits, int64_t iterations = kLloydIterations);

// A [rows, cols] matrix coded block by block along rows (the last block of a row may be
// partial and uses a frame of its own order).
struct Code {
  at::Tensor indices;    // uint8 [rows, cols], one centroid index per element (unpacked)
  at::Tensor scales;     // float32 [rows, ceil(cols / block_size)]: ||x_block||_2 / sqrt(len)
  at::Tensor centroids;  // float32 [2^bits, 2]: (u_i, v_i) / scale
};
Code encode(const at::Tensor& matrix, int64_t bits, int64_t block_size);
// Writes s * (c_u[idx] + Q c_v[idx]) for each block into out (floating [rows, cols]).
void decode_into(const at::Tensor& indices, const at::Tensor& scales, const at::Tensor& centroids, int64_t block_size,
                 const at::Tensor& out);

// The codec's bit layout, with ATen ops (device-generic): indices uint8 [rows, cols] at
// `bits` (3 or 4) <-> packed uint8 [rows, ceil(cols * bits / 8)] (quant/packing.h's layout).
at::Tensor pack_rows(const at::Tensor& indices, int64_t bits);
at::Tensor unpack_rows(const at::Tensor& packed, int64_t bits, int64_t cols);

}  // namespace lowbit::kashin
