"""What the layers of :mod:`lowbit.arith` share: argument checks, seeds drawn from a layer's
generator, the layer mixin with its byte counters, and the convolution options they support."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

_SEED_BOUND = 1 << 62


# ----------------------------------------------------------------------------------------
# Argument checks


def _check_int(where: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lowbit.{where}: {name} must be int; got {value!r}")


def _check_seed(where: str, seed: object) -> int:
    _check_int(where, "seed", seed)
    if seed < 0:  # type: ignore[operator]
        raise ValueError(f"lowbit.{where}: seed must be >= 0; got {seed}")
    return int(seed)  # type: ignore[arg-type]


def _check_keep(where: str, keep: object) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"lowbit.{where}: keep must be a float in (0, 1]; got {keep!r}")
    if not (0 < keep <= 1):
        raise ValueError(f"lowbit.{where}: keep must be in (0, 1]; got {keep}")
    return float(keep)


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator).item())



class _ArithLayer:
    """What the arithmetic layers share: a seeded CPU generator and the byte counters."""

    seed: int
    generator: torch.Generator
    kept_bytes: int
    fp32_bytes: int

    def _init_arith(self, seed: int) -> None:
        self.seed = _check_seed(type(self).__name__, seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.kept_bytes = 0  # bytes kept for backward in the last forward that recorded it
        self.fp32_bytes = 0  # what an fp32 layer would have kept (the input, numel * 4)

    def reset_generator(self, seed: Optional[int] = None) -> None:
        """Reseeds the layer's generator (with its ``seed``, or a new one)."""
        if seed is not None:
            self.seed = _check_seed(type(self).__name__, seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @staticmethod
    def _records(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
        """True where the forward is recorded for backward (grad mode on and some input
        requiring a gradient); otherwise the layer keeps nothing."""
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in params))


def _check_conv_options(name: str, dilation: Any, groups: int, padding_mode: str, padding: Any,
                        kernel_size: Sequence[int]) -> Tuple[int, int]:
    """The layer options LUQ-4 convolutions support; returns the numeric padding."""
    if groups != 1:
        raise ValueError(f"lowbit.{name}: groups={groups} is not supported (only groups=1)")
    if tuple(dilation) != (1, 1):
        raise ValueError(f"lowbit.{name}: dilation={tuple(dilation)} is not supported (only dilation=1)")
    if padding_mode != "zeros":
        raise ValueError(f"lowbit.{name}: padding_mode={padding_mode!r} is not supported (only 'zeros')")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if any(k % 2 == 0 for k in kernel_size):  # 'same' with an even kernel pads asymmetrically
            raise ValueError(f"lowbit.{name}: padding='same' with the even kernel_size {tuple(kernel_size)} is not "
                             "supported")
        return (kernel_size[0] // 2, kernel_size[1] // 2)
    return (int(padding[0]), int(padding[1]))


