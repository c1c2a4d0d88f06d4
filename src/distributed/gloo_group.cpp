// make_gloo_process_group. The torch wheel ships no Gloo headers, so this file is built
// against the system's (Debian libgloo-dev) when CMake finds them; only the constructor
// and static helpers of c10d::ProcessGroupGloo, which live in libtorch, are used, and
// every Gloo object is held through a pointer, so the header version does not change
// any layout we rely on.
#include <lowbit/distributed.h>

#if defined(LOWBIT_WITH_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

namespace lowbit {

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_process_group(const std::string& host, int port, int rank,
                                                               int world_size, std::chrono::milliseconds timeout) {
  TORCH_CHECK(world_size >= 1, "make_gloo_process_group: world_size must be >= 1; got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, "make_gloo_process_group: rank must be in [0, ", world_size,
              "); got ", rank);
  TORCH_CHECK(port > 0 && port < 65536, "make_gloo_process_group: port must be in [1, 65535]; got ", port);
#if defined(LOWBIT_WITH_GLOO)
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(port);
  store_options.isServer = rank == 0;
  store_options.numWorkers = world_size;
  store_options.waitWorkers = true;
  store_options.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(host, store_options);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "make_gloo_process_group: rank ", rank, " could not meet the other ranks at ", host, ":",
                port, " within ", timeout.count(), " ms: ", e.what());
  }
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
  auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world_size);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, backend);
  return group;
#else
  (void)host;
  (void)timeout;
  TORCH_CHECK(false, "make_gloo_process_group: this lowbit was built without the Gloo headers (install "
              "libgloo-dev and rebuild), or create the process group with torch.distributed in Python");
#endif
}

}  // namespace lowbit
