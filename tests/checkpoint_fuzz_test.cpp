// Seeded fuzzing of checkpoint loading for every C++ optimizer: lowbit::Shampoo (bits 32/8/4,
// quantize eigenvectors/matrix/cholesky, preconditioner shampoo/caspr/soap, graft sgdm/adamw,
// graft_bits 32/8/4), lowbit::AdamW (32/8/4), Sophia, AdaHessian, MFAC and NagGS.
//
// Each case starts from a valid checkpoint (a "source" optimizer after a few steps) and
// corrupts it, either as bytes (truncation, flipped bits, overwritten or deleted ranges) or
// as an archive (entries removed, renamed or added; tensors of another dtype or shape; NaN,
// Inf, negative or huge values; ints, doubles and strings replaced; types swapped). It is
// then loaded into a "target" optimizer that has taken steps of its own. Property:
//  - a clear error (a c10::Error naming the optimizer), after which the target is exactly
//    as before: its parameters are untouched and its next steps equal those of an untouched
//    twin, bit for bit; or
//  - a successful load, after which the next steps run without error and keep every
//    parameter finite.
// Never a crash or a hang. Corruptions that torch's archive reader rejects before lowbit
// sees them (archive.load_from) must be errors too, and leave the target untouched.
//
// One exception to "finite": a corruption can leave a valid but extreme state, e.g. a
// momentum of 3e38, and float32 arithmetic on such values overflows in the next step as it
// would in an uninterrupted run that reached them; no check on loading can tell such a
// state from a real one. A loaded state counts as extreme when some value of it exceeds
// 1e6 times the largest magnitude of the same entry in the valid checkpoint (and 1e6). For
// those cases the property is only: no crash, and any error a c10::Error. The test counts
// each kind of outcome and prints the counts.
//
// Under AddressSanitizer, byte-level corruption keeps to the tensor-data records of the
// archive and to truncation: torch's unpickler trusts length fields of the pickle records
// and asks operator new for that many bytes, a std::bad_alloc in a normal build (which the
// Release run of this test covers) but an abort that no ASan option turns into an exception.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cfloat>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include <lowbit/adahessian.h>
#include <lowbit/adamw.h>
#include <lowbit/mfac.h>
#include <lowbit/nag_gs.h>
#include <lowbit/shampoo.h>
#include <lowbit/sophia.h>

#include "archive_bytes.h"
#include "archive_tree.h"
#include "fuzz_support.h"

namespace lowbit {
namespace {

using Optimizer = torch::optim::Optimizer;
using testing::CaseRng;
using testing::Outcome;
using testing::outcome_of;
using testing::Entry;
using testing::Node;
using testing::Slot;
using testing::deep_copy;
using testing::read_tree;
using testing::tree_bytes;

// ------------------------------------------------------------------ the optimizers
// Small parameters, so that a case costs little: a matrix that Shampoo preconditions with
// two factors (quantized with min_quant_numel 16), a conv-like kernel and a vector.
const std::vector<std::vector<int64_t>> kShapes = {{8, 6}, {3, 2, 2}, {5}};

std::vector<at::Tensor> make_params(uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> params;
  for (const auto& s : kShapes) params.push_back(at::randn(s, gen).requires_grad_(true));
  return params;
}

std::vector<at::Tensor> snapshot(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone());
  return out;
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i].detach(), b[i].detach())) return false;
  return true;
}

bool all_finite(const std::vector<at::Tensor>& params) {
  for (const auto& p : params)
    if (!p.detach().isfinite().all().item<bool>()) return false;
  return true;
}

// f = sum over parameters of 0.5 c p^2 + w p + 0.1 p_0 p_1 (neighbouring elements coupled),
// with fixed c > 0 and w: a loss with a Hessian, for the optimizers that need one
// (create_graph), and gradients for the rest; linear in p, so large parameters give large
// but finite gradients.
at::Tensor objective(const std::vector<at::Tensor>& params) {
  at::Tensor loss = at::zeros({});
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor flat = params[i].reshape({-1});
    const int64_t n = flat.numel();
    const at::Tensor c = at::linspace(0.5, 2.0, n);
    const at::Tensor w = at::linspace(-1.0, 1.0, n);
    loss = loss + (0.5 * c * flat * flat + w * flat).sum() + 0.1 * (flat.narrow(0, 1, n - 1) * flat.narrow(0, 0, n - 1)).sum();
  }
  return loss;
}

