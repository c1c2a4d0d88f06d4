"""Timing of optimizer or training steps over whole inverse-root cycles, shared by
bench/gpu_compare.py's shape sets and end-to-end models."""

from __future__ import annotations

import time
from typing import Callable, Dict

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cycles(step: Callable[[int], None], device: torch.device, root_interval: int, stat_interval: int,
                cycles: int) -> Dict:
    """Runs one warm-up cycle of T2 = `root_interval` steps (every factor created and refreshed
    once), then `cycles` timed cycles. Returns the mean ms per step, the mean of the steps that
    refresh nothing (the plain step), and on CUDA the memory allocated when timing starts and
    the peak during the timed cycles (MiB). On CUDA each clock read follows a synchronize."""
    for k in range(root_interval):
        step(k)
    synchronize(device)
    result: Dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result["base_mib"] = torch.cuda.memory_allocated(device) / 2**20
    total, plain = 0.0, []
    for k in range(root_interval, root_interval * (1 + cycles)):
        start = time.perf_counter()
        step(k)
        synchronize(device)
        elapsed = time.perf_counter() - start
        total += elapsed
        if (k + 1) % stat_interval != 0 and (k + 1) % root_interval != 0:
            plain.append(elapsed)
    result["ms_per_step"] = 1e3 * total / (root_interval * cycles)
    result["plain_step_ms"] = 1e3 * sum(plain) / max(1, len(plain))
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result
