// Data-parallel training for `lowbit train --nproc N`: this process's rank in a Gloo
// group on loopback, its shard of every batch, and the check that every rank ends with
// the same parameters. The optimizer (lowbit::Shampoo) averages the gradients and shares
// the preconditioner work (lowbit/distributed.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <lowbit/distributed.h>

#include <string>
#include <vector>

namespace lowbit::train {

struct DistributedRun {
  int world_size = 1;       // 1: not distributed
  int rank = 0;
  int port = 0;             // rendezvous on 127.0.0.1 (rank 0 hosts it)
  double timeout_s = 60;    // for the rendezvous and every collective
};

// This rank's rows of a batch, and the factor for its mean loss that makes the average
// of the ranks' gradients the gradient of the whole batch's mean loss (shards may differ
// in size by one row).
struct Shard {
  at::Tensor images, labels;
  double loss_scale = 1.0;
};

class DataParallel {
 public:
  explicit DataParallel(const DistributedRun& run);
  bool active() const { return group_ != nullptr; }
  int rank() const { return run_.rank; }
  int world_size() const { return run_.world_size; }

  // Makes a lowbit::Shampoo optimizer distributed (averaging gradients); other
  // optimizers are refused by name.
  void attach(torch::optim::Optimizer& optimizer, const std::string& name) const;
  Shard shard(const at::Tensor& images, const at::Tensor& labels) const;
  // Whether every rank holds exactly these parameter values (an all-gather).
  bool parameters_agree(const std::vector<at::Tensor>& params) const;

 private:
  DistributedRun run_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
};

}  // namespace lowbit::train