struct Subject {
  std::string name;
  std::string who;  // how the optimizer names itself in its errors
  std::function<std::unique_ptr<Optimizer>(const std::vector<at::Tensor>&)> make;
  bool create_graph = false;
};

void take_step(const Subject& s, Optimizer& opt, std::vector<at::Tensor>& params) {
  opt.step([&] {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    at::Tensor loss = objective(params);
    loss.backward({}, c10::nullopt, s.create_graph);
    return loss.detach();
  });
  // Drop the double-backward graph that create_graph left on the gradients.
  for (auto& p : params)
    if (p.grad().defined()) p.mutable_grad() = p.grad().detach();
}

template <typename Opt, typename Options>
Subject subject(std::string name, std::string who, Options options, bool create_graph = false) {
  return {std::move(name), std::move(who),
          [options](const std::vector<at::Tensor>& params) { return std::make_unique<Opt>(params, options); },
          create_graph};
}

ShampooOptions shampoo(int64_t bits, const char* quantize, const char* preconditioner, const char* graft,
                       int64_t graft_bits) {
  return ShampooOptions(0.01).bits(bits).quantize(quantize).preconditioner(preconditioner).graft(graft)
      .graft_bits(graft_bits).min_quant_numel(16).quant_block_size(16).stat_interval(1).root_interval(2)
      .epsilon(1e-4);
}

std::vector<Subject> subjects() {
  const char* S = "lowbit::Shampoo";
  return {
      subject<Shampoo>("Shampoo 32-bit adamw", S, shampoo(32, "eigenvectors", "shampoo", "adamw", 32)),
      subject<Shampoo>("Shampoo 4-bit eigenvectors sgdm", S, shampoo(4, "eigenvectors", "shampoo", "sgdm", 32)),
      subject<Shampoo>("Shampoo 4-bit matrix adamw", S, shampoo(4, "matrix", "shampoo", "adamw", 32)),
      subject<Shampoo>("Shampoo 8-bit eigenvectors caspr graft_bits 8", S,
                       shampoo(8, "eigenvectors", "caspr", "adamw", 8)),
      subject<Shampoo>("Shampoo 4-bit cholesky adamw", S, shampoo(4, "cholesky", "shampoo", "adamw", 32)),
      subject<Shampoo>("Shampoo 8-bit cholesky caspr sgdm, no error feedback", S,
                       shampoo(8, "cholesky", "caspr", "sgdm", 32).error_feedback(false)),
      subject<Shampoo>("Shampoo 4-bit soap graft_bits 4", S, shampoo(4, "eigenvectors", "soap", "adamw", 4)),
      subject<Shampoo>("Shampoo 32-bit soap graft_bits 8", S, shampoo(32, "eigenvectors", "soap", "adamw", 8)),
      subject<Shampoo>("Shampoo 4-bit dynamic double-quantized graft_bits 4", S,
                       shampoo(4, "eigenvectors", "shampoo", "adamw", 4).mapping("dynamic").double_quant_scales(true)),
      subject<Shampoo>("Shampoo 8-bit matrix sgdm nesterov", S,
                       shampoo(8, "matrix", "shampoo", "sgdm", 32).nesterov(true)),
      subject<AdamW>("AdamW 32-bit", "lowbit::AdamW", AdamWOptions(0.01).bits(32)),
      subject<AdamW>("AdamW 8-bit", "lowbit::AdamW", AdamWOptions(0.01).bits(8).min_quant_numel(16).block_size(16)),
      subject<AdamW>("AdamW 4-bit stochastic", "lowbit::AdamW",
                     AdamWOptions(0.01).bits(4).min_quant_numel(10).block_size(16).rounding("stochastic").seed(3)),
      subject<Sophia>("Sophia gnb", "lowbit::Sophia", SophiaOptions(0.05).rho(0.5).hessian_interval(2)),
      subject<Sophia>("Sophia hutchinson", "lowbit::Sophia",
                      SophiaOptions(0.05).rho(0.5).estimator("hutchinson").hessian_interval(2).seed(7), true),
      subject<AdaHessian>("AdaHessian", "lowbit::AdaHessian",
                          AdaHessianOptions(0.05).hessian_power(0.8).hessian_interval(2).seed(3), true),
      subject<MFAC>("MFAC fp32", "lowbit::MFAC", MFACOptions(0.05).window(3).momentum(0.9).damping(0.1)),
      subject<MFAC>("MFAC 8-bit", "lowbit::MFAC",
                    MFACOptions(0.05).window(3).momentum(0.9).damping(0.1).bits(8).quant_block_size(16)),
      subject<MFAC>("MFAC 4-bit", "lowbit::MFAC", MFACOptions(0.05).window(4).damping(0.1).bits(4).quant_block_size(16)),
      subject<NagGS>("NagGS", "lowbit::NagGS", NagGSOptions(0.2).mu(0.5).gamma(1.5)),
  };
}

