// The `lowbit` command-line program.
#include <c10/util/Exception.h>

#include <iostream>

#include "cli/commands.h"
#include "cli/launch.h"

int main(int argc, char** argv) {
  lowbit::cli::remember_command_line(argc, argv);
  CLI::App app{"lowbit: low-bit (4-bit) optimizer states for LibTorch"};
  app.require_subcommand(1);
  CLI::App* bench = app.add_subcommand("bench", "Measure speed and memory");
  bench->require_subcommand(1);
  lowbit::cli::add_bench_codec(*bench);
  lowbit::cli::add_bench_step(*bench);
  lowbit::cli::add_bench_memory(*bench);
  lowbit::cli::add_train(app);
  lowbit::cli::add_compare(app);
  lowbit::cli::add_quant_error(app);
  lowbit::cli::add_hawq(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {
    std::cerr << "lowbit: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lowbit: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
