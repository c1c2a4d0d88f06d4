// Counts the ATen operators that code calls, by name, through RecordFunction (what
// torch.profiler reads). On a GPU a host synchronisation shows up as
// aten::_local_scalar_dense (item(), bool(), a scalar read) or aten::nonzero; a
// factorization as aten::linalg_qr / aten::linalg_householder_product, aten::_linalg_eigh or
// aten::linalg_cholesky_ex. On the CPU the same calls are made, so these counts are a
// structural test of the GPU step.
#pragma once

#include <ATen/record_function.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace lowbit::testing {

class OpCounter {
 public:
  OpCounter() {
    std::lock_guard<std::mutex> lock(mutex());
    counts().clear();
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&OpCounter::on_start).scopes({at::RecordScope::FUNCTION}));
  }
  ~OpCounter() { at::removeCallback(handle_); }
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;

  int64_t count(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mutex());
    const auto it = counts().find(name);
    return it == counts().end() ? 0 : it->second;
  }
  // Calls that wait for a GPU: scalar reads (item, bool, is_nonzero all end in
  // _local_scalar_dense), nonzero (data-dependent size), equal (returns a host bool) and
  // lowbit's own device-to-host reads (lowbit::read_to_host: a copy that is free on a CPU).
  int64_t synchronisations() const {
    return count("aten::_local_scalar_dense") + count("aten::nonzero") + count("aten::equal") +
           count("lowbit::read_to_host");
  }
  // Symmetric eigendecompositions, QR (linalg_qr, or geqrf + linalg_householder_product for Q
  // alone: counted once, by the latter) and Cholesky factorizations.
  int64_t factorizations() const {
    return count("aten::_linalg_eigh") + count("aten::linalg_qr") + count("aten::linalg_householder_product") +
           count("aten::linalg_cholesky_ex");
  }
  std::map<std::string, int64_t> all() const {
    std::lock_guard<std::mutex> lock(mutex());
    return counts();
  }

 private:
  static std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
    std::lock_guard<std::mutex> lock(mutex());
    ++counts()[fn.name()];
    return nullptr;
  }
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::map<std::string, int64_t>& counts() {
    static std::map<std::string, int64_t> c;
    return c;
  }
  at::CallbackHandle handle_;
};

}  // namespace lowbit::testing
