// Subcommands of the `lowbit` program; each registers its options on a CLI11 app.
#pragma once

#include <CLI/CLI.hpp>

namespace lowbit::cli {

// `lowbit bench codec`: codec throughput against a same-run memcpy baseline.
void add_bench_codec(CLI::App& bench);

// `lowbit bench step`: Shampoo step time over a T2 cycle and preconditioner state bytes,
// 4-bit (and double-quantized, naive) against fp32 Shampoo in the same run.
void add_bench_step(CLI::App& bench);

// `lowbit quant-error`: the paper's Table 1 error analysis on synthetic SPD matrices.
void add_quant_error(CLI::App& app);

}  // namespace lowbit::cli
