"""The layers HAWQ quantizes (the weights of Linear and Conv2d modules), their stored size at
a width, and their quantization through lowbit's codec.

Byte accounting (what the codec actually stores, ``QuantizedTensor.nbytes``): a weight is
viewed as a matrix of ``rows = shape[0]`` and ``cols = numel / rows``; each row is packed on
its own, ``ceil(cols * b / 8)`` bytes of codes at ``b`` bits, and carries
``ceil(cols / block)`` fp32 absmax scales::

    bytes(W, b) = rows * ceil(cols * b / 8) + 4 * rows * ceil(cols / block)

"channel" scaling is the codec with one block spanning the whole row (block = the smallest
power of two >= cols, at least 16), so one fp32 scale per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..codec import dequantize, quantize

CODEC_WIDTHS = (3, 4, 8)  # the widths lowbit's codec stores (lowbit::check_bits)
MAX_BLOCK = 4096  # lowbit::kMaxBlockSize
MIN_BLOCK = 16  # lowbit::kMinBlockSize


@dataclass(frozen=True)
class Layer:
    """One quantizable weight: the module's qualified name and its weight parameter."""

    name: str
    weight: torch.nn.Parameter

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.numel() // self.weight.shape[0]


def quantizable_layers(model: torch.nn.Module) -> List[Layer]:
    """The weights of the model's Linear and Conv2d modules, in registration order (so the
    first and the last are the input and output layers of a sequential network)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.hawq: model must be a torch.nn.Module; got {type(model).__name__}")
    layers = [Layer(name or "<model>", m.weight) for name, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(m.weight, torch.nn.Parameter)]
    if not layers:
        raise ValueError(f"lowbit.hawq: the model ({type(model).__name__}) has no quantizable layer: HAWQ "
                         "quantizes the weights of torch.nn.Linear and torch.nn.Conv2d modules")
    return layers


def check_widths(widths: Sequence[int]) -> List[int]:
    """Sorted distinct widths, each one the codec stores; anything else is a ValueError."""
    if isinstance(widths, (int, str)) or not hasattr(widths, "__iter__"):
        raise TypeError(f"lowbit.hawq: widths must be a sequence of bit widths; got {widths!r}")
    values = list(widths)
    if not values:
        raise ValueError("lowbit.hawq: widths is empty; give at least one of 3, 4, 8")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, int) or w not in CODEC_WIDTHS:
            raise ValueError(f"lowbit.hawq: widths: {w!r} is not a width of lowbit's codec (expected each of "
                             f"{', '.join(map(str, CODEC_WIDTHS))})")
    return sorted(set(values))


def block_size_for(layer: Layer, scaling: str, block_size: int) -> int:
    """The codec block of a layer: ``block_size`` for "block", one block per row for "channel"."""
    if scaling == "block":
        return block_size
    if scaling != "channel":
        raise ValueError(f"lowbit.hawq: scaling must be \"block\" or \"channel\"; got {scaling!r}")
    block = MIN_BLOCK
    while block < layer.cols:
        block *= 2
    if block > MAX_BLOCK:
        raise ValueError(f"lowbit.hawq: scaling=\"channel\": layer {layer.name} has rows of {layer.cols} elements, "
                         f"more than the codec's largest block ({MAX_BLOCK}); use scaling=\"block\"")
    return block


def layer_bytes(layer: Layer, bits: int, block: int) -> int:
    """Bytes the codec stores for the layer's weight at ``bits`` with blocks of ``block``
    (the formula of the module docstring)."""
    rows, cols = layer.rows, layer.cols
    return rows * ((cols * bits + 7) // 8) + 4 * rows * ((cols + block - 1) // block)


def quantized_weight(layer: Layer, bits: int, block: int, mapping: str) -> torch.Tensor:
    """Q_b(W): the layer's weight after a round trip through the codec, in its dtype and shape."""
    w = layer.weight.detach()
    return dequantize(quantize(w, bits, mapping, block))


def fixed_bytes(model: torch.nn.Module, layers: Sequence[Layer]) -> int:
    """Bytes of the parameters HAWQ leaves in their dtype: every parameter that is not a
    quantized weight (biases, normalization scales and shifts)."""
    quantized = {id(layer.weight) for layer in layers}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized)
