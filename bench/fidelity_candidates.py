"""Issue 20, "Candidates to measure": a pure-torch prototype of 4-bit Shampoo's eigenvector path,
to try codec changes (rotation, error feedback, stochastic rounding, blocks) before porting any.

It re-implements, for 2-D parameters, what lowbit.Shampoo does with ``graft="adamw"``
(src/precond/eigen_quantized_factor.cpp, src/linalg/matrix_functions.cpp): per factor the
eigenvectors U (stored as rows) and fp32 eigenvalues; every T1 steps
A = beta V diag(lambda) V^T + (1 - beta) G G^T with V the stored U after t1 = 1 Bjorck step,
then the paper's warm-started subspace step P = QR(A V).Q, lambda = diag(P^T A P), and P^T is
stored; every T2 steps (from step T2) the inverse root P diag((lambda + eps lambda_max)^-1/4) P^T
is made from the fresh fp32 P and stored at 4 bits with its diagonal in fp32 (keep_diagonal);
or, in eigen form (root_storage="eigen"), V diag(d) V^T is made from the stored U at every step.
The direction L^-1/4 G R^-1/4 is grafted to the norm of G and fed to AdamW. 32-bit is the
dense fp32 factor (L_0 = eps I, eigh roots every T2). The codec is lowbit's own
(torch.ops.lowbit.quantize_blockwise / dequantize_blockwise, linear-2, blocks of 64 along a
row, which for the orders 32 and 64 here is one scale per row), so rounding is lowbit's.

Candidates (composable; see VARIANTS):
  rot   randomized Hadamard rotation of every quantization block (fixed random +-1 signs per
        column, then the normalized Sylvester Hadamard of the block length) before absmax
        scaling, undone after decoding; applied to U's rows and to the root's off-diagonal.
        Costs no bits (a seed).
  ef    error feedback for U (in the spirit of arXiv 2412.10663): X = P^T + E, U = Q(X),
        E <- X - D(Q(X)), with P's rows sign-aligned to the previous basis (the QR step may flip
        them). E is kept in fp32 ("ef32", an upper bound, +32 bits per element) or at 4- or
        3-bit linear-2, blocks of 64 ("ef4", +4.5 bits per element; "ef3", +3.5).
  sr    stochastic rounding of U only (lowbit's codec, a new seed per refresh); the root rounds
        to nearest.
  bN    blocks of N elements instead of 64.
Also widths lowbit's codec lacks (5- and 6-bit U, emulated with lowbit's linear-2
construction, bit-identical to the codec at 3, 4 and 8 bits), and diagnostics that move one
rounding at a time to fp32 (which rounding costs the steps).

Validation of the prototype against lowbit.Shampoo (same problems, seeds, learning rates):

  LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/fidelity_candidates.py \
      --problems lsq-1e4,lsq-1e6 --variants 32-bit,4-bit,4-bit-eigen-form

Every variant on the problems of the docs/BENCHMARKS.md table (about 20 min on one loaded
core; a variant takes 5-10 s on a least-squares problem, 15-30 s on the autoencoder; tall-1057
works too, minutes per variant):

  LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/fidelity_candidates.py \
      --problems lsq-1e4,lsq-1e6,autoenc --json candidates.json
  LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/fidelity_candidates.py --nre

``--nre`` prints each codec's normalized reconstruction error ||X - D(Q(X))||_F / ||X||_F on a
random orthogonal matrix and on eigenvector matrices (and roots) captured from a 4-bit run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fidelity  # noqa: E402  (problems, seeds, learning rates, targets)
import lowbit  # noqa: E402,F401  (loads the library: torch.ops.lowbit)

BETA = 0.95  # stat_decay
EPSILON = 1e-6
T1_BJORCK = 1  # rectify_steps[0]

_CODEBOOKS: Dict[int, torch.Tensor] = {}
_HADAMARD: Dict[int, torch.Tensor] = {}
_SIGNS: Dict[int, torch.Tensor] = {}


def codebook(bits: int) -> torch.Tensor:
    if bits not in _CODEBOOKS:
        if bits in (3, 4, 8):
            _CODEBOOKS[bits] = torch.ops.lowbit.codebook("linear2", bits)
        else:  # lowbit's linear-2 construction (src/quant/codebook.cpp) for widths it does not ship
            n = 1 << bits
            grid = -1.0 + 2.0 * torch.arange(n, dtype=torch.float64) / (n - 1)
            grid[n // 2 - 1] = 0.0
            _CODEBOOKS[bits] = (grid.sign() * grid * grid).sort().values.float()
    return _CODEBOOKS[bits]


def _emulated_qdq(x: torch.Tensor, bits: int, b: int) -> torch.Tensor:
    """Nearest-code linear-2 with fp32 absmax scales per block, as lowbit's codec (any width)."""
    rows, n = x.shape
    padded = -(-n // b) * b
    xp = torch.nn.functional.pad(x, (0, padded - n)).view(rows, padded // b, b)
    scale = xp.abs().amax(-1, keepdim=True)
    table = codebook(bits)
    midpoints = (table[1:] + table[:-1]) * 0.5
    index = (xp.unsqueeze(-1) > midpoints * scale.unsqueeze(-1)).sum(-1)
    return (table[index] * scale).view(rows, padded)[:, :n]


def hadamard(b: int) -> torch.Tensor:
    if b not in _HADAMARD:
        assert b & (b - 1) == 0, "rotation blocks must be powers of two"
        h = torch.ones(1, 1)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[b] = h / math.sqrt(b)
    return _HADAMARD[b]


def signs(n: int) -> torch.Tensor:
    if n not in _SIGNS:
        g = torch.Generator().manual_seed(20)
        _SIGNS[n] = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return _SIGNS[n]


def _rotate(x: torch.Tensor, b: int) -> torch.Tensor:
    rows, n = x.shape
    padded = -(-n // b) * b
    if padded != n:
        x = torch.nn.functional.pad(x, (0, padded - n))
    return ((x * signs(padded)).view(rows, padded // b, b) @ hadamard(b)).reshape(rows, padded)


def _unrotate(y: torch.Tensor, b: int, n: int) -> torch.Tensor:
    rows, padded = y.shape
    return ((y.view(rows, padded // b, b) @ hadamard(b)).reshape(rows, padded) * signs(padded))[:, :n]


def qdq(x: torch.Tensor, bits: int, block: int = 64, keep_diagonal: bool = False, rotate: bool = False,
        stochastic: bool = False, seed: int = 0) -> torch.Tensor:
    """D(Q(x)) with lowbit's block-wise linear-2 codec (blocks along rows); bits 32: x."""
    if bits >= 32:
        return x.clone()
    n = x.shape[1]
    diagonal = None
    if keep_diagonal:  # as lowbit: the diagonal in fp32, excluded from the scales, coded as 0
        diagonal = x.diagonal().clone()
        x = x.clone()
        x.diagonal().zero_()
    b = min(block, n)
    if rotate:
        x = _rotate(x, b)
    x = x.contiguous()
    if bits in (3, 4, 8):
        codes, scales, _ = torch.ops.lowbit.quantize_blockwise(x, codebook(bits), bits, b, False, stochastic, seed, None)
        y = torch.ops.lowbit.dequantize_blockwise(codes, scales, codebook(bits), None, bits, b, x.shape[1])
    else:
        assert not stochastic, "stochastic rounding needs a width lowbit ships (3, 4, 8)"
        y = _emulated_qdq(x, bits, b)
    if rotate:
        y = _unrotate(y, b, n)
    if diagonal is not None:
        y.diagonal().copy_(diagonal)
    return y


def bjorck(x: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        x = 1.5 * x - 0.5 * (x @ (x.t() @ x))
    return x


def root_spectrum(values: torch.Tensor) -> torch.Tensor:
    values = values.clamp_min(0)
    lmax = values.max()
    ridge = lmax * EPSILON if lmax > 0 else torch.tensor(EPSILON)
    return (values + ridge).double().pow(-0.25).float()


class DenseFactor:
    """32-bit Shampoo's factor (src/precond/dense_factor.cpp)."""

    def __init__(self, n: int, spec: dict) -> None:
        self.statistic = EPSILON * torch.eye(n)
        self.root = torch.eye(n)

    def update_statistics(self, side: torch.Tensor, step: int) -> None:
        candidate = BETA * self.statistic + (1 - BETA) * (side @ side.t())
        if torch.isfinite(candidate).all():
            self.statistic = candidate

    def update_root(self, step: int) -> None:
        a = self.statistic
        values, vectors = torch.linalg.eigh((a + a.t()) * 0.5)
        root = (vectors * root_spectrum(values)) @ vectors.t()
        if torch.isfinite(root).all():
            self.root = root

    def inverse_root(self) -> torch.Tensor:
        return self.root


class QuantizedFactor:
    """4-bit Shampoo's eigenvector factor (src/precond/eigen_quantized_factor.cpp) plus candidates."""

    def __init__(self, n: int, spec: dict) -> None:
        self.n = n
        self.u_bits = spec.get("u_bits", 4)
        self.root_bits = spec.get("root_bits", 4)
        self.block = spec.get("block", 64)
        self.rotate = spec.get("rotate", False)
        self.stochastic = spec.get("sr", False)
        self.ef_bits = spec.get("ef_bits", 0)  # 0: no error feedback
        self.eigen_form = spec.get("eigen_form", False)
        self.exact_statistics = spec.get("exact_statistics", False)  # diagnostic: A from the fp32 basis
        self.exact_vectors: Optional[torch.Tensor] = None
        self.seed = spec.get("seed_base", 0)
        self.refreshes = 0
        self.u_rows = self.store_u(torch.eye(n))  # U = I, lambda = eps, root = I (the paper's start)
        self.values = torch.full((n,), EPSILON)
        self.error = torch.zeros(n, n)
        self.root = torch.eye(n)
        self.cached_eigen_root: Optional[torch.Tensor] = None

    def store_u(self, rows: torch.Tensor) -> torch.Tensor:
        self.refreshes += 1
        return qdq(rows, self.u_bits, self.block, rotate=self.rotate, stochastic=self.stochastic,
                   seed=self.seed * 100003 + self.refreshes)

    def vectors(self) -> torch.Tensor:
        return bjorck(self.u_rows.t(), T1_BJORCK)

    def update_statistics(self, side: torch.Tensor, step: int) -> None:
        v = self.exact_vectors if self.exact_statistics and self.exact_vectors is not None else self.vectors()
        a = BETA * ((v * self.values) @ v.t()) + (1 - BETA) * (side @ side.t())
        p = torch.linalg.qr(a @ v)[0]
        values = (p * (a @ p)).sum(0)
        if not (torch.isfinite(p).all() and torch.isfinite(values).all()):
            return
        rows = p.t().contiguous()
        if self.ef_bits:
            # The QR step may flip an eigenvector's sign: align the rows with the basis they
            # came from, so that the kept residual is added to the vector it belongs to.
            s = torch.sign((p * v).sum(0))
            s[s == 0] = 1
            rows = rows * s.unsqueeze(1) + self.error
            self.u_rows = self.store_u(rows)
            residual = rows - self.u_rows
            self.error = qdq(residual, self.ef_bits, self.block) if self.ef_bits < 32 else residual
        else:
            self.u_rows = self.store_u(rows)
        self.values = values
        self.exact_vectors = p
        self.fresh = (p, values)
        self.cached_eigen_root = None

    def update_root(self, step: int) -> None:
        if self.eigen_form:
            return
        # T1 divides T2 in every problem here: the root comes from the fresh fp32 basis.
        p, values = self.fresh
        root = (p * root_spectrum(values)) @ p.t()
        if torch.isfinite(root).all():
            self.root = qdq(root, self.root_bits, self.block, keep_diagonal=True, rotate=self.rotate)

    def inverse_root(self) -> torch.Tensor:
        if not self.eigen_form:
            return self.root
        if self.cached_eigen_root is None:
            v = self.vectors()
            self.cached_eigen_root = (v * root_spectrum(self.values)) @ v.t()
        return self.cached_eigen_root


class Prototype:
    """Shampoo (AdamW graft, grafting by norm) over 2-D parameters."""

    def __init__(self, params: List[torch.Tensor], lr: float, spec: dict, t1: int, t2: int) -> None:
        self.params = params
        self.t1, self.t2 = t1, t2
        kind = DenseFactor if spec.get("bits", 4) == 32 else QuantizedFactor
        self.factors = []
        for i, p in enumerate(params):
            rows, cols = p.shape
            self.factors.append((kind(rows, dict(spec, seed_base=2 * i)), kind(cols, dict(spec, seed_base=2 * i + 1))))
        self.adamw = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
        self.k = 0
        self.root_updates = 0

    @torch.no_grad()
    def step(self) -> None:
        self.k += 1
        stats = self.k % self.t1 == 0
        roots = self.k % self.t2 == 0
        if roots:
            self.root_updates += 1
        for p, (left, right) in zip(self.params, self.factors):
            g = p.grad
            if stats:
                left.update_statistics(g, self.k)
                right.update_statistics(g.t(), self.k)
            if roots:
                left.update_root(self.k)
                right.update_root(self.k)
            if self.root_updates > 0:
                h = left.inverse_root() @ g @ right.inverse_root()
                scale = (g.double().norm() / (h.double().norm() + 1e-12)).float()
                p.grad = h * scale
        self.adamw.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# name: spec. u_bits / root_bits: bits of U and of the stored root; eigen_form: no root stored.
VARIANTS: Dict[str, dict] = {
    "32-bit": dict(bits=32),
    "4-bit": dict(),
    "4-bit-eigen-form": dict(eigen_form=True),
    "8-bit-U-eigen-form": dict(u_bits=8, eigen_form=True),
    # widths lowbit does not ship (5, 6: emulated linear-2): how many bits the eigen form needs
    "5-bit-U-eigen-form": dict(u_bits=5, eigen_form=True),
    "6-bit-U-eigen-form": dict(u_bits=6, eigen_form=True),
    # rotation
    "4-bit-rot": dict(rotate=True),
    "4-bit-eigen-form-rot": dict(eigen_form=True, rotate=True),
    # stochastic rounding of U
    "4-bit-sr": dict(sr=True),
    "4-bit-eigen-form-sr": dict(eigen_form=True, sr=True),
    "4-bit-rot-sr": dict(rotate=True, sr=True),
    # error feedback for U
    "4-bit-ef32": dict(ef_bits=32),
    "4-bit-ef4": dict(ef_bits=4),
    "4-bit-eigen-form-ef32": dict(eigen_form=True, ef_bits=32),
    "4-bit-eigen-form-ef4": dict(eigen_form=True, ef_bits=4),
    "4-bit-eigen-form-ef3": dict(eigen_form=True, ef_bits=3),  # E at 3-bit linear-2: 8 bits in all
    "4-bit-rot-ef4": dict(rotate=True, ef_bits=4),
    "4-bit-eigen-form-rot-ef4": dict(eigen_form=True, rotate=True, ef_bits=4),
    # diagnostics: where the rounding costs steps (not candidates)
    "4-bit-U-fp32-root": dict(root_bits=32),  # U's rounding only enters A = beta V diag V^T + ...
    "fp32-U-4-bit-root": dict(u_bits=32),  # the stored root's rounding alone
    "fp32-U-fp32-root": dict(u_bits=32, root_bits=32),  # the QR-step tracking alone, no rounding
    "fp32-U-eigen-form": dict(u_bits=32, eigen_form=True),  # the same with the root at every step
    "4-bit-eigen-form-exact-stats": dict(eigen_form=True, exact_statistics=True),  # U's rounding in the root only
    # smaller blocks (fp32 scales: 4 + 32/32 = 5 bits per element)
    "4-bit-b32": dict(block=32),
    "4-bit-b32-rot": dict(block=32, rotate=True),
}

# Stored bits per element of an n x n factor (fp32 scale per block of 64; eigenvalues and the
# root's fp32 diagonal, O(n), left out): U + root + error-feedback state.
def bits_per_element(spec: dict) -> float:
    if spec.get("bits", 4) == 32:
        return 64.0  # statistic + root
    block = spec.get("block", 64)
    scale = 32.0 / min(block, 64)
    def stored(bits: int) -> float:
        return bits + (scale if bits < 32 else 0.0)

    total = stored(spec.get("u_bits", 4))
    if not spec.get("eigen_form"):
        total += stored(spec.get("root_bits", 4))
    ef = spec.get("ef_bits", 0)
    if ef:
        total += ef + (0.5 if ef < 32 else 0)
    return total


def steps_to_target(problem, spec: dict, lr: float, target: float, max_steps: int, t1: int, t2: int) -> int:
    params = problem.params()
    return fidelity.run_to_target(problem, params, Prototype(params, lr, spec, t1, t2), target, max_steps)


def best_steps(problem, spec: dict, target: float, max_steps: int, t1: int, t2: int) -> int:
    best = max_steps + 1
    for lr in fidelity.LEARNING_RATES:
        best = min(best, steps_to_target(problem, spec, lr, target, min(max_steps, best - 1), t1, t2))
    return best


def nre(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm()).item()


def nre_report() -> None:
    """NRE of each codec on a random orthogonal matrix and on matrices captured from a 4-bit run."""
    torch.manual_seed(0)
    mats = {f"random orthogonal {n}": torch.linalg.qr(torch.randn(n, n))[0] for n in (64, 32)}
    # Eigenvector rows and fp32 roots of a 4-bit run on lsq-1e4 (seed 42, lr 0.1) at step 40.
    make, t1, t2, _, _ = fidelity.PROBLEMS["lsq-1e4"]
    problem = make(42)
    params = problem.params()
    opt = Prototype(params, 0.1, {}, t1, t2)
    for _ in range(40):
        opt.zero_grad()
        problem.loss(params).backward()
        opt.step()
    left, right = opt.factors[0]
    for name, f in (("left 64", left), ("right 32", right)):
        p, values = f.fresh
        mats[f"lsq-1e4 step 40 U {name}"] = p.t().contiguous()
        mats[f"lsq-1e4 step 40 root {name}"] = ((p * root_spectrum(values)) @ p.t()).contiguous()
    codecs = {
        "linear-2 b64": dict(),
        "rotation b64": dict(rotate=True),
        "stochastic b64": dict(stochastic=True),
        "linear-2 b32": dict(block=32),
        "rotation b32": dict(block=32, rotate=True),
        "8-bit linear-2": dict(bits=8),
    }
    print("| matrix | " + " | ".join(codecs) + " |")
    print("|---|" + "---|" * len(codecs))
    for name, x in mats.items():
        keep = " root " in name
        cells = []
        for options in codecs.values():
            opts = dict(options)
            bits = opts.pop("bits", 4)
            stochastic = opts.pop("stochastic", False)
            if stochastic:  # mean over 8 seeds
                e = statistics.mean(nre(x, qdq(x, bits, keep_diagonal=keep, stochastic=True, seed=s, **opts))
                                    for s in range(8))
            else:
                e = nre(x, qdq(x, bits, keep_diagonal=keep, **opts))
            cells.append(f"{e:.4f}")
        print(f"| {name}{' (diagonal kept)' if keep else ''} | " + " | ".join(cells) + " |")
    # Error feedback does not lower one rounding's NRE; what it changes is the error of the
    # average over refreshes. Shown on a fixed orthogonal matrix quantized 20 times in a row.
    x = mats["random orthogonal 64"]
    for ef_bits in (32, 4):
        error = torch.zeros_like(x)
        outs = []
        for _ in range(20):
            target = x + error
            y = qdq(target, 4)
            error = target - y if ef_bits == 32 else qdq(target - y, 4)
            outs.append(y)
        mean = torch.stack(outs).mean(0)
        print(f"error feedback (E at {ef_bits} bits), orthogonal 64, 20 refreshes: NRE of each "
              f"{statistics.mean(nre(x, y) for y in outs):.4f}, of their mean {nre(x, mean):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="lsq-1e4,lsq-1e6,autoenc")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--seeds", default=",".join(str(s) for s in fidelity.SEEDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nre", action="store_true", help="print the codecs' NRE and exit")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.nre:
        nre_report()
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for name in args.problems.split(","):
        make, t1, t2, target, max_steps = fidelity.PROBLEMS[name]
        medians = {}
        for variant in args.variants.split(","):
            spec = VARIANTS[variant]
            start = time.perf_counter()
            steps = [best_steps(make(seed), spec, target, max_steps, t1, t2) for seed in seeds]
            medians[variant] = statistics.median(steps)
            ratio = medians[variant] / medians["32-bit"] if "32-bit" in medians else float("nan")
            print(f"{name:10s} {variant:28s} bits/elt {bits_per_element(spec):5.2f} steps {steps} "
                  f"median {medians[variant]:6.1f} x 32-bit {ratio:5.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            results.append(dict(problem=name, variant=variant, spec=spec, bits_per_element=bits_per_element(spec),
                                steps=steps, median=medians[variant], ratio_to_32bit=ratio))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(seeds=seeds, learning_rates=fidelity.LEARNING_RATES, results=results), f, indent=1)


if __name__ == "__main__":
    main()