// ------------------------------------------------------------------ corruptions
at::Tensor spoiled_tensor(CaseRng& r, const at::Tensor& t, std::string& what) {
  switch (r.between(0, 4)) {
    case 0: {  // another dtype
      const at::ScalarType dt = r.one_of(std::vector<at::ScalarType>{
          at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kInt, at::kLong, at::kByte, at::kBool, at::kComplexFloat});
      what = "dtype " + std::string(c10::toString(dt));
      return t.to(dt);
    }
    case 1: {  // another shape
      what = "shape";
      switch (r.between(0, 5)) {
        case 0: return t.dim() > 0 && t.size(0) > 0 ? t.narrow(0, 0, t.size(0) - 1).clone() : t.unsqueeze(0);
        case 1: return t.dim() > 0 ? at::cat({t, t}) : t.repeat({2});
        case 2: return t.reshape({-1}).clone();
        case 3: return t.dim() >= 2 ? t.transpose(0, 1).contiguous() : t.unsqueeze(-1).clone();
        case 4: return at::empty({0}, t.options());
        default: return t.numel() > 0 ? t.reshape({-1})[0].clone() : at::zeros({}, t.options());  // a scalar
      }
    }
    case 2:
    case 3: {  // a bad value: NaN, Inf, negative, huge, tiny, or (integers) extreme
      at::Tensor out = t.clone();
      if (out.numel() == 0) {
        what = "empty (unchanged)";
        return out;
      }
      const int64_t i = r.between(0, out.numel() - 1);
      if (at::isFloatingType(out.scalar_type())) {
        const double v = r.one_of(std::vector<double>{std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY,
                                                      -1.0, -1e-20, 3e38, -3e38, 1e30, FLT_TRUE_MIN, 0.0, 1e-30});
        out.view(-1)[i] = v;
        what = "value " + std::to_string(v);
      } else if (out.scalar_type() == at::kLong || out.scalar_type() == at::kInt) {
        const int64_t v = r.one_of(std::vector<int64_t>{-1, 0, 1, 7, 1 << 20, INT32_MAX, INT32_MIN});
        out.view(-1)[i] = v;
        what = "int " + std::to_string(v);
      } else {
        out.view(-1)[i] = static_cast<int64_t>(r.between(0, 255));
        what = "byte";
      }
      return out;
    }
    default: {  // random bits in the tensor's bytes
      at::Tensor out = t.clone().contiguous();
      if (out.numel() == 0 || out.scalar_type() == at::kBool) {
        what = "empty or bool (unchanged)";
        return out;
      }
      const at::Tensor bytes = out.view(-1).view(at::kByte);
      for (int64_t k = r.between(1, 3); k > 0; --k) {
        const int64_t i = r.between(0, bytes.numel() - 1);
        bytes[i] = static_cast<int64_t>(bytes[i].item<uint8_t>() ^ (1u << r.between(0, 7)));
      }
      what = "flipped bits";
      return out;
    }
  }
}

