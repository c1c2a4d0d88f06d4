// Subcommands of the `lowbit` program; each registers its options on a CLI11 app.
#pragma once

#include <CLI/CLI.hpp>

namespace lowbit::cli {

// `lowbit bench codec`: codec throughput against a same-run memcpy baseline.
void add_bench_codec(CLI::App& bench);

}  // namespace lowbit::cli
