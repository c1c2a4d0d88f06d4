// lowbit's distributed mode. The ranks of a torch.distributed (c10d) process group share
// Shampoo's matrix work: every factor (the L or R of a block) that is due for a
// statistics or root update is assigned to one rank, balanced by cost (order^3); each
// rank updates only its factors, then the updated states (4-bit codes, scales,
// eigenvalues, inverse roots) are broadcast in their stored form, so every rank holds the
// same state and takes the same step. Use it through Shampoo::distribute.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <string>

#include <lowbit/distributed_options.h>

namespace lowbit {

// A Gloo (CPU) process group over TCP; rank 0 hosts the rendezvous store at host:port.
// Every rank calls it with the same host, port and world_size. Throws when lowbit was
// built without the Gloo headers (libgloo-dev) or when the ranks do not meet within
// `timeout`.
c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(const std::string& host, int port, int rank,
                                                               int world_size, std::chrono::milliseconds timeout);

}  // namespace lowbit
