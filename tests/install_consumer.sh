#!/usr/bin/env bash
# Installs the built lowbit into a scratch prefix and builds + runs a separate LibTorch
# project against it with find_package(lowbit): proves the install and package config.
set -euo pipefail
build_dir="$1"; source_dir="$2"
prefix="$(mktemp -d)"
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build_dir" --prefix "$prefix" >/dev/null
test -f "$prefix/include/lowbit/lowbit.h"
test -f "$prefix/lib/cmake/lowbit/lowbitConfig.cmake"
torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
launcher=(); command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$source_dir/examples/consumer" -B "$prefix/consumer-build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" "${launcher[@]}" >/dev/null
cmake --build "$prefix/consumer-build" >/dev/null || cmake --build "$prefix/consumer-build"
"$prefix/consumer-build/consumer"
