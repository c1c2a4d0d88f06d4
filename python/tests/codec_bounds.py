"""The codec's error bound (docs/codec.md, "Rounding and error bounds") with its float
rounding terms derived once, and a reference decoder of the packed layout written from the
docs; shared by test_codec.py and test_fuzz_codec.py. No lowbit code is used here."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

# Unit roundoff u (half an ulp of 1) and half the smallest subnormal (the absolute error of
# a result that underflows) of each dtype the codec reads or writes.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}
UNDERFLOW = {torch.float32: 2.0 ** -150, torch.float64: 2.0 ** -1075, torch.bfloat16: 2.0 ** -134,
             torch.float16: 2.0 ** -25}
U32, ETA32 = UNIT_ROUNDOFF[torch.float32], UNDERFLOW[torch.float32]


def max_rounding_error(table: torch.Tensor) -> float:
    """E of nearest rounding: the largest distance from a point of [-1, 1] to its nearest code
    (half the widest gap, or the distance from +-1 to the outermost code)."""
    t = table.double()
    return max(((t[1:] - t[:-1]) / 2).max().item(), (t[0] + 1).abs().item(), (1 - t[-1]).abs().item())


def max_gap(table: torch.Tensor) -> float:
    """G of stochastic rounding: a value of [-1, 1] rounds to one of the two codes around it
    (or clamps to the outermost one), so it moves by at most the widest gap (or the distance
    from +-1 to the outermost code)."""
    t = table.double()
    return max((t[1:] - t[:-1]).max().item(), (t[0] + 1).abs().item(), (1 - t[-1]).abs().item())


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The matrix the codec works on: a 1-D (or 0-D) tensor is one row, more dimensions are
    viewed as (shape[0], rest)."""
    if t.dim() == 2:
        return t
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def block_absmax(m: torch.Tensor, block: int, skip_diagonal: bool = False) -> torch.Tensor:
    """Per block (rows x ceil(cols / block)), the absmax of its elements in float64 (the
    diagonal excluded with ``skip_diagonal``)."""
    a = m.double().abs()
    if skip_diagonal:
        a = a.clone()
        a.diagonal().zero_()
    rows, cols = a.shape
    pad = (-cols) % block
    return torch.nn.functional.pad(a, (0, pad)).reshape(rows, -1, block).amax(-1)


def per_element(blocks: torch.Tensor, block: int, cols: int) -> torch.Tensor:
    """A per-block tensor repeated over the elements of each block."""
    return blocks.repeat_interleave(block, dim=1)[:, :cols]


def error_bound(x: torch.Tensor, scale: torch.Tensor, budget: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The largest |dequantize(quantize(x)) - x| an element may show (float64, per element),
    for a block scale s >= |x| (the absmax, or a double-quantized scale rounded up) and a
    rounding budget B (E for nearest, G for stochastic rounding), u = 2^-24, eta = 2^-150:

    - the code c: nearest rounding compares x with fl(fl(m_k) s) (the midpoints m_k of the
      fp32 table, each rounded once, times s, rounded once): the thresholds sit within
      2u s + eta of the exact ones, so |c s - x| <= B s + 2u s + eta. Stochastic rounding
      divides fl(x / s) (relative error u, and eta / s below the normal range), then picks
      one of the two codes around it: |c s - x| <= B s + u s + eta.
    - the value fl(c s) (|c| <= 1): u s + eta more;
    - a float64 input is first rounded to fp32: u |x| + eta;
    - a bfloat16 / float16 output rounds the fp32 value (|value| <= s) once more:
      u_out s + eta_out;
    - the test's own float64 difference of two values of magnitude <= s: 2^-53 s, inside u s.

    Total: s (B + 4u + u_out) + u |x| [float64 input] + 4 eta + eta_out."""
    s = scale.double()
    xd = x.double()
    bound = s * (budget + 4 * U32) + 4 * ETA32
    if x.dtype == torch.float64:
        bound = bound + U32 * xd.abs()
    if out_dtype in (torch.bfloat16, torch.float16):
        bound = bound + UNIT_ROUNDOFF[out_dtype] * s + UNDERFLOW[out_dtype]
    return bound


def unpack_reference(codes: torch.Tensor, bits: int, cols: int) -> np.ndarray:
    """Code indices from a packed [rows, ceil(cols bits / 8)] uint8 tensor, as docs/codec.md
    lays them out: element k of a row is bits k*bits .. k*bits + bits - 1 of the row's
    little-endian bit stream (8 bits: one byte each; 4 bits: element 2j in the low nibble of
    byte j)."""
    c = codes.numpy()
    rows = c.shape[0]
    stream = np.unpackbits(c, axis=1, bitorder="little")[:, :cols * bits].reshape(rows, cols, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(-1)


def decode_reference(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                     diagonal: Optional[torch.Tensor], bits: int, block: int, cols: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """fl(table[index] * scale) per element in fp32 (one IEEE product, as numpy computes it),
    the fp32 diagonal written over it when given, then cast to ``dtype``."""
    idx = unpack_reference(codes, bits, cols)
    rows = idx.shape[0]
    values = table.numpy().astype(np.float32)[idx]
    s = np.repeat(scales.numpy().astype(np.float32), block, axis=1)[:, :cols]
    out = (values * s).astype(np.float32)
    if diagonal is not None and diagonal.numel() > 0:
        n = min(rows, cols)
        out[np.arange(n), np.arange(n)] = diagonal.numpy()[:n]
    return torch.from_numpy(out).to(dtype)


def packed_row_bytes(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 8)
