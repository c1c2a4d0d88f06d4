"""The block-wise low-bit codec (docs/codec.md) from Python.

``quantize`` stores a tensor at 3, 4 or 8 bits per element: blocks of ``block_size``
elements of one row share an fp32 absmax scale, and each element is the index of the
nearest value of a 2^bits code table (``codebook``). The work is done by the C++ codec
(``lowbit::QuantizedMatrix``, through ``torch.ops.lowbit.quantize_matrix`` /
``dequantize_matrix``); the lower-level ops (``torch.ops.lowbit.codebook``,
``block_absmax``, ``quantize_blockwise``, ``dequantize_blockwise``, ``quantize_scales``,
``dequantize_scales``) are there too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

import torch

from ._library import load as _load_library

_load_library()

__all__ = ["QuantizedTensor", "quantize", "dequantize", "codebook"]

MappingName = Literal["linear2", "dynamic", "linear", "kashin"]


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored by the codec: plain tensors, so it can be saved, loaded with
    ``torch.load(..., weights_only=True)`` (through :meth:`state`) and moved between devices.

    ``codes`` (uint8, packed per row), ``scales`` (fp32 block absmax; uint8 codes with
    ``double_quant_scales``), ``meta`` (int64: matrix shape and codec options, written and
    checked by the C++ codec), ``diagonal`` (fp32, ``keep_diagonal`` only),
    ``scale_group_max`` (fp32, ``double_quant_scales`` only), ``centroids`` (fp32 [2^bits, 2],
    ``mapping="kashin"`` only; its scales are fp32 block norms); ``shape`` and ``dtype`` of the
    original tensor. The codec works on a matrix: a 1-D tensor is one row, a tensor with
    more than two dimensions is viewed as (shape[0], rest).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    meta: torch.Tensor
    diagonal: Optional[torch.Tensor]
    scale_group_max: Optional[torch.Tensor]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    bits: int
    mapping: str
    block_size: int
    centroids: Optional[torch.Tensor] = None

    def state(self) -> Dict[str, torch.Tensor]:
        """The C++ codec's state: ``codes``, ``scales``, ``meta`` and, when present,
        ``diagonal``, ``scale_group_max`` and ``centroids``."""
        out = {"codes": self.codes, "scales": self.scales, "meta": self.meta}
        if self.diagonal is not None:
            out["diagonal"] = self.diagonal
        if self.scale_group_max is not None:
            out["scale_group_max"] = self.scale_group_max
        if self.centroids is not None:
            out["centroids"] = self.centroids
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes, scales and diagonal (``meta`` not counted)."""
        return sum(t.numel() * t.element_size() for k, t in self.state().items() if k != "meta")

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return QuantizedTensor(self.codes.to(device), self.scales.to(device), self.meta, move(self.diagonal),
                               move(self.scale_group_max), self.shape, self.dtype, self.bits, self.mapping,
                               self.block_size, move(self.centroids))


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _check(name: str, value: object, kind: type) -> None:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise TypeError(f"lowbit.quantize: {name} must be {kind.__name__}; got {value!r}")


