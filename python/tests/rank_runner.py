"""Starts rank processes for the multi-process tests (spawn method, file:// rendezvous) and
collects what each rank saved."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List

import torch
import torch.multiprocessing as mp


def run_ranks(tmp_path, world: int, target: Callable[..., None], *args: Any, timeout: float = 120) -> List[Dict]:
    """Starts `world` rank processes of worker.`target` and returns what each saved."""
    init_file = str(tmp_path / f"init-{target.__name__}-{world}-{len(os.listdir(tmp_path))}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, init_file, str(tmp_path), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=True) if path.exists() else None)
        if path.exists():
            path.unlink()
    return results
