#!/usr/bin/env python3
"""Train a small CNN on Fashion-MNIST with lowbit.Shampoo (4-bit Shampoo grafted onto AdamW).

    python3 examples/train_fashion_mnist.py --epochs 1 --limit 2000

Reads the gzipped IDX files from --data (default /usr/share/datasets/fashion-mnist, the
Debian package dataset-fashion-mnist); without them it trains on random synthetic data
and says so. Needs `lowbit` importable: installed with pip, or from a source checkout
with PYTHONPATH=python (the library is then found in build/).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    import lowbit
except ImportError as e:  # a source checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    try:
        import lowbit
    except ImportError:
        raise SystemExit(f"cannot import lowbit: {e}") from None

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic with the dimension count, then the sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: str, limit: int):
    root = Path(data_dir)
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((root / n).is_file() for n in names):
        arrays = [read_idx(root / n) for n in names]
        images = [torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1) for a in arrays[0::2]]
        labels = [torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2]]
        (xtr, xte), (ytr, yte) = images, labels
        mean, std = 0.2860, 0.3530
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        source = f"Fashion-MNIST from {root}"
    else:
        print(f"note: no Fashion-MNIST files in {root}; training on random synthetic data instead", flush=True)
        g = torch.Generator().manual_seed(0)
        prototypes = torch.randn(10, 1, 28, 28, generator=g)
        def synth(n):
            y = torch.randint(0, 10, (n,), generator=g)
            return prototypes[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y
        (xtr, ytr), (xte, yte) = synth(6000), synth(1000)
        source = "synthetic data (10 noisy prototypes)"
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
        xte, yte = xte[: max(limit // 5, 500)], yte[: max(limit // 5, 500)]
    return xtr, ytr, xte, yte, source


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = torch.nn.Linear(32 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@torch.no_grad()
def evaluate(model, x, y, batch=1000):
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, default=4, choices=[32, 8, 4, 3])
    parser.add_argument("--graft", default="adamw", choices=["adamw", "sgdm"])
    parser.add_argument("--stat-interval", type=int, default=10, help="T1 (paper: 100)")
    parser.add_argument("--root-interval", type=int, default=50, help="T2 (paper: 500)")
    parser.add_argument("--data", default=os.environ.get("FASHION_MNIST", DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte, source = load(args.data, args.limit)
    model = SmallCNN()
    # 4-bit Shampoo: short intervals for a short run (T1 = 100 / T2 = 500 would never
    # precondition within a few hundred steps).
    opt = lowbit.Shampoo(model.parameters(), lr=args.lr, graft=args.graft, bits=args.bits,
                         weight_decay=0.0, stat_interval=args.stat_interval, root_interval=args.root_interval)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=args.epochs * ((len(xtr) + args.batch_size - 1) // args.batch_size))
    print(f"lowbit {lowbit.__version__} ({lowbit.library_path}), torch {torch.__version__}, {source}: "
          f"{len(xtr)} train / {len(xte)} test images", flush=True)
    print(f"optimizer: {args.bits}-bit Shampoo + {args.graft}, lr {args.lr}, "
          f"T1 {args.stat_interval}, T2 {args.root_interval}", flush=True)

    step = 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), args.batch_size):
            idx = order[i:i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step:5d}  loss {loss.item():.4f}  "
                      f"root updates {opt.root_updates()}", flush=True)
        test_loss, test_acc = evaluate(model, xte, yte)
        print(f"epoch {epoch}: test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    b = opt.state_bytes()
    params = sum(p.numel() for p in model.parameters())
    print(f"state: preconditioner {b.preconditioner / 2**20:.2f} MiB, first-order {b.first_order / 2**20:.2f} MiB "
          f"({params} parameters, {opt.root_updates()} root updates, {opt.root_failures()} root failures)")


if __name__ == "__main__":
    main()
