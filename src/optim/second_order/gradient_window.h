// M-FAC's sliding window of gradients and the inverse-Fisher-vector product it defines
// (see lowbit/mfac.h), on plain tensors so the C++ optimizer and the Python ops share it.
#pragma once

#include <ATen/core/Tensor.h>

#include <lowbit/quant_options.h>

#include <cstdint>

namespace lowbit::mfac {

struct WindowLayout {
  int64_t size = 32;       // m
  int64_t dim = 0;         // d: elements of one gradient
  int bits = 32;           // 32: fp32 rows; 8 or 4: the block-wise codec
  Mapping mapping = Mapping::DynamicTree;  // a table, or Kashin (4 bits; centroids fitted per row)
  int64_t block_size = 64;
  bool quantized() const { return bits != 32; }
  bool kashin() const { return quantized() && mapping == Mapping::Kashin; }
};

// The window's tensors (handles: functions update them in place).
struct WindowTensors {
  at::Tensor rows;    // fp32 m x d (unquantized)
  at::Tensor codes;   // uint8 m x packed bytes (quantized)
  at::Tensor scales;  // fp32 m x blocks (quantized): block absmaxes, or Kashin block norms
  at::Tensor centroids;  // fp32 m x 2^bits x 2 (Kashin): each row is its own [1, d] Kashin matrix
  at::Tensor gram;    // float64 m x m: G G^T of the stored rows
  int64_t count = 0;  // gradients pushed so far
};

// An empty window on `options`' device.
WindowTensors make_window(const WindowLayout& layout, const at::TensorOptions& options);

// Checks the tensors against the layout (shapes, dtypes, count >= 0), naming them with
// `who`; for checkpoints.
void check_window(const WindowTensors& w, const WindowLayout& layout, const std::string& who);
// Checks the values of a window that passed check_window, for checkpoints: finite rows (or
// finite, non-negative block scales) and a Gram matrix that is, up to rounding, that of the
// stored gradients (the inverse-Fisher product solves with it, and a corrupted one can make
// that system singular).
void check_window_values(const WindowTensors& w, const WindowLayout& layout, const std::string& who);

// Stores g (d elements) in row count % m, as it will be read back, and updates the Gram
// matrix's row and column of that slot. Returns the stored gradients as an n x d float64
// matrix (n = min(count, m)), read once per step for both the Gram row and the product.
at::Tensor push(WindowTensors& w, const WindowLayout& layout, const at::Tensor& gradient);

// The stored gradients as an n x d fp32 matrix.
at::Tensor stored_rows(const WindowTensors& w, const WindowLayout& layout);

// F^-1 v for F = damping I + (1/n) G^T G over the stored gradients `rows` (n x d float64,
// as push returns them) and the window's Gram matrix.
at::Tensor inverse_fisher_product(const WindowTensors& w, const at::Tensor& rows, const at::Tensor& v, double damping);

// Bytes of the window's tensors.
int64_t window_bytes(const WindowTensors& w);

}  // namespace lowbit::mfac
