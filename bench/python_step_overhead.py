#!/usr/bin/env python3
"""Python overhead of a lowbit.Shampoo step, measured in one process on the same shapes
(results: docs/BENCHMARKS.md).

    LOWBIT_LIBRARY=build/liblowbit.so PYTHONPATH=python python3 bench/python_step_overhead.py

Three variants, one step each, in a random order every round:
- python: ``lowbit.Shampoo.step()`` (torch.optim's step wrapper and hooks, option and
  gradient checks in Python, one call into C++ per param group);
- direct: the C++ calls that step makes, made directly on the same optimizer state
  (``torch.ops.lowbit.squared_norms`` / ``first_offence`` + ``ShampooConfig.step``): the pure C++ work;
- C++ opt: the C++ optimizer ``lowbit::Shampoo::step`` on its own copy of the same
  parameters and gradients, driven from a small extension compiled here with
  torch.utils.cpp_extension against include/ and liblowbit (about half a minute the first
  time, cached in build/bench_cpp_shampoo; skipped with --no-cpp or if it cannot build).
The overhead is the median of the per-round differences python - direct. python - C++ opt
compares two optimizer instances; a second identical C++ optimizer ("C++ 2 - 1") shows how
much two instances of the same work differ by memory layout alone.

Every timed step is a preconditioned step between statistics/root updates (the most
frequent kind: 99 of 100 steps at the paper's T1 = 100), so the overhead shows at its
largest relative size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
import lowbit  # noqa: E402

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <lowbit/shampoo.h>
#include <chrono>

// lowbit::Shampoo on given parameters with fixed gradients; warmed up so that every
// parameter has its inverse roots, then its intervals are raised so that timed steps are
// plain preconditioned steps.
struct CppShampoo {
  CppShampoo(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, int64_t bits, std::string graft)
      : params_(std::move(params)),
        opt_(params_, lowbit::ShampooOptions(1e-3).bits(bits).graft(graft).stat_interval(1).root_interval(1)) {
    for (size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = grads[i];
    opt_.step();
    opt_.step();
    auto& o = static_cast<lowbit::ShampooOptions&>(opt_.param_groups()[0].options());
    o.stat_interval(int64_t{1} << 40).root_interval(int64_t{1} << 40);
  }
  // Seconds for `steps` steps.
  double run(int64_t steps) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) opt_.step();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::vector<at::Tensor> params_;
  lowbit::Shampoo opt_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<CppShampoo>(m, "CppShampoo")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, std::string>())
      .def("run", &CppShampoo::run);
}
"""

CASES = {
    # The parameters of examples/train_fashion_mnist.py's CNN (8 tensors, 215k values).
    "fashion-cnn": [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (128, 1568), (128,), (10, 128), (10,)],
    # A deep narrow MLP: many small parameters, where a per-parameter cost shows most.
    "mlp-24x256": [(256, 256), (256,)] * 24,
    # The same count of tiny parameters: almost no arithmetic, so the fixed costs show.
    "mlp-24x16": [(16, 16), (16,)] * 24,
    # The shapes of `lowbit bench step` (src/cli/bench_step.cpp).
    "bench-step": [(1024, 1024), (4096, 1024), (256, 256, 3, 3)],
}


def build_cpp_baseline(library: Path):
    from torch.utils.cpp_extension import load_inline

    build_dir = ROOT / "build" / "bench_cpp_shampoo"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name="lowbit_bench_cpp_shampoo",
        cpp_sources=[CPP_SOURCE],
        extra_include_paths=[str(ROOT / "include")],
        extra_cflags=["-O2"],
        extra_ldflags=[f"-L{library.parent}", "-l:" + library.name, f"-Wl,-rpath,{library.parent}"],
        build_directory=str(build_dir),
        verbose=False,
    )


