"""1-bit FQT (``"fqt1"``, docs/arith.md) from Python: the quantizers as functions and the
layers :class:`Fqt1Linear` / :class:`Fqt1Conv2d`, re-exported by :mod:`lowbit.arith`.

The work is done by ``torch.ops.lowbit.binarize``, ``debinarize``, ``binarize_weight`` and
``agp_quantize``; the autograd functions follow the C++ ones of ``src/arith/fqt_layers.cpp``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._arith_base import _ArithLayer, _check_conv_options, _check_int, _check_seed, _draw_seed
from ._library import load as _load_library

_load_library()


def _check_tensor(where: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lowbit.{where}: expected a tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"lowbit.{where}: expected a floating tensor; got {x.dtype}")
    return x


def _check_bits(where: str, bits: object) -> int:
    _check_int(where, "bits", bits)
    if not 1 <= bits <= 8:  # type: ignore[operator]
        raise ValueError(f"lowbit.{where}: bits must be in [1, 8]; got {bits}")
    return int(bits)  # type: ignore[arg-type]


def _op(where: str, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:
        raise ValueError(f"lowbit.{where}: " + str(e).split("\n", 1)[0]) from None


# ----------------------------------------------------------------------------------------
# Quantizers


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``x`` on fqt1's 1-bit activation grid (float32, ``x``'s shape and device): per sample
    (row of ``x.reshape(len(x), -1)``) ``s sign(x)`` with ``s = mean|x|`` for a tensor with
    a negative value, or ``{0, s}`` with threshold ``s / 2`` (Lloyd's 1-bit quantizer) for a
    non-negative one. NaN or Inf raise ``ValueError``."""
    x = _check_tensor("binarize", x)
    packed, scales, non_negative = _op("binarize", torch.ops.lowbit.binarize, x.detach().cpu())
    return torch.ops.lowbit.debinarize(packed, scales, non_negative, list(x.shape)).to(x.device)


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """``alpha_o sign(W_o)`` (0 counts as +), ``alpha_o = mean|W_o|`` over output channel
    ``o`` (dim 0): fqt1's 1-bit weight. Same shape and dtype as ``w``."""
    w = _check_tensor("binarize_weight", w)
    return torch.ops.lowbit.binarize_weight(w.detach())