c10::IValue random_ivalue(CaseRng& r) {
  switch (r.between(0, 5)) {
    case 0: return c10::IValue(r.one_of(std::vector<int64_t>{-1, 0, 1, 3, INT64_MAX, INT64_MIN, int64_t{1} << 40}));
    case 1: return c10::IValue(r.one_of(std::vector<double>{0.0, -1.0, 1e308, NAN, INFINITY, 0.5}));
    case 2: return c10::IValue(r.one_of(std::vector<std::string>{"", "bogus", "linear2", "dynamic", "adamw", "4"}));
    case 3: {  // from the case's seed, so that a rerun of one seed edits the same way
      auto gen = at::make_generator<at::CPUGeneratorImpl>(r.bits());
      return c10::IValue(at::randn({r.between(0, 4)}, gen));
    }
    case 4: return c10::IValue(at::tensor(r.between(-2, 1000000), at::kLong));
    default: return c10::IValue(std::make_tuple(0.5, r.one_of(std::vector<double>{0.9, NAN, -1.0, 2.0})));
  }
}

// One edit of the archive tree; returns a description for the failure message.
std::string edit_tree(CaseRng& r, Node& root) {
  const std::vector<Slot> all = testing::slots(root);
  if (all.empty()) return "empty tree";
  const Slot& slot = r.one_of(all);
  Entry& entry = slot.parent->entries.at(slot.key);
  const int64_t kind = r.between(0, 9);
  switch (kind) {
    case 0:
      slot.parent->entries.erase(slot.key);
      return "removed " + slot.path;
    case 1: {
      Entry moved = entry;
      const std::string key = slot.key;
      Node* parent = slot.parent;
      parent->entries.erase(key);
      const std::string renamed = r.chance(0.5) ? key + "x" : (key.size() > 1 ? key.substr(0, key.size() - 1) : "z");
      parent->entries[renamed] = moved;
      return "renamed " + slot.path + " to " + renamed;
    }
    case 2: {
      const std::string key = r.one_of(std::vector<std::string>{"extra", "step", "exp_avg", "lr", "count", "size",
                                                                "0", "preconditioner/block0/left/statistic",
                                                                "preconditioner/block9/left/root", "lowbit_steps"});
      Node* parent = slot.parent;
      if (auto* child = std::get_if<std::shared_ptr<Node>>(&entry); child && r.chance(0.5)) parent = child->get();
      parent->entries[key] = random_ivalue(r);
      return "added " + key + " next to " + slot.path;
    }
    case 3:
    case 4:
    case 5: {
      auto* value = std::get_if<c10::IValue>(&entry);
      if (value == nullptr || !value->isTensor()) {
        entry = random_ivalue(r);
        return "replaced " + slot.path + " by a value";
      }
      std::string what;
      entry = c10::IValue(spoiled_tensor(r, value->toTensor(), what));
      return "spoiled tensor " + slot.path + " (" + what + ")";
    }
    case 6: {  // a plain value changed
      auto* value = std::get_if<c10::IValue>(&entry);
      if (value != nullptr && value->isInt()) {
        const int64_t old = value->toInt();
        entry = c10::IValue(r.one_of(std::vector<int64_t>{-1, 0, 1, old + 1, old - 1, old * 2, INT64_MAX, INT64_MIN,
                                                          INT64_MAX - 1, int64_t{1} << 53, int64_t{1} << 62}));
        return "changed int " + slot.path;
      }
      if (value != nullptr && value->isDouble()) {
        entry = c10::IValue(r.one_of(std::vector<double>{std::numeric_limits<double>::quiet_NaN(), INFINITY, -INFINITY,
                                                         -1.0, 0.0, 1e308, 1e-308, 1.0, 2.0, 0.999999}));
        return "changed double " + slot.path;
      }
      if (value != nullptr && value->isString()) {
        entry = c10::IValue(r.one_of(std::vector<std::string>{"", "bogus", "linear2", "dynamic", "linear", "sgdm",
                                                              "adamw", "eigenvectors", "matrix", "cholesky", "soap",
                                                              "caspr", "hutchinson", "gnb", "stochastic", "auto"}));
        return "changed string " + slot.path;
      }
      if (value != nullptr && value->isTuple()) {
        entry = random_ivalue(r);
        return "changed tuple " + slot.path;
      }
      entry = random_ivalue(r);
      return "replaced " + slot.path;
    }
    case 7: {  // two sibling entries exchanged (the states of two parameters), or one copied
      if (slot.parent->entries.size() < 2) return "nothing to swap";
      std::vector<std::string> keys;
      for (const auto& [k, v] : slot.parent->entries) keys.push_back(k);
      const std::string other = r.one_of(keys);
      if (r.chance(0.5)) {  // e.g. two parameters with the same key
        slot.parent->entries.at(slot.key) = slot.parent->entries.at(other);
        return "copied " + other + " onto " + slot.path;
      }
      std::swap(slot.parent->entries.at(slot.key), slot.parent->entries.at(other));
      return "swapped " + slot.path + " and " + other;
    }
    case 8: {  // a sub-archive emptied, or a value replaced by a sub-archive
      if (auto* child = std::get_if<std::shared_ptr<Node>>(&entry)) {
        (*child)->entries.clear();
        return "emptied " + slot.path;
      }
      entry = std::make_shared<Node>();
      return "replaced " + slot.path + " by an empty archive";
    }
    default: {  // a sub-archive replaced by a plain value
      entry = random_ivalue(r);
      return "replaced " + slot.path + " by a random value";
    }
  }
}