def measure(case: str, shapes, bits: int, graft: str, rounds: int, cpp_module):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]

    py_params = [p.clone().requires_grad_(True) for p in params]
    for p, gr in zip(py_params, grads):
        p.grad = gr
    opt = lowbit.Shampoo(py_params, lr=1e-3, bits=bits, graft=graft, stat_interval=1, root_interval=1)
    opt.step()
    opt.step()
    opt.param_groups[0]["stat_interval"] = 1 << 40
    opt.param_groups[0]["root_interval"] = 1 << 40
    opt.step()  # the new options' config is built here, outside the timing

    # The C++ work of opt.step() on the same state, called directly: the overflow rule's
    # gradient check (squared norms, read once), the group's bound, and the per-group step (what
    # lowbit.Shampoo.step calls after its Python checks).
    config = opt._config(0, opt.param_groups[0])
    states = [opt.state[p]._cpp for p in py_params]
    squared_norms = torch.ops.lowbit.squared_norms.default
    first_offence = torch.ops.lowbit.first_offence.default

    def direct() -> float:
        start = time.perf_counter()
        first_offence(squared_norms(grads))
        config.update_bounded()
        config.step(states, py_params, grads)
        return time.perf_counter() - start

    def python() -> float:
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    runs = {"python": python, "direct": direct}
    if cpp_module is not None:
        # Leaves that require grad, as in training (and as on the Python side).
        cpp = cpp_module.CppShampoo([p.clone().requires_grad_(True) for p in params], grads, bits, graft)
        runs["cpp"] = lambda: cpp.run(1)
        # A second, identical C++ optimizer: how far two instances of the same work differ.
        cpp2 = cpp_module.CppShampoo([p.clone().requires_grad_(True) for p in params], grads, bits, graft)
        runs["cpp2"] = lambda: cpp2.run(1)

    for _ in range(3):  # warm-up
        for fn in runs.values():
            fn()
    # Single steps in a random order each round, so that load from elsewhere on the
    # machine hits every variant alike; medians over the rounds, and the overhead as the
    # median of the per-round differences.
    times = {k: [] for k in runs}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(runs)
        rng.shuffle(order)
        for k in order:
            times[k].append(runs[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = statistics.median(p - d for p, d in zip(times["python"], times["direct"]))
    row = dict(case=case, params=len(shapes), numel=sum(p.numel() for p in params), python_ms=1e3 * med["python"],
               direct_ms=1e3 * med["direct"], overhead_ms=1e3 * overhead,
               overhead_per_param_us=1e6 * overhead / len(shapes), ratio=(med["direct"] + overhead) / med["direct"])
    if "cpp" in med:
        row["cpp_ms"] = 1e3 * med["cpp"]
        row["vs_cpp"] = statistics.median(p - c for p, c in zip(times["python"], times["cpp"])) * 1e3
        row["cpp_spread"] = statistics.median(c2 - c for c, c2 in zip(times["cpp"], times["cpp2"])) * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--graft", default="adamw")
    parser.add_argument("--rounds", type=int, default=300, help="samples per case and variant (bench-step: 12)")
    parser.add_argument("--no-cpp", action="store_true", help="skip the compiled C++ optimizer baseline")
    args = parser.parse_args()

    library = Path(lowbit.library_path).resolve()
    cpp_module = None
    if not args.no_cpp:
        try:
            t0 = time.perf_counter()
            cpp_module = build_cpp_baseline(library)
            print(f"C++ baseline compiled/loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - any build failure falls back
            print(f"C++ baseline unavailable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  "falling back to --no-cpp", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, liblowbit {library}")
    print(f"{args.bits}-bit Shampoo + {args.graft}, plain preconditioned steps (roots computed, no "
          f"statistics/root update in the timed steps)")
    print(f"{'case':12} {'params':>6} {'values':>9} {'python ms':>10} {'direct ms':>10} {'overhead ms':>11} "
          f"{'/param us':>9} {'ratio':>6} {'C++ opt ms':>10} {'py - C++ ms':>11} {'C++ 2 - 1 ms':>12}")
    for case in args.cases:
        rounds = min(args.rounds, 12) if case == "bench-step" else args.rounds
        r = measure(case, CASES[case], args.bits, args.graft, rounds, cpp_module)
        cpp = (f"{r['cpp_ms']:10.3f} {r['vs_cpp']:11.3f} {r['cpp_spread']:12.3f}" if "cpp_ms" in r
               else f"{'-':>10} {'-':>11} {'-':>12}")
        print(f"{r['case']:12} {r['params']:6d} {r['numel']:9d} {r['python_ms']:10.3f} {r['direct_ms']:10.3f} "
              f"{r['overhead_ms']:11.3f} {r['overhead_per_param_us']:9.1f} {r['ratio']:6.3f} {cpp}", flush=True)
    print("direct: the same optimizer's C++ calls (squared_norms / first_offence + ShampooConfig.step) made directly; "
          "overhead = median of paired (python - direct); C++ opt: a lowbit::Shampoo of the same shapes; "
          "C++ 2 - 1: a second identical lowbit::Shampoo against the first")


if __name__ == "__main__":
    main()
