"""Low-bit training arithmetic (docs/arith.md) from Python: the layers of ``lowbit/arith.h``
as ``torch.nn`` modules, built on the C++ quantizers.

- :func:`luq_quantize`: LUQ, logarithmic unbiased (stochastic) quantization of a gradient.
- :class:`Luq4Linear`, :class:`Luq4Conv2d` (``"luq4"``): forward with x and W on a 4-bit
  uniform grid (fp32 accumulation), backward with the neural gradient through LUQ-4; what is
  kept for backward is x's packed 4-bit codes.
- :func:`binarize`, :func:`binarize_weight`, :func:`agp_quantize`, :class:`Fqt1Linear`,
  :class:`Fqt1Conv2d` (``"fqt1"``): 1-bit forward (packed activations kept), neural gradients
  through Activation Gradient Pruning per sample (for dX) and per channel (for dW, SCQ);
  in ``lowbit/_fqt_layers.py``.
- :class:`SketchedLinear` (``"rmm"``): exact forward and input gradient; the weight gradient
  from a Gaussian sketch S^T X of the input (randomized matrix multiplication).
- :func:`convert`: swaps the ``nn.Linear`` / ``nn.Conv2d`` layers of a model in place,
  keeping their ``Parameter`` objects; :func:`kept_bytes` / :func:`fp32_bytes`: the bytes the
  layers kept for backward in their last recorded forward, and what fp32 would have kept.

The work is done by ``torch.ops.lowbit.luq_quantize``, ``uniform_quantize4`` and
``uniform_dequantize4``; the autograd functions here follow the C++ ones of
``src/arith/layers.cpp``. The randomness of a layer (LUQ's rounding, RMM's sketches) comes
from a CPU ``torch.Generator`` of the layer, seeded at construction (``seed=``) or by
:func:`convert`, so a run is reproducible.
"""

from __future__ import annotations

import math
from typing import Any, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._arith_base import _ArithLayer, _check_conv_options, _check_int, _check_keep, _check_seed, _draw_seed
from ._fqt_layers import (Fqt1Conv2d, Fqt1Linear, _check_bits, agp_quantize, binarize, binarize_weight,
                          fqt_conv_like, fqt_linear_like)
from ._library import load as _load_library

_load_library()

__all__ = [
    "ARITHMETICS",
    "luq_quantize",
    "Luq4Linear",
    "Luq4Conv2d",
    "binarize",
    "binarize_weight",
    "agp_quantize",
    "Fqt1Linear",
    "Fqt1Conv2d",
    "SketchedLinear",
    "convert",
    "kept_bytes",
    "fp32_bytes",
]

ArithName = Literal["fp32", "luq4", "fqt1", "rmm"]
ARITHMETICS: Tuple[str, ...] = ("fp32", "luq4", "fqt1", "rmm")

_GRADIENT_BITS = 4  # LUQ-4: 1 sign bit, 3 exponent bits


# ----------------------------------------------------------------------------------------
# Quantizers