// The byte ranges of the archive's tensor-data records ("<archive>/data/<n>"), from the zip
// local file headers (torch stores records uncompressed, sizes in the local header).
std::vector<std::pair<int64_t, int64_t>> tensor_data_ranges(const std::string& bytes) {
  std::vector<std::pair<int64_t, int64_t>> out;
  auto u16 = [&](size_t at) { return static_cast<uint32_t>(static_cast<uint8_t>(bytes[at])) |
                                     static_cast<uint32_t>(static_cast<uint8_t>(bytes[at + 1])) << 8; };
  auto u32 = [&](size_t at) { return u16(at) | u16(at + 2) << 16; };
  size_t at = 0;
  while (at + 30 <= bytes.size() && u32(at) == 0x04034b50u) {
    const size_t size = u32(at + 18), name_len = u16(at + 26), extra_len = u16(at + 28);
    const size_t data = at + 30 + name_len + extra_len;
    if (data + size > bytes.size()) break;
    const std::string name = bytes.substr(at + 30, name_len);
    if (name.find("/data/") != std::string::npos && size > 0) out.emplace_back(data, data + size);
    at = data + size;
  }
  return out;
}

std::string edit_bytes(CaseRng& r, std::string& bytes) {
  if (bytes.empty()) return "empty";
  const int64_t n = static_cast<int64_t>(bytes.size());
  if (testing::kUnderAddressSanitizer) {  // (see the top of the file)
    const auto ranges = tensor_data_ranges(bytes);
    if (ranges.empty() || r.chance(0.3)) {
      const int64_t keep = r.between(0, n - 1);
      bytes.resize(static_cast<size_t>(keep));
      return "truncated to " + std::to_string(keep) + " of " + std::to_string(n) + " bytes";
    }
    const auto [lo, hi] = r.one_of(ranges);
    const int64_t flips = r.between(1, 4);
    for (int64_t k = 0; k < flips; ++k) bytes[static_cast<size_t>(r.between(lo, hi - 1))] ^= static_cast<char>(1 << r.between(0, 7));
    return std::to_string(flips) + " flipped bits in tensor data";
  }
  switch (r.between(0, 4)) {
    case 0: {
      const int64_t keep = r.chance(0.5) ? r.between(0, n - 1) : r.between(std::max<int64_t>(0, n - 200), n - 1);
      bytes.resize(static_cast<size_t>(keep));
      return "truncated to " + std::to_string(keep) + " of " + std::to_string(n) + " bytes";
    }
    case 1:
    case 2: {
      const int64_t flips = r.between(1, 4);
      for (int64_t k = 0; k < flips; ++k) bytes[static_cast<size_t>(r.between(0, n - 1))] ^= static_cast<char>(1 << r.between(0, 7));
      return std::to_string(flips) + " flipped bits";
    }
    case 3: {
      const int64_t at = r.between(0, n - 1), len = std::min<int64_t>(r.between(1, 64), n - at);
      for (int64_t k = 0; k < len; ++k) bytes[static_cast<size_t>(at + k)] = static_cast<char>(r.between(0, 255));
      return "overwrote " + std::to_string(len) + " bytes at " + std::to_string(at);
    }
    default: {
      const int64_t at = r.between(0, n - 1), len = std::min<int64_t>(r.between(1, 16), n - at);
      bytes.erase(static_cast<size_t>(at), static_cast<size_t>(len));
      return "deleted " + std::to_string(len) + " bytes at " + std::to_string(at);
    }
  }
}

