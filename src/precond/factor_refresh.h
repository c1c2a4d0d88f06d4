// The refresh work of one step on many Kronecker factors, batched: factors of one kind,
// order, device and configuration are updated together, with one batched call per
// operation (matrix products, orthonormalization, decomposition, codec) instead of one per
// factor. Each factor kind keeps its maths (factor_kinds.h); this file owns the grouping.
//
// No host synchronisation is needed: a failed refresh keeps the factor's last good state
// through a choice made on the device, and is counted there (KroneckerFactor::failures).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

#include "linalg/workspace.h"
#include "precond/kronecker_factor.h"

namespace lowbit::precond {

// One factor's work in a step.
struct RefreshItem {
  KroneckerFactor* factor = nullptr;
  at::Tensor side;    // defined: update the statistic with side side^T (n x k, fp32)
  bool root = false;  // then recompute the inverse root
};

struct RefreshContext {
  linalg::Workspace* workspace = nullptr;
  // A group's factors are refreshed in chunks whose temporaries stay under this many bytes
  // (at least one factor per chunk); 0: no limit.
  int64_t workspace_bytes = 0;
};

// Runs every item, group by group. Items of one factor must not repeat.
void refresh(c10::ArrayRef<RefreshItem> items, RefreshContext& context);
// The same with a workspace of their own, without a budget (one-off refreshes: one factor's
// or one parameter's, for tests and tools).
void refresh_alone(c10::ArrayRef<RefreshItem> items);

// What a kind's batched refresh needs, for chunking: n x n fp32 temporaries per factor.
int64_t temporaries_per_factor(FactorKind kind);

// Helpers the kinds share.
// A bool [B] on the device for candidates [B, n, m]: every value of each candidate finite
// (linalg::finite_matrices; its negation: the failures).
at::Tensor keep_mask(const at::Tensor& candidates);
// side side^T of every item into out [B, n, n], one batched product per side width k; with
// `gram` (FactorConfig::gram_statistics) the sides are the n x n products and are copied.
void outer_products(c10::ArrayRef<at::Tensor> sides, const at::Tensor& out, bool gram);


}  // namespace lowbit::precond
