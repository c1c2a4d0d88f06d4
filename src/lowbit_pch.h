// Precompiled header: the Torch headers lowbit translation units need.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
