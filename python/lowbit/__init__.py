"""lowbit: 4-bit Shampoo (Wang et al., NeurIPS 2024) for PyTorch, backed by the lowbit C++
library on LibTorch.

- :class:`lowbit.Shampoo`: a ``torch.optim.Optimizer`` (32-, 8-, 4- or 3-bit Shampoo grafted
  onto SGD with momentum or AdamW); ``help(lowbit.Shampoo)`` lists every option with its
  paper symbol and default.
- :class:`lowbit.Sophia`, :class:`lowbit.AdaHessian`, :class:`lowbit.MFAC` (fp32, 8- or
  4-bit gradient window), :class:`lowbit.NagGS`: the C++ library's second-order optimizers;
  :func:`lowbit.hessian_vector_product` / :func:`lowbit.hutchinson_diagonal` for curvature.
- :class:`lowbit.AdamW`: AdamW with 8- or 4-bit block-wise quantized moments (``bits=``).
- :func:`lowbit.quantize` / :func:`lowbit.dequantize`: the block-wise low-bit codec.
- :func:`lowbit.convert`: low-bit training arithmetic for a model's linear and conv layers
  (``"luq4"``: :class:`lowbit.Luq4Linear` / :class:`lowbit.Luq4Conv2d`; ``"fqt1"``:
  :class:`lowbit.Fqt1Linear` / :class:`lowbit.Fqt1Conv2d`; ``"rmm"``:
  :class:`lowbit.SketchedLinear`); :func:`lowbit.luq_quantize`, :func:`lowbit.kept_bytes`,
  and the 1-bit quantizers in :mod:`lowbit.arith`.
- :mod:`lowbit.hawq`: Hessian-aware mixed-precision weight quantization (HAWQ-V2): per-layer
  Hessian traces, the exact bit allocation under a byte budget, applied with the codec.
- ``torch.ops.lowbit.*``: the codec ops; ``torch.classes.lowbit.*``: the C++ state classes.

Importing lowbit loads liblowbit: the path in ``LOWBIT_LIBRARY``, else the copy installed
inside this package, else ``build/liblowbit.so`` of a source checkout.
"""

from ._library import load as _load

library_path: str = _load()

from .adamw import AdamW  # noqa: E402
from .arith import (  # noqa: E402
    Fqt1Conv2d,
    Fqt1Linear,
    Luq4Conv2d,
    Luq4Linear,
    SketchedLinear,
    convert,
    kept_bytes,
    luq_quantize,
)
from .codec import QuantizedTensor, codebook, dequantize, quantize  # noqa: E402
from .kfac import KFAC, SGDMBK, AdamWBK  # noqa: E402
from .optim import OPTION_DEFAULTS, OPTION_TABLE, Shampoo, ShampooState, StateBytes  # noqa: E402
from .second_order import (  # noqa: E402
    MFAC,
    AdaHessian,
    NagGS,
    Sophia,
    hessian_vector_product,
    hutchinson_diagonal,
)

__version__ = "0.1.0"

__all__ = [
    "Shampoo",
    "ShampooState",
    "StateBytes",
    "Sophia",
    "AdaHessian",
    "MFAC",
    "NagGS",
    "KFAC",
    "SGDMBK",
    "AdamWBK",
    "AdamW",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "OPTION_DEFAULTS",
    "OPTION_TABLE",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "codebook",
    "luq_quantize",
    "Luq4Linear",
    "Luq4Conv2d",
    "Fqt1Linear",
    "Fqt1Conv2d",
    "SketchedLinear",
    "convert",
    "kept_bytes",
    "library_path",
]
