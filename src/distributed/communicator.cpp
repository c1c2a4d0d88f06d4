#include "distributed/communicator.h"

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <utility>

namespace lowbit::distributed {

Communicator::Communicator(c10::intrusive_ptr<c10d::ProcessGroup> group, DistributedOptions options)
    : group_(std::move(group)), options_(options) {
  TORCH_CHECK(group_, "lowbit distributed: the process group is null");
  TORCH_CHECK(options_.timeout.count() > 0, "lowbit distributed: timeout must be > 0 ms; got ",
              options_.timeout.count());
  rank_ = group_->getRank();
  world_size_ = group_->getSize();
}

void Communicator::wait(const c10::intrusive_ptr<c10d::Work>& work, const char* collective) {
  try {
    work->wait(options_.timeout);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "lowbit distributed: ", collective, " failed on rank ", rank_, " of ", world_size_,
                " (another rank stopped, raised, or did not arrive within ", options_.timeout.count(),
                " ms): ", e.what());
  }
}

void Communicator::average(const std::vector<at::Tensor>& tensors) {
  // One flat buffer per (device, dtype): one collective instead of one per tensor.
  std::map<std::pair<std::string, at::ScalarType>, std::vector<at::Tensor>> groups;
  for (const at::Tensor& t : tensors) groups[{t.device().str(), t.scalar_type()}].push_back(t);
  for (auto& [key, members] : groups) {
    std::vector<at::Tensor> flat;
    for (const at::Tensor& t : members) flat.push_back(t.reshape({-1}));
    std::vector<at::Tensor> buffer{at::cat(flat)};
    wait(group_->allreduce(buffer), "gradient all-reduce");
    buffer[0].div_(world_size_);
    int64_t offset = 0;
    for (const at::Tensor& t : members) {
      t.copy_(buffer[0].slice(0, offset, offset + t.numel()).view(t.sizes()));
      offset += t.numel();
    }
    stats_.gradient_bytes += buffer[0].numel() * static_cast<int64_t>(buffer[0].element_size());
  }
}

void Communicator::broadcast(at::Tensor& buffer, int root) {
  std::vector<at::Tensor> tensors{buffer};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  options.timeout = options_.timeout;
  wait(group_->broadcast(tensors, options), "preconditioner broadcast");
  stats_.state_bytes += buffer.numel();
}

}  // namespace lowbit::distributed
