// An optimizer checkpoint (LibTorch's archive layout: nested archives of tensors and plain
// values) as a tree that tests can read, edit and write back, to make corrupt checkpoints.
#pragma once

#include <torch/serialize/archive.h>

#include <c10/util/Exception.h>

#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

namespace lowbit::testing {

struct Node;
using Entry = std::variant<c10::IValue, std::shared_ptr<Node>>;
struct Node {
  std::map<std::string, Entry> entries;
};

inline std::shared_ptr<Node> read_tree(torch::serialize::InputArchive& archive) {
  auto node = std::make_shared<Node>();
  for (const std::string& key : archive.keys()) {
    c10::IValue value;
    archive.read(key, value);
    if (value.isModule()) {
      torch::serialize::InputArchive child;
      archive.read(key, child);
      node->entries[key] = read_tree(child);
    } else {
      node->entries[key] = value;
    }
  }
  return node;
}

inline std::shared_ptr<Node> read_tree(const std::string& bytes) {
  torch::serialize::InputArchive archive;
  std::istringstream in(bytes);
  archive.load_from(in);
  return read_tree(archive);
}

inline void write_tree(const Node& node, torch::serialize::OutputArchive& archive) {
  for (const auto& [key, entry] : node.entries) {
    if (const auto* child = std::get_if<std::shared_ptr<Node>>(&entry)) {
      torch::serialize::OutputArchive sub(archive.compilation_unit());
      write_tree(**child, sub);
      archive.write(key, sub);
    } else {
      const c10::IValue& v = std::get<c10::IValue>(entry);
      if (v.isTensor()) archive.write(key, v.toTensor());
      else archive.write(key, v);
    }
  }
}

inline std::string tree_bytes(const Node& node) {
  torch::serialize::OutputArchive archive;
  write_tree(node, archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

// A copy whose nodes can be edited without touching the original (IValues are replaced by
// the editors, never changed in place).
inline std::shared_ptr<Node> deep_copy(const Node& node) {
  auto out = std::make_shared<Node>();
  for (const auto& [key, entry] : node.entries) {
    if (const auto* child = std::get_if<std::shared_ptr<Node>>(&entry)) out->entries[key] = deep_copy(**child);
    else out->entries[key] = entry;
  }
  return out;
}

// Every entry of the tree with the node holding it, depth first; paths join keys with '.'.
struct Slot {
  Node* parent;
  std::string key;
  std::string path;
};
inline void collect(Node& node, const std::string& prefix, std::vector<Slot>& out) {
  for (auto& [key, entry] : node.entries) {
    out.push_back({&node, key, prefix + key});
    if (auto* child = std::get_if<std::shared_ptr<Node>>(&entry)) collect(**child, prefix + key + ".", out);
  }
}
inline std::vector<Slot> slots(Node& root) {
  std::vector<Slot> out;
  collect(root, "", out);
  return out;
}

// The entries whose path ends with `suffix` (e.g. "exp_avg_sq", "options.lr").
inline std::vector<Slot> find_all(Node& root, const std::string& suffix) {
  std::vector<Slot> out;
  for (const Slot& s : slots(root))
    if (s.path.size() >= suffix.size() && s.path.compare(s.path.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(s);
  return out;
}

inline Entry& entry_at(const Slot& s) { return s.parent->entries.at(s.key); }

}  // namespace lowbit::testing