def luq_quantize(x: torch.Tensor, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """LUQ (Chmiel et al., arXiv 2112.10769) of a floating tensor at ``bits`` bits (1 sign
    bit, ``bits - 1`` exponent bits): every element becomes 0 or ``sign(x) alpha 2^j``,
    ``j = 0 .. 2^(bits-1) - 2``, ``alpha = max|x| / 2^(2^(bits-1) - 2)``, rounding
    stochastically between its two neighbouring levels (between 0 and alpha below alpha)
    with the probabilities that make ``E[luq_quantize(x)] = x``. The rounding is a pure
    function of ``seed`` (>= 0). Same shape, dtype and device as ``x``.

    Bad arguments raise ``TypeError`` / ``ValueError`` naming them; NaN or Inf in ``x``
    raise ``ValueError``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lowbit.luq_quantize: expected a tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"lowbit.luq_quantize: expected a floating tensor; got {x.dtype}")
    _check_int("luq_quantize", "bits", bits)
    if not 2 <= bits <= 8:
        raise ValueError(f"lowbit.luq_quantize: bits must be in [2, 8]; got {bits}")
    seed = _check_seed("luq_quantize", seed)
    if x.numel() == 0:  # (the C++ quantizer takes the max of the tensor)
        return torch.zeros_like(x)
    try:
        return torch.ops.lowbit.luq_quantize(x.detach(), bits, seed)
    except RuntimeError as e:
        raise ValueError(str(e).split("\n", 1)[0]) from None


def _quantize4(x: torch.Tensor, clip: bool) -> Tuple[torch.Tensor, float, int]:
    """x on the forward's 4-bit grid: (packed codes, scale, offset)."""
    return torch.ops.lowbit.uniform_quantize4(x.detach(), clip)


def _dequantize4(packed: torch.Tensor, scale: float, offset: int, shape: Sequence[int],
                 device: torch.device) -> torch.Tensor:
    return torch.ops.lowbit.uniform_dequantize4(packed, scale, offset, list(shape)).to(device)


def _check_clip(where: str, clip: object) -> bool:
    if not isinstance(clip, bool):
        raise TypeError(f"lowbit.{where}: clip must be bool; got {clip!r}")
    return clip


def _grid4(x: torch.Tensor, clip: bool) -> torch.Tensor:
    """The 4-bit forward value of x (float32, x's shape and device)."""
    packed, scale, offset = _quantize4(x, clip)
    return _dequantize4(packed, scale, offset, x.shape, x.device)


def _sketch(rows: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """The Gaussian sketch S (rows x k, entries N(0, 1/k)) of a seed, drawn on the CPU so
    forward and backward (and every device) see the same one."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g, dtype=torch.float32) / math.sqrt(k)).to(device)


def _sketch_size(keep: float, rows: int) -> int:
    return max(1, int(math.ceil(keep * rows)))


# ----------------------------------------------------------------------------------------
# Autograd functions (src/arith/layers.cpp)


def _keep_4bit_input(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], clip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """x on the 4-bit grid; keeps its packed codes (and the weight) for backward."""
    packed, scale, offset = _quantize4(x, clip)
    ctx.clip = clip
    ctx.save_for_backward(packed, weight)
    ctx.x_scale, ctx.x_offset, ctx.x_shape, ctx.x_dtype = scale, offset, tuple(x.shape), x.dtype
    ctx.generator = generator
    ctx.has_bias = bias is not None
    return _dequantize4(packed, scale, offset, x.shape, x.device)


def _kept_input_and_luq_gradient(ctx: Any, grad_output: torch.Tensor):
    """The weight, the 4-bit input kept by forward, and LUQ of the neural gradient."""
    packed, weight = ctx.saved_tensors
    x = _dequantize4(packed, ctx.x_scale, ctx.x_offset, ctx.x_shape, grad_output.device)
    gq = luq_quantize(grad_output.float(), _GRADIENT_BITS, _draw_seed(ctx.generator))
    return weight, x, gq


class _LuqLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], clip: bool,
                generator: torch.Generator) -> torch.Tensor:
        xq = _keep_4bit_input(ctx, x, weight, bias, clip, generator)
        out = F.linear(xq, _grid4(weight, clip), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        gy = grad_output
        weight, x, gq = _kept_input_and_luq_gradient(ctx, gy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(gq, _grid4(weight, ctx.clip)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.matmul(gq.reshape(-1, gq.shape[-1]).t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.reshape(-1, gy.shape[-1]).sum(0)
        return dx, dw, db, None, None


class _LuqConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, int], padding: Tuple[int, int], clip: bool,
                generator: torch.Generator) -> torch.Tensor:
        xq = _keep_4bit_input(ctx, x, weight, bias, clip, generator)
        ctx.stride, ctx.padding = list(stride), list(padding)
        out = F.conv2d(xq, _grid4(weight, clip), None if bias is None else bias.float(), stride, padding)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        gy = grad_output
        weight, x, gq = _kept_input_and_luq_gradient(ctx, gy)
        dx = dw = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dw, _ = torch.ops.aten.convolution_backward(
                gq, x, _grid4(weight, ctx.clip), None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
            dx = None if dx is None else dx.to(ctx.x_dtype)
            dw = None if dw is None else dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum((0, 2, 3))
        return dx, dw, db, None, None, None, None


class _SketchedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                seed: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        kept = torch.matmul(_sketch(x2.shape[0], k, seed, x.device).t(), x2.float())  # S^T X
        ctx.save_for_backward(kept, weight)
        ctx.seed = seed
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        kept, weight = ctx.saved_tensors
        gy = grad_output
        g2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(gy, weight)  # exact
        if ctx.needs_input_grad[1]:
            s = _sketch(g2.shape[0], kept.shape[0], ctx.seed, gy.device)
            dw = torch.matmul(torch.matmul(s.t(), g2.float()).t(), kept).to(weight.dtype)  # (S^T dY)^T (S^T X)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------------------
# Layers


class Luq4Linear(_ArithLayer, nn.Linear):
    """``nn.Linear`` under LUQ-4 (docs/arith.md): forward ``F.linear`` of x and W on the
    4-bit uniform grid (fp32 accumulation); backward with the output gradient through
    :func:`luq_quantize` (4 bits), dX = g_q W_q, dW = g_q^T x_q (straight through to the
    fp32 weight), the bias gradient exact. Kept for backward: x's packed 4-bit codes
    (``kept_bytes`` = ceil(numel / 2) + 8). Without grad mode: the 4-bit forward only.
    ``clip=True``: each grid's scale is the MSE-optimal clipping (docs/arith.md); ``False``:
    the absmax."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 clip: bool = True, seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.clip = _check_clip(type(self).__name__, clip)
        self._init_arith(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._records(x, self.weight, self.bias):
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(_grid4(x, self.clip), _grid4(self.weight, self.clip), bias)
            return out.to(x.dtype)
        self.kept_bytes = (x.numel() + 1) // 2 + 8
        self.fp32_bytes = x.numel() * 4
        return _LuqLinearFunction.apply(x, self.weight, self.bias, self.clip, self.generator)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", arith=luq4, clip={self.clip}, seed={self.seed}"


class Luq4Conv2d(_ArithLayer, nn.Conv2d):
    """``nn.Conv2d`` under LUQ-4 (as :class:`Luq4Linear`): forward ``F.conv2d`` of x and W on
    the 4-bit grid; backward from the LUQ-4 output gradient (``convolution_backward``); bias
    gradient exact. Only ``groups=1``, ``dilation=1`` and ``padding_mode='zeros'``; other
    options raise ``ValueError`` naming them. Kept for backward: x's packed 4-bit codes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 clip: bool = True, seed: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._padding2 = _check_conv_options(type(self).__name__, self.dilation, self.groups, self.padding_mode,
                                             self.padding, self.kernel_size)
        self.clip = _check_clip(type(self).__name__, clip)
        self._init_arith(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if not self._records(x, self.weight, self.bias):
            out = F.conv2d(_grid4(x, self.clip), _grid4(self.weight, self.clip), None if self.bias is None else self.bias.float(),
                           self.stride, self._padding2).to(x.dtype)
        else:
            self.kept_bytes = (x.numel() + 1) // 2 + 8
            self.fp32_bytes = x.numel() * 4
            out = _LuqConv2dFunction.apply(x, self.weight, self.bias, tuple(self.stride), self._padding2,
                                           self.clip, self.generator)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", arith=luq4, clip={self.clip}, seed={self.seed}"


class SketchedLinear(_ArithLayer, nn.Linear):
    """``nn.Linear`` with a randomized weight gradient (RMM, docs/arith.md): forward exact;
    kept for backward S^T X (k x in_features, fp32) with S a rows x k Gaussian sketch,
    entries N(0, 1/k), k = ceil(keep * rows) (rows: the input's leading dimensions
    flattened), regenerated in backward from a seed drawn from the layer's generator.
    dX = dY W exact; dW = (S^T dY)^T (S^T X), unbiased; bias gradient exact.
    ``kept_bytes`` = k * in_features * 4 + 8. Without grad mode: plain ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 keep: float = 0.25, seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.keep = _check_keep(type(self).__name__, keep)
        self._init_arith(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._records(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        k = _sketch_size(self.keep, rows)
        self.kept_bytes = k * self.in_features * 4 + 8
        self.fp32_bytes = x.numel() * 4
        return _SketchedLinearFunction.apply(x, self.weight, self.bias, k, _draw_seed(self.generator))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", arith=rmm, keep={self.keep}, seed={self.seed}"


# ----------------------------------------------------------------------------------------
# Whole models

_LINEARS = (nn.Linear, Luq4Linear, Fqt1Linear, SketchedLinear)
_CONVS = (nn.Conv2d, Luq4Conv2d, Fqt1Conv2d)


def _swappable(m: nn.Module) -> bool:
    """A layer convert replaces (exactly these types: subclasses are left alone)."""
    return type(m) in _LINEARS or type(m) in _CONVS


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
               "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Gives ``new`` (built on the meta device) the Parameter objects, buffers, training
    flag and hooks of ``old``."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, param in list(new.named_parameters(recurse=False)):
        if name not in dict(old.named_parameters(recurse=False)):
            setattr(new, name, None)
    for name, buffer in old.named_buffers(recurse=False):
        new.register_buffer(name, buffer)
    new.train(old.training)
    for attr in _HOOK_DICTS:  # shared, not copied: the handles of old hooks keep working
        if attr in old.__dict__ and attr in new.__dict__:
            object.__setattr__(new, attr, old.__dict__[attr])
    return new


class _Choice:
    """What convert builds: the arithmetic and its options, and which layers are edges."""

    def __init__(self, arith: str, rmm_keep: float, luq_clip: bool, fqt_bits: int, fqt_scq: bool, edges: set) -> None:
        self.arith, self.rmm_keep, self.luq_clip = arith, rmm_keep, luq_clip
        self.fqt_bits, self.fqt_scq, self.edges = fqt_bits, fqt_scq, edges

    def linear(self, m: nn.Linear, index: int, seed: int) -> nn.Module:
        if self.arith == "fqt1":
            return fqt_linear_like(m, self.fqt_bits, self.fqt_scq, index in self.edges, seed)
        args = (m.in_features, m.out_features, m.bias is not None)
        if self.arith == "luq4":
            return Luq4Linear(*args, device="meta", clip=self.luq_clip, seed=seed)
        if self.arith == "rmm":
            return SketchedLinear(*args, device="meta", keep=self.rmm_keep, seed=seed)
        return nn.Linear(*args, device="meta")

    def conv(self, m: nn.Conv2d, index: int, seed: int, where: str) -> nn.Module:
        args = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode)
        try:
            if self.arith == "luq4":
                return Luq4Conv2d(*args, device="meta", clip=self.luq_clip, seed=seed)
            if self.arith == "fqt1":
                return fqt_conv_like(m, self.fqt_bits, self.fqt_scq, index in self.edges, seed)
        except ValueError as e:
            raise ValueError(f"lowbit.convert: {where or 'the model'}: {e}") from None
        return nn.Conv2d(*args, device="meta")  # fp32 and rmm (which sketches linear layers only)


def convert(model: nn.Module, arith: ArithName, *, rmm_keep: float = 0.25, luq_clip: bool = True,
            fqt_bits: int = 4, fqt_scq: bool = True, keep_edges: bool = True, seed: int = 0) -> nn.Module:
    """Switches the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` (recursively, in
    place) to the arithmetic ``arith``:

    - ``"luq4"``: :class:`Luq4Linear` and :class:`Luq4Conv2d` (``clip=luq_clip``);
    - ``"fqt1"``: :class:`Fqt1Linear` and :class:`Fqt1Conv2d` with ``bits=fqt_bits`` and
      ``scq=fqt_scq``; with ``keep_edges`` the first and the last of the layers (in module
      order) get ``edge=True`` (fp32 forward, as binary networks keep them);
    - ``"rmm"``: :class:`SketchedLinear` (``keep=rmm_keep``); convolutions plain ``nn.Conv2d``;
    - ``"fp32"``: plain ``nn.Linear`` / ``nn.Conv2d`` again.

    The new layers take over the old ones' ``Parameter`` objects (an optimizer built before
    keeps working), buffers, hooks and training flag. Layer ``i`` (in module order) gets its
    generator seeded from ``seed`` and ``i``. Subclasses of ``nn.Linear`` / ``nn.Conv2d``
    other than lowbit's (e.g. the output projection of ``nn.MultiheadAttention``) are left
    as they are. Returns ``model`` (or its replacement, when ``model`` itself is a layer).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowbit.convert: expected an nn.Module; got {type(model).__name__}")
    if not isinstance(arith, str) or arith not in ARITHMETICS:
        raise ValueError(f"lowbit.convert: arith must be one of {', '.join(map(repr, ARITHMETICS))}; got {arith!r}")
    rmm_keep = _check_keep("convert", rmm_keep)
    luq_clip = _check_clip("convert", luq_clip)
    fqt_bits = _check_bits("convert", fqt_bits)
    if not isinstance(fqt_scq, bool) or not isinstance(keep_edges, bool):
        raise TypeError(f"lowbit.convert: fqt_scq and keep_edges must be bool; got {fqt_scq!r}, {keep_edges!r}")
    seed = _check_seed("convert", seed)
    seeds = torch.Generator().manual_seed(seed)

    # The layers to swap, in module order: (parent or None for the model itself, name, path, layer).
    found: List[Tuple[Optional[nn.Module], str, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            where = f"{prefix}.{name}" if prefix else name
            if _swappable(child):
                found.append((parent, name, where, child))
            else:
                visit(child, where)

    if _swappable(model):
        found.append((None, "", "", model))
    else:
        visit(model, "")
    edges = {0, len(found) - 1} if keep_edges and found else set()
    choice = _Choice(arith, rmm_keep, luq_clip, fqt_bits, fqt_scq, edges)
    root = model
    for index, (parent, name, where, layer) in enumerate(found):
        layer_seed = _draw_seed(seeds)
        if type(layer) in _LINEARS:
            new = _adopt(choice.linear(layer, index, layer_seed), layer)  # type: ignore[arg-type]
        else:
            new = _adopt(choice.conv(layer, index, layer_seed, where), layer)  # type: ignore[arg-type]
        if parent is None:
            root = new
        else:
            setattr(parent, name, new)
    return root


def _arith_layers(model: nn.Module) -> List[_ArithLayer]:
    return [m for m in model.modules() if isinstance(m, _ArithLayer)]


def kept_bytes(model: nn.Module) -> int:
    """Bytes the lowbit arithmetic layers of ``model`` kept for backward in their last
    recorded forward (the sum of their ``kept_bytes``)."""
    return sum(m.kept_bytes for m in _arith_layers(model))


def fp32_bytes(model: nn.Module) -> int:
    """What the same layers would have kept in fp32 (the sum of their ``fp32_bytes``)."""
    return sum(m.fp32_bytes for m in _arith_layers(model))