// The largest magnitude of each floating value of a tree (tensors, doubles, pairs), by path.
void magnitudes(const Node& node, const std::string& prefix, std::map<std::string, double>& out) {
  for (const auto& [key, entry] : node.entries) {
    const std::string path = prefix + key;
    if (const auto* child = std::get_if<std::shared_ptr<Node>>(&entry)) {
      magnitudes(**child, path + ".", out);
      continue;
    }
    const c10::IValue& v = std::get<c10::IValue>(entry);
    double m = 0;
    if (v.isTensor() && v.toTensor().defined() && v.toTensor().numel() > 0 &&
        at::isFloatingType(v.toTensor().scalar_type())) {
      const at::Tensor a = v.toTensor().to(at::kDouble).abs();
      m = a.masked_fill(a.isfinite().logical_not(), 0).max().item<double>();
    } else if (v.isDouble()) {
      m = std::isfinite(v.toDouble()) ? std::fabs(v.toDouble()) : 0;
    } else if (v.isTuple()) {
      for (const auto& e : v.toTupleRef().elements())
        if (e.isDouble() && std::isfinite(e.toDouble())) m = std::max(m, std::fabs(e.toDouble()));
    } else {
      continue;
    }
    out[path] = m;
  }
}

// Whether a loaded tree holds a value beyond 1e6 x max(1, the same entry's largest magnitude
// in the valid checkpoint, or the checkpoint's largest anywhere for entries it lacks).
bool extreme(const Node& loaded, const std::map<std::string, double>& clean) {
  std::map<std::string, double> got;
  magnitudes(loaded, "", got);
  double largest = 1;
  for (const auto& [path, m] : clean) largest = std::max(largest, m);
  for (const auto& [path, m] : got) {
    const auto it = clean.find(path);
    if (m > 1e6 * (it != clean.end() ? std::max(1.0, it->second) : largest)) return true;
  }
  return false;
}

// ------------------------------------------------------------------ the fuzz test
// A copy of a checkpoint tree whose parameter keys (state.<key> and each group's params/i)
// are "1", "2", ... in the order of the groups' parameter lists.
std::shared_ptr<Node> with_ordinal_keys(const Node& checkpoint) {
  auto out = testing::deep_copy(checkpoint);
  std::map<std::string, std::string> ordinal;
  for (Slot& s : testing::slots(*out)) {
    auto* value = std::get_if<c10::IValue>(&testing::entry_at(s));
    if (value == nullptr || !value->isString() || s.key.rfind("params/", 0) != 0) continue;
    const std::string fresh = std::to_string(ordinal.size() + 1);
    const auto [it, inserted] = ordinal.emplace(value->toStringRef(), fresh);
    testing::entry_at(s) = c10::IValue(it->second);
  }
  auto& states = std::get<std::shared_ptr<Node>>(out->entries.at("state"))->entries;
  std::map<std::string, Entry> renamed;
  for (auto& [key, entry] : states) renamed[ordinal.at(key)] = std::move(entry);
  states = std::move(renamed);
  return out;
}

// Per subject: the source's checkpoint (bytes and tree), and what an untouched target does.
struct Prepared {
  Subject subject;
  std::string checkpoint;
  std::shared_ptr<Node> tree;
  std::map<std::string, double> magnitudes;
  std::vector<at::Tensor> target_before;   // target parameters after its own steps
  std::vector<at::Tensor> target_after_1;  // ... and after one, two more steps
  std::vector<at::Tensor> target_after_2;
};

constexpr int kSourceSteps = 5, kTargetSteps = 2;

// The target: same shapes, other values, its own steps (so its state differs from the
// checkpoint's and a partial load would show).
std::unique_ptr<Optimizer> make_target(const Subject& s, std::vector<at::Tensor>& params) {
  params = make_params(2);
  auto opt = s.make(params);
  for (int t = 0; t < kTargetSteps; ++t) take_step(s, *opt, params);
  return opt;
}