def agp_quantize(g: torch.Tensor, group_dim: int = 0, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """Activation Gradient Pruning: the groups of ``g`` are its slices along ``group_dim``;
    the ``ceil(groups / bits)`` with the largest range (max - min) are kept, each rounded
    stochastically (unbiased) to ``bits`` bits on its own grid ``min + i (max - min) /
    (2^bits - 1)``, and the rest become 0. ``bits=1`` keeps every group (per-group 1-bit
    quantization). The rounding is a pure function of ``seed`` (>= 0)."""
    g = _check_tensor("agp_quantize", g)
    _check_int("agp_quantize", "group_dim", group_dim)
    if g.dim() == 0 or not -g.dim() <= group_dim < g.dim():
        raise ValueError(f"lowbit.agp_quantize: group_dim {group_dim} is not a dimension of shape {tuple(g.shape)}")
    bits = _check_bits("agp_quantize", bits)
    seed = _check_seed("agp_quantize", seed)
    return _op("agp_quantize", torch.ops.lowbit.agp_quantize, g.detach(), group_dim % g.dim(), bits, seed)


def _kept_bytes(x: torch.Tensor, edge: bool) -> int:
    """What an fqt1 layer keeps of its input for backward: the input (edge) or its packed
    bits, one fp32 scale a sample and a flag byte."""
    if edge:
        return x.numel() * 4
    samples = x.shape[0] if x.dim() > 0 else 1
    return (x.numel() + 7) // 8 + 4 * samples + 1


# ----------------------------------------------------------------------------------------
# Autograd functions (src/arith/fqt_layers.cpp)


def _keep_1bit_input(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                     scq: bool, edge: bool, generator: torch.Generator) -> torch.Tensor:
    """Keeps for backward x itself (edge) or its packed 1-bit codes, and the weight; returns
    x's forward value."""
    ctx.bits, ctx.scq, ctx.edge, ctx.generator = bits, scq, edge, generator
    ctx.has_bias, ctx.x_shape, ctx.x_dtype = bias is not None, tuple(x.shape), x.dtype
    if edge:
        ctx.save_for_backward(x.detach(), weight)
        return x
    packed, scales, non_negative = torch.ops.lowbit.binarize(x.detach().cpu())
    ctx.non_negative = non_negative
    ctx.save_for_backward(packed, scales, weight)
    return torch.ops.lowbit.debinarize(packed, scales, non_negative, list(x.shape)).to(x.device, x.dtype)


def _forward_weight(weight: torch.Tensor, edge: bool) -> torch.Tensor:
    """The weight an fqt1 layer's forward uses: fp32 at an edge layer, else 1-bit."""
    return weight if edge else torch.ops.lowbit.binarize_weight(weight.detach())


def _kept_input_and_weight(ctx: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input as forward used it, and the layer's (fp32) weight."""
    if ctx.edge:
        x, weight = ctx.saved_tensors
        return x, weight
    packed, scales, weight = ctx.saved_tensors
    return torch.ops.lowbit.debinarize(packed, scales, ctx.non_negative, list(ctx.x_shape)).to(device), weight


def _quantized_gradients(ctx: Any, gy: torch.Tensor, channel_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The neural gradient for dX (per-sample groups) and for dW (per-channel groups with
    SCQ, else the same per-sample one)."""
    g = gy.float()
    per_sample = torch.ops.lowbit.agp_quantize(g, 0, ctx.bits, _draw_seed(ctx.generator))
    if not ctx.scq:
        return per_sample, per_sample
    return per_sample, torch.ops.lowbit.agp_quantize(g, channel_dim, ctx.bits, _draw_seed(ctx.generator))


class _Fqt1LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int, scq: bool,
                edge: bool, generator: torch.Generator) -> torch.Tensor:
        xq = _keep_1bit_input(ctx, x, weight, bias, bits, scq, edge, generator)
        return F.linear(xq, _forward_weight(weight, edge), bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        gy = grad_output
        x, weight = _kept_input_and_weight(ctx, gy.device)
        wq = _forward_weight(weight, ctx.edge)
        g_input, g_weight = _quantized_gradients(ctx, gy, gy.dim() - 1)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(g_input, wq.float()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.matmul(g_weight.reshape(-1, gy.shape[-1]).t(), x.float().reshape(-1, x.shape[-1]))
            dw = dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.reshape(-1, gy.shape[-1]).sum(0)
        return dx, dw, db, None, None, None, None


class _Fqt1Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, int], padding: Tuple[int, int], bits: int, scq: bool, edge: bool,
                generator: torch.Generator) -> torch.Tensor:
        xq = _keep_1bit_input(ctx, x, weight, bias, bits, scq, edge, generator)
        ctx.stride, ctx.padding = list(stride), list(padding)
        return F.conv2d(xq, _forward_weight(weight, edge), bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        gy = grad_output
        x, weight = _kept_input_and_weight(ctx, gy.device)
        wq = _forward_weight(weight, ctx.edge)
        g_input, g_weight = _quantized_gradients(ctx, gy, 1)

        def product(g: torch.Tensor, mask):
            return torch.ops.aten.convolution_backward(g, x.float(), wq.float(), None, ctx.stride, ctx.padding,
                                                       [1, 1], False, [0, 0], 1, mask)

        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = product(g_input, [True, False, False])[0].to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = product(g_weight, [False, True, False])[1].to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum((0, 2, 3))
        return dx, dw, db, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Layers


class _FqtLayer(_ArithLayer):
    """The fqt1 options of a layer: ``bits`` (AGP keeps 1/bits of the gradient groups at
    ``bits`` bits; 1 prunes nothing), ``scq`` (per-channel groups for the weight gradient)
    and ``edge`` (a model's first or last layer: fp32 forward, gradients still quantized)."""

    bits: int
    scq: bool
    edge: bool

    def _init_fqt(self, bits: int, scq: bool, edge: bool, seed: int) -> None:
        where = type(self).__name__
        self.bits = _check_bits(where, bits)
        if not isinstance(scq, bool) or not isinstance(edge, bool):
            raise TypeError(f"lowbit.{where}: scq and edge must be bool; got {scq!r}, {edge!r}")
        self.scq, self.edge = scq, edge
        self._init_arith(seed)

    def _forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.edge else binarize(x).to(x.dtype)

    def _record(self, x: torch.Tensor) -> None:
        self.kept_bytes = _kept_bytes(x, self.edge)
        self.fp32_bytes = x.numel() * 4

    def _fqt_repr(self) -> str:
        return f", arith=fqt1, bits={self.bits}, scq={self.scq}, edge={self.edge}, seed={self.seed}"


class Fqt1Linear(_FqtLayer, nn.Linear):
    """``nn.Linear`` under 1-bit FQT (docs/arith.md). Forward: ``F.linear`` of the 1-bit
    input (:func:`binarize`) and weight (:func:`binarize_weight`), straight through to both.
    Backward: dX from the output gradient through :func:`agp_quantize` per sample, dW from it
    per output channel (``scq``; per sample without), the bias gradient exact. Kept for
    backward: the input's packed bits and per-sample scales (``kept_bytes`` = ceil(numel / 8)
    + 4 samples + 1). ``edge=True``: fp32 forward and input kept (as binary networks keep
    their first and last layer). Without grad mode: the forward only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 bits: int = 4, scq: bool = True, edge: bool = False, seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_fqt(bits, scq, edge, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._records(x, self.weight, self.bias):
            return F.linear(self._forward_input(x), _forward_weight(self.weight, self.edge), self.bias)
        self._record(x)
        return _Fqt1LinearFunction.apply(x, self.weight, self.bias, self.bits, self.scq, self.edge, self.generator)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fqt_repr()


class Fqt1Conv2d(_FqtLayer, nn.Conv2d):
    """``nn.Conv2d`` under 1-bit FQT (as :class:`Fqt1Linear`; dX's gradient groups are
    samples, dW's output channels). Only ``groups=1``, ``dilation=1`` and
    ``padding_mode='zeros'``; other options raise ``ValueError`` naming them."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 bits: int = 4, scq: bool = True, edge: bool = False, seed: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._padding2 = _check_conv_options(type(self).__name__, self.dilation, self.groups, self.padding_mode,
                                             self.padding, self.kernel_size)
        self._init_fqt(bits, scq, edge, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if not self._records(x, self.weight, self.bias):
            out = F.conv2d(self._forward_input(x), _forward_weight(self.weight, self.edge), self.bias, self.stride,
                           self._padding2)
        else:
            self._record(x)
            out = _Fqt1Conv2dFunction.apply(x, self.weight, self.bias, tuple(self.stride), self._padding2, self.bits,
                                            self.scq, self.edge, self.generator)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return super().extra_repr() + self._fqt_repr()


def _fqt_kwargs(bits: int, scq: bool, edge: bool, seed: int) -> dict:
    return {"bits": bits, "scq": scq, "edge": edge, "seed": seed, "device": "meta"}


def fqt_linear_like(m: nn.Linear, bits: int, scq: bool, edge: bool, seed: int) -> Fqt1Linear:
    """An :class:`Fqt1Linear` (on the meta device) of ``m``'s shape, for :func:`convert`."""
    return Fqt1Linear(m.in_features, m.out_features, m.bias is not None, **_fqt_kwargs(bits, scq, edge, seed))


def fqt_conv_like(m: nn.Conv2d, bits: int, scq: bool, edge: bool, seed: int) -> Fqt1Conv2d:
    """An :class:`Fqt1Conv2d` (on the meta device) of ``m``'s options, for :func:`convert`."""
    return Fqt1Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None, m.padding_mode, **_fqt_kwargs(bits, scq, edge, seed))
