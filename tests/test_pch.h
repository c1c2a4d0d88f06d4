// Precompiled header of the test executables.
#pragma once
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <ATen/Parallel.h>
#include <torch/optim.h>