def quantize(
    tensor: torch.Tensor,
    bits: Literal[3, 4, 8] = 4,
    mapping: MappingName = "linear2",
    block_size: int = 64,
    *,
    keep_diagonal: bool = False,
    double_quant_scales: bool = False,
    stochastic: bool = False,
    seed: int = 0,
) -> QuantizedTensor:
    """Quantizes a floating tensor (float32, bfloat16, float16, float64) block-wise.

    Args:
        bits: 3, 4 or 8 bits per element.
        mapping: code table: ``"linear2"`` (the paper's linear-square, default),
            ``"dynamic"`` (dynamic tree), ``"linear"``, or ``"kashin"`` (Kashin quantization, bits 3
            or 4: each block x = u + Q v, pairs (u_i, v_i) coded as fitted 2-D centroids).
        block_size: elements of one row per scale; a power of two from 16 to 4096.
        keep_diagonal: square matrices only: the diagonal is kept in fp32 and only the
            off-diagonal is quantized (as 4-bit Shampoo stores inverse roots).
        double_quant_scales: block scales stored as 8-bit codes (4.13 instead of 4.5 bits
            per element at 4 bits, block 64).
        stochastic: unbiased stochastic rounding, a pure function of ``seed`` and the
            element index.

    Each element's error is at most its block's absmax times the table's largest
    rounding error (0.1244 for 4-bit linear-2). Bad arguments raise ``TypeError`` /
    ``ValueError`` naming them.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"lowbit.quantize: expected a tensor; got {type(tensor).__name__}")
    for name, value, kind in (("bits", bits, int), ("mapping", mapping, str), ("block_size", block_size, int),
                              ("keep_diagonal", keep_diagonal, bool),
                              ("double_quant_scales", double_quant_scales, bool),
                              ("stochastic", stochastic, bool), ("seed", seed, int)):
        _check(name, value, kind)
    if keep_diagonal and (tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]):
        raise ValueError(f"lowbit.quantize: keep_diagonal needs a square matrix; got shape {list(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError("lowbit.quantize: the tensor is empty")
    try:
        state = torch.ops.lowbit.quantize_matrix(_as_matrix(tensor), bits, mapping, block_size, keep_diagonal,
                                                 double_quant_scales, stochastic, seed)
    except RuntimeError as e:
        raise ValueError(str(e).split("\n", 1)[0]) from None
    return QuantizedTensor(codes=state["codes"], scales=state["scales"], meta=state["meta"],
                           diagonal=state.get("diagonal"), scale_group_max=state.get("scale_group_max"),
                           shape=tuple(tensor.shape), dtype=tensor.dtype, bits=bits, mapping=mapping,
                           block_size=block_size, centroids=state.get("centroids"))


_FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAPPING_IDS = {"linear2": 0, "linear-2": 0, "dynamic": 1, "dt": 1, "linear": 2, "kashin": 3}  # lowbit::Mapping


def _check_parts(q: QuantizedTensor) -> None:
    """The fields of ``q`` against its C++ ``meta`` (shape and codec options): a
    QuantizedTensor whose parts were swapped or edited must not decode into another matrix."""
    who = "lowbit.dequantize: "
    meta = q.meta
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or meta.shape != (7,):
        return  # the C++ codec names what is wrong with it
    rows, cols, bits, mapping, block_size, keep_diagonal, double_quant = meta.tolist()
    shape = tuple(q.shape)
    expected = (1, math.prod(shape)) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))
    if (rows, cols) != expected:
        raise ValueError(who + f"meta holds a {rows} x {cols} matrix, but shape {list(shape)} is stored as a "
                         f"{expected[0]} x {expected[1]} matrix")
    claimed = {"bits": (bits, q.bits), "mapping": (mapping, _MAPPING_IDS.get(q.mapping)),
               "block_size": (block_size, q.block_size),
               "keep_diagonal": (keep_diagonal, int(q.diagonal is not None)),
               "double_quant_scales": (double_quant, int(q.scale_group_max is not None)),
               "centroids": (int(mapping == _MAPPING_IDS["kashin"]), int(q.centroids is not None))}
    for name, (stored, field) in claimed.items():
        if stored != field:
            raise ValueError(who + f"meta says {name}={stored}, but the QuantizedTensor says "
                             f"{name}={getattr(q, name, field)!r}")


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensor ``q`` approximates, in ``dtype`` (default: the original dtype), with its
    original shape, on the device of ``q.codes``. Inconsistent parts raise ``ValueError``
    naming them."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"lowbit.dequantize: expected a QuantizedTensor; got {type(q).__name__}")
    out_dtype = dtype or q.dtype
    if out_dtype not in _FLOATING:
        raise ValueError(f"lowbit.dequantize: dtype must be float32, bfloat16, float16 or float64; got {out_dtype}")
    _check_parts(q)
    try:
        out = torch.ops.lowbit.dequantize_matrix(q.state(), out_dtype)
    except RuntimeError as e:
        raise ValueError(str(e).split("\n", 1)[0]) from None
    if out.numel() != math.prod(q.shape):
        raise ValueError(f"lowbit.dequantize: the codes hold {out.numel()} values; shape {list(q.shape)} needs "
                         f"{math.prod(q.shape)}")
    return out.reshape(q.shape)


def codebook(mapping: MappingName = "linear2", bits: Literal[3, 4, 8] = 4) -> torch.Tensor:
    """The 2^bits code values of ``mapping``, sorted, as a float32 tensor (they contain 0 and 1)."""
    try:
        return torch.ops.lowbit.codebook(mapping, bits)
    except RuntimeError as e:
        raise ValueError(str(e).split("\n", 1)[0]) from None
