"""K-FAC and AdaBK (SGDM_BK, AdamW_BK) as torch.optim optimizers constructed with the model.

The algorithm is the C++ library's (``include/lowbit/kfac.h``, ``docs/kfac.md``), reached
through ``torch.classes.lowbit.KroneckerLayerEngine``. This module finds the model's
``nn.Linear`` and ``nn.Conv2d`` layers and hooks them: on steps that capture statistics
(every ``stat_interval``), a forward hook hands the layer's input to the engine, which reduces
it to ``E[a a^T]`` at once, and a hook on the layer's output does the same with the output
gradient in the backward pass. Nothing per batch is kept.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim import Optimizer

from ._library import load as _load_library

_load_library()

from .optim import StateBytes  # noqa: E402

__all__ = ["KFAC", "SGDMBK", "AdamWBK"]


def _pair(v: Any) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _KroneckerLayerOptimizer(Optimizer):
    _ADABK = False

    def __init__(self, model: nn.Module, options: Dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: the first argument must be the model (an nn.Module); "
                            f"got {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": options["lr"]})
        self._layers: List[nn.Module] = []
        weights, biases, geometry = [], [], []
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                    raise ValueError(f"{type(self).__name__}: Conv2d layers need groups=1, zero padding given as "
                                     f"numbers; got {module}")
                geometry.append([*_pair(module.stride), *_pair(module.padding), *_pair(module.dilation)])
            elif isinstance(module, nn.Linear):
                geometry.append([1, 1, 0, 0, 1, 1])
            else:
                continue
            if not module.weight.requires_grad:
                geometry.pop()
                continue
            self._layers.append(module)
            weights.append(module.weight)
            biases.append(module.bias)
        self._engine = torch.classes.lowbit.KroneckerLayerEngine(self._ADABK, weights, biases, geometry, params,
                                                                 dict(options))
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._layers)]

    def _hook(self, index: int):
        engine = self._engine

        def forward_hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # Evaluation passes (no graph) are not statistics.
            if not engine.capturing() or not torch.is_grad_enabled() or not output.requires_grad:
                return
            engine.record_input(index, inputs[0])
            output.register_hook(lambda grad: engine.record_output_grad(index, grad))

        return forward_hook

    def remove_hooks(self) -> None:
        """Stops observing the model (the optimizer can no longer capture statistics)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._engine.step(float(self.param_groups[0]["lr"]))
        return loss

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """Every state entry as a plain tensor, plus the learning rate."""
        return {"state": dict(self._engine.state_dict()), "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        """Checked in full before anything changes: a bad state dict leaves the optimizer as it was."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "lr"}:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with 'state' and 'lr'")
        self._engine.load_state_dict({str(k): v for k, v in state_dict["state"].items()})
        self.param_groups[0]["lr"] = state_dict["lr"]

    def state_bytes(self) -> StateBytes:
        preconditioner, first_order = self._engine.state_bytes()
        return StateBytes(preconditioner, first_order)

    @property
    def steps(self) -> int:
        return self._engine.steps()


class KFAC(_KroneckerLayerOptimizer):
    """K-FAC: each layer's gradient D = [dW, db] becomes (G + damping I)^-1 D (A + damping I)^-1,
    then SGD with momentum (coupled weight decay) and optional KL clipping. ``factor``:
    "dense" (fp32), "eigen4" (4-bit eigenvector-quantized), "naive4". ``damping_mode="pi"``:
    factored damping (Martens & Grosse 2015, sec. 6.3), A + pi damping I and G + (damping / pi) I
    with pi = sqrt((tr A / dim A) / (tr G / dim G))."""

    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 stat_decay: float = 0.9, stat_interval: int = 200, root_interval: int = 2000,
                 damping: float = 0.03, damping_mode: str = "tikhonov", kl_clip: float = 0.0, factor: str = "dense",
                 bjorck_steps: int = 0, eigen_update: str = "qr", skip_nonfinite: bool = False) -> None:
        super().__init__(model, dict(lr=lr, rule="sgdm", momentum=momentum, weight_decay=weight_decay,
                                     stat_decay=stat_decay, stat_interval=stat_interval, root_interval=root_interval,
                                     damping=damping, damping_mode=damping_mode, kl_clip=kl_clip, factor=factor, bjorck_steps=bjorck_steps,
                                     eigen_update=eigen_update, skip_nonfinite=skip_nonfinite))


class _AdaBK(_KroneckerLayerOptimizer):
    _ADABK = True


class SGDMBK(_AdaBK):
    """SGDM_BK (AdaBK, Yong et al. 2023): D' = (G + e_G g_max I)^-1/2 D (A + e_A a_max I)^-1/2 rescaled
    to ||D||, then SGD with momentum and coupled weight decay."""

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 stat_decay: float = 0.9, stat_interval: int = 200, root_interval: int = 2000,
                 damping_input: float = 1e-3, damping_output: float = 1e-3, factor: str = "dense",
                 bjorck_steps: int = 0, eigen_update: str = "qr", skip_nonfinite: bool = False) -> None:
        super().__init__(model, dict(lr=lr, rule="sgdm", momentum=momentum, weight_decay=weight_decay,
                                     stat_decay=stat_decay, stat_interval=stat_interval, root_interval=root_interval,
                                     damping_input=damping_input, damping_output=damping_output, factor=factor,
                                     bjorck_steps=bjorck_steps, eigen_update=eigen_update,
                                     skip_nonfinite=skip_nonfinite))


class AdamWBK(_AdaBK):
    """AdamW_BK (AdaBK, Yong et al. 2023): the AdaBK direction of SGDMBK, then AdamW with
    decoupled weight decay."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, stat_decay: float = 0.9, stat_interval: int = 200,
                 root_interval: int = 2000, damping_input: float = 1e-3, damping_output: float = 1e-3,
                 factor: str = "dense", bjorck_steps: int = 0, eigen_update: str = "qr",
                 skip_nonfinite: bool = False) -> None:
        super().__init__(model, dict(lr=lr, rule="adamw", betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                     stat_decay=stat_decay, stat_interval=stat_interval, root_interval=root_interval,
                                     damping_input=damping_input, damping_output=damping_output, factor=factor,
                                     bjorck_steps=bjorck_steps, eigen_update=eigen_update,
                                     skip_nonfinite=skip_nonfinite))
