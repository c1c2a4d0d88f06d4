"""The optimizers issue 18 compares lowbit with, built from a user's own checkout (never
vendored): the authors' 4-bit Shampoo (Sike-Wang/low-bit-Shampoo) and Meta's Distributed
Shampoo (facebookresearch/optimizers). Each factory takes a parameter list and returns a
torch.optim.Optimizer configured like lowbit in bench/gpu_compare.py: AdamW grafting,
lr 1e-3, betas (0.9, 0.999), no weight decay, the same intervals and largest block order.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable, Dict

Factory = Callable[[list], object]

AUTHORS_HINT = ("a checkout of Sike-Wang/low-bit-Shampoo whose qtensor library is built for this CUDA "
                "(cudaC_python/README.md; under CUDA 13 replace cub::Max() in csrc/kernels.cu by a max functor) "
                "and copied into qtensor/")
META_HINT = ("a checkout of facebookresearch/optimizers (its distributed_shampoo package; Python >= 3.12), "
             "or 'installed' for a pip-installed one")


def _import_from(directory: str | None, module: str, option: str, hint: str):
    if directory is not None:
        path = Path(directory).expanduser().resolve()
        if not path.is_dir():
            raise SystemExit(f"{option} {directory}: no such directory; expected {hint}")
        sys.path.insert(0, str(path))
    try:
        return importlib.import_module(module)
    except Exception as e:  # the peers raise anything from ImportError to OSError (ctypes)
        where = directory if directory is not None else "the installed packages"
        raise SystemExit(f"{option} {where}: cannot import {module} ({type(e).__name__}: {e}); expected {hint}")


def authors_factories(directory: str, stat_interval: int, root_interval: int, max_dim: int) -> Dict[str, Factory]:
    """The authors' 4-bit Shampoo (optimizers/shampoo2.py: quantized eigenvectors, Björck
    t1 = 1, t2 = 4) and the same class at 32 bits, with their main_demo.py settings."""
    module = _import_from(directory, "optimizers.shampoo2", "--authors", AUTHORS_HINT)

    def make(bits: int) -> Factory:
        return lambda params: module.ShampooAdamW(
            params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, start_prec_step=1,
            stat_compute_steps=stat_interval, prec_compute_steps=root_interval, stat_decay=0.95,
            matrix_eps=1e-6, prec_maxorder=max_dim, prec_bits=bits, min_lowbit_size=4096,
            quan_blocksize=64, rect_t1=1, rect_t2=4, inv_root_mode=0)

    return {"authors 4-bit": make(4), "authors fp32": make(32)}


def meta_ds_factories(where: str, root_interval: int, max_dim: int) -> Dict[str, Factory]:
    """Meta's Distributed Shampoo at fp32 with Adam grafting. It updates its statistics at
    every step and its roots every `precondition_frequency` = T2 steps (it has no T1)."""
    module = _import_from(None if where == "installed" else where, "distributed_shampoo", "--meta-ds", META_HINT)
    # The grafting config was renamed (AdamGraftingConfig -> AdamPreconditionerConfig, 2025).
    graft = getattr(module, "AdamPreconditionerConfig", None) or getattr(module, "AdamGraftingConfig", None)
    if graft is None:
        raise SystemExit(f"--meta-ds {where}: distributed_shampoo has neither AdamPreconditionerConfig nor "
                         "AdamGraftingConfig")
    return {"Meta DS fp32": lambda params: module.DistributedShampoo(
        params, lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.0, max_preconditioner_dim=max_dim,
        precondition_frequency=root_interval, grafting_config=graft(beta2=0.999, epsilon=1e-8))}
