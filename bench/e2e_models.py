"""Models for issue 18's end-to-end step times: ViT-S/16 (timm) at batch 128 on 224 x 224
inputs and ResNet-18 (torchvision) at batch 256 on 32 x 32 inputs, trained on synthetic
data; a tiny CNN with no dependency for the CPU test. A model whose package is missing is
reported as skipped, not as an error (the GPU machine decides what is installed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from step_timing import time_cycles


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    batch: int
    input_shape: Tuple[int, ...]  # one example
    classes: int
    package: Optional[str] = None  # what `build` imports


def _vit_s16() -> nn.Module:
    import timm
    return timm.create_model("vit_small_patch16_224", num_classes=1000)


def _resnet18() -> nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))


MODELS: Dict[str, ModelSpec] = {
    "vit_s16": ModelSpec(_vit_s16, 128, (3, 224, 224), 1000, "timm"),
    "resnet18": ModelSpec(_resnet18, 256, (3, 32, 32), 10, "torchvision"),
    "tiny_cnn": ModelSpec(_tiny_cnn, 16, (3, 8, 8), 10),
}


def missing_package(name: str) -> Optional[str]:
    package = MODELS[name].package
    return package if package is not None and importlib.util.find_spec(package) is None else None


def time_training(name: str, make_optimizer: Callable, device: torch.device, root_interval: int,
                  stat_interval: int, cycles: int, seed: int) -> Dict:
    """Training steps (forward, backward and optimizer step; bf16 autocast on CUDA) timed by
    step_timing.time_cycles; on CUDA its peak counts everything allocated (model, optimizer
    state, activations)."""
    spec = MODELS[name]
    torch.manual_seed(seed)  # the same initial weights for every optimizer
    model = spec.build().to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    batches: List[Tuple[torch.Tensor, torch.Tensor]] = [
        (torch.randn(spec.batch, *spec.input_shape, generator=g).to(device),
         torch.randint(0, spec.classes, (spec.batch,), generator=g).to(device)) for _ in range(2)]
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    loss_fn = nn.CrossEntropyLoss()

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return time_cycles(step, device, root_interval, stat_interval, cycles)
