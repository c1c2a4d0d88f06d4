// The collectives lowbit's distributed mode uses, on a c10d process group: every wait is
// bounded by the options' timeout, and a failure (a rank that died, raised, or is too
// slow) becomes an error naming the collective and this rank instead of a hang.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

#include <lowbit/distributed_options.h>

namespace lowbit::distributed {

class Communicator {
 public:
  Communicator(c10::intrusive_ptr<c10d::ProcessGroup> group, DistributedOptions options);

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  const DistributedOptions& options() const { return options_; }
  CommunicationStats& stats() { return stats_; }
  const CommunicationStats& stats() const { return stats_; }

  // Replaces each tensor by its mean over the ranks (one all-reduce per dtype and device).
  void average(const std::vector<at::Tensor>& tensors);
  // Sends `buffer` from rank `root` to every other rank (in place).
  void broadcast(at::Tensor& buffer, int root);

 private:
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* collective);
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  DistributedOptions options_;
  int rank_, world_size_;
  CommunicationStats stats_;
};

}  // namespace lowbit::distributed
