// Precompiled header: the Torch headers every lowbit translation unit needs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <ATen/ops/empty.h>
