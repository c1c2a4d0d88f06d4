// The preconditioned step directions of many parameters at once. Blocks of one shape,
// combine rule and device, from every parameter, are stacked; their inverse roots are
// decoded into the workspace with one codec call per side; the products, norms and
// grafting scales are batched calls. No host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

#include "linalg/workspace.h"
#include "precond/parameter_preconditioner.h"

namespace lowbit::precond {

struct PreconditionItem {
  const ParameterPreconditioner* preconditioner = nullptr;
  at::Tensor grad;       // the parameter's gradient
  at::Tensor direction;  // out: fp32, contiguous, [rows, cols] of the preconditioner's partition
};

// Writes L^(-1/4) G R^(-1/4) (or CASPR's L~ J + J R~) of every block into the item's
// direction, each block rescaled to the Frobenius norm of its gradient block ("grafting by
// norm"). Blocks are taken in chunks whose stacked temporaries stay under workspace_bytes
// (0: no limit; at least one block per chunk).
void precondition_all(c10::ArrayRef<PreconditionItem> items, linalg::Workspace& workspace, int64_t workspace_bytes);

}  // namespace lowbit::precond