Prepared prepare(const Subject& s) {
  Prepared p{s, {}, nullptr, {}, {}, {}, {}};
  std::vector<at::Tensor> source = make_params(1);
  auto opt = s.make(source);
  for (int t = 0; t < kSourceSteps; ++t) take_step(s, *opt, source);
  // torch::optim keys each parameter's state by the address of its TensorImpl; with
  // those keys the bytes (and the order of the tree's entries) change from run to run,
  // and a seed would not replay its case. Ordinal keys make every case reproducible.
  p.tree = with_ordinal_keys(*read_tree(testing::save_to_string(*opt)));
  p.checkpoint = tree_bytes(*p.tree);
  magnitudes(*p.tree, "", p.magnitudes);

  std::vector<at::Tensor> params;
  auto target = make_target(s, params);
  p.target_before = snapshot(params);
  take_step(s, *target, params);
  p.target_after_1 = snapshot(params);
  take_step(s, *target, params);
  p.target_after_2 = snapshot(params);
  return p;
}

const std::vector<Prepared>& prepared() {
  static const std::vector<Prepared> all = [] {
    const testing::OneThread one_thread;  // as the cases run, so that reruns of one seed agree
    std::vector<Prepared> out;
    for (const Subject& s : subjects()) out.push_back(prepare(s));
    return out;
  }();
  return all;
}

TEST(CheckpointFuzz, TheUneditedTreeRoundTripResumesLikeTheCheckpoint) {
  // The harness itself: a checkpoint read into a tree and written back loads, and the run
  // continues exactly as from the original bytes.
  for (const Prepared& p : prepared()) {
    SCOPED_TRACE(p.subject.name);
    std::vector<at::Tensor> a, b;
    auto oa = make_target(p.subject, a), ob = make_target(p.subject, b);
    testing::load_from_string(*oa, p.checkpoint);
    testing::load_from_string(*ob, tree_bytes(*p.tree));
    for (int t = 0; t < 2; ++t) {
      take_step(p.subject, *oa, a);
      take_step(p.subject, *ob, b);
    }
    EXPECT_TRUE(all_equal(a, b));
    // The checkpoint matters: without it the target continues differently.
    EXPECT_FALSE(all_equal(a, p.target_after_2));
  }
}

// How the cases ended, for the printed summary.
struct Tally {
  int64_t unwritable = 0, rejected_by_torch = 0, rejected = 0, loaded = 0, loaded_extreme = 0;
  int64_t extreme_not_finite = 0;  // of loaded_extreme: the next steps overflowed or raised
  int64_t loaded_unreadable = 0;   // loaded, but torch's reader refused the same bytes again
};
Tally tally;

// The entries whose values differ between two trees (for failure messages).
std::string differences(const Node& a, const Node& b) {
  std::map<std::string, double> ma, mb;
  magnitudes(a, "", ma);
  magnitudes(b, "", mb);
  std::string out;
  for (const auto& [path, m] : mb) {
    const auto it = ma.find(path);
    if (it == ma.end() || it->second != m)
      out += " " + path + " (max |x| " + (it == ma.end() ? std::string("new") : std::to_string(it->second)) + " -> " +
             std::to_string(m) + ")";
  }
  return out.empty() ? " none in floating values" : out;
}

