// Subcommands of the `lowbit` program; each registers its options on a CLI11 app.
#pragma once

#include <CLI/CLI.hpp>

namespace lowbit::cli {

// `lowbit bench codec`: codec throughput against a same-run memcpy baseline.
void add_bench_codec(CLI::App& bench);

// `lowbit bench step`: Shampoo step time over a T2 cycle and preconditioner state bytes,
// 4-bit (and double-quantized, naive) against fp32 Shampoo in the same run.
void add_bench_step(CLI::App& bench);

// `lowbit bench memory`: the peak resident memory 4-bit and fp32 Shampoo add (each variant in
// a fresh process), against the goal share of the state 4-bit saves in theory.
void add_bench_memory(CLI::App& bench);

// `lowbit train`: one training run; with no arguments, the README's main job.
void add_train(CLI::App& app);

// `lowbit compare`: training runs of several optimizers and seeds, with a table, JSON and a chart.
void add_compare(CLI::App& app);

// `lowbit quant-error`: the paper's Table 1 error analysis on synthetic SPD matrices.
void add_quant_error(CLI::App& app);

// `lowbit hawq`: Hessian-aware mixed-precision quantization of a `train --save-model` model.
void add_hawq(CLI::App& app);

}  // namespace lowbit::cli
