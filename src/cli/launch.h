// `lowbit train --nproc N`: the program runs itself again as N rank processes on this
// machine and waits for them.
#pragma once

#include <string>
#include <vector>

namespace lowbit::cli {

// The program's own command line, recorded by main() for relaunching.
void remember_command_line(int argc, char** argv);

// Starts ranks 0..world-1 of the remembered command line (with --rank r --port P added,
// P a free loopback port), and waits. Returns 0 when every rank succeeded; otherwise
// names the ranks that failed on stderr, stops the others once `timeout_s` has passed
// and returns 1.
int run_local_ranks(int world, double timeout_s);

}  // namespace lowbit::cli