void checkpoint_case(uint64_t seed) {
  CaseRng r(seed);
  const Prepared& p = r.one_of(prepared());
  std::string bytes, edits;
  if (r.chance(0.3)) {
    bytes = p.checkpoint;
    edits = edit_bytes(r, bytes);
  } else {
    const std::shared_ptr<Node> tree = deep_copy(*p.tree);
    for (int64_t k = r.between(1, 3); k > 0; --k) edits += (edits.empty() ? "" : "; ") + edit_tree(r, *tree);
    const Outcome written = outcome_of([&] { bytes = tree_bytes(*tree); });
    if (written.threw) {  // torch cannot write this tree at all: nothing to load
      ++tally.unwritable;
      return;
    }
  }
  SCOPED_TRACE(p.subject.name + ": " + edits);

  std::vector<at::Tensor> params;
  auto target = make_target(p.subject, params);
  torch::serialize::InputArchive archive;
  const Outcome parsed = outcome_of([&] {
    std::istringstream in(bytes);
    archive.load_from(in);
  });
  Outcome loaded;
  if (!parsed.threw) loaded = outcome_of([&] { target->load(archive); });
  if (parsed.threw || loaded.threw) {
    ++(parsed.threw ? tally.rejected_by_torch : tally.rejected);
    if (loaded.threw) {
      ASSERT_TRUE(loaded.c10) << "load threw something other than a c10::Error: " << loaded.message;
      EXPECT_NE(loaded.message.find(p.subject.who), std::string::npos)
          << "the error does not name the optimizer: " << loaded.message;
    }
    // Exactly as before: parameters untouched, and the next steps those of the untouched twin.
    ASSERT_TRUE(all_equal(params, p.target_before)) << "the failed load changed the parameters";
    const Outcome stepped = outcome_of([&] {
      take_step(p.subject, *target, params);
      EXPECT_TRUE(all_equal(params, p.target_after_1)) << "after a failed load, step 1 differs from the twin's ("
                                                       << loaded.message << ")";
      take_step(p.subject, *target, params);
      EXPECT_TRUE(all_equal(params, p.target_after_2)) << "after a failed load, step 2 differs from the twin's";
    });
    EXPECT_FALSE(stepped.threw) << "after a failed load the optimizer cannot step: " << stepped.message;
    return;
  }
  // Loaded: loading itself never moves parameters; the next steps work and stay finite
  // (unless the state is extreme, see the top of the file).
  ASSERT_TRUE(all_equal(params, p.target_before)) << "load changed the parameters";
  // torch's archive reader is not consistent on corrupt TorchScript code: a flipped byte in
  // a code record can pass one load_from and fail the next in the same process (its parse
  // depends on what the process imported before). Then the loaded values are unknown to
  // the test, and only the weak property of extreme states is checked.
  std::shared_ptr<Node> loaded_tree;
  const Outcome reread = outcome_of([&] { loaded_tree = read_tree(bytes); });
  if (reread.threw) {
    ++tally.loaded_unreadable;
    const Outcome stepped = outcome_of([&] {
      take_step(p.subject, *target, params);
      take_step(p.subject, *target, params);
    });
    EXPECT_TRUE(!stepped.threw || stepped.c10) << "not a c10::Error: " << stepped.message;
    return;
  }
  const bool is_extreme = extreme(*loaded_tree, p.magnitudes);
  ++(is_extreme ? tally.loaded_extreme : tally.loaded);
  const Outcome stepped = outcome_of([&] {
    take_step(p.subject, *target, params);
    take_step(p.subject, *target, params);
  });
  if (is_extreme) {
    EXPECT_TRUE(!stepped.threw || stepped.c10) << "not a c10::Error: " << stepped.message;
    if (stepped.threw || !all_finite(params)) ++tally.extreme_not_finite;
    return;
  }
  ASSERT_FALSE(stepped.threw) << "the checkpoint was accepted but the next step fails: " << stepped.message
                              << "\nchanged entries:" << differences(*p.tree, *loaded_tree);
  EXPECT_TRUE(all_finite(params)) << "the checkpoint was accepted but the next steps give NaN/Inf parameters"
                                  << "\nchanged entries:" << differences(*p.tree, *loaded_tree);
}

TEST(CheckpointFuzz, EveryCorruptionIsAClearErrorOrLoadsAndStepsFinitely) {
  prepared();  // outside the timed cases
  tally = Tally{};
  const int64_t ran = testing::run_fuzz("checkpoint fuzz", 0xc4ec4901, 2000, checkpoint_case);
  EXPECT_GE(ran, 1);
  std::cout << "checkpoint fuzz outcomes: " << tally.rejected << " rejected by lowbit, " << tally.rejected_by_torch
            << " rejected by torch's archive reader, " << tally.loaded << " loaded and stepped finitely, "
            << tally.loaded_extreme << " loaded with extreme values (" << tally.extreme_not_finite
            << " of them overflowed in the next steps), " << tally.loaded_unreadable
            << " loaded that torch could not read a second time, " << tally.unwritable
            << " edited trees torch could not write" << std::endl;
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"rejected", tally.rejected},
                                    {"rejected_by_torch", tally.rejected_by_torch}, {"loaded", tally.loaded},
                                    {"loaded_extreme", tally.loaded_extreme}})
    RecordProperty(name, std::to_string(value));
}

}  // namespace
}  // namespace lowbit
