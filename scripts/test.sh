#!/usr/bin/env bash
# Runs the whole test suite (building first, incrementally): GoogleTest through ctest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lowbit_configure_and_build
cd "$LOWBIT_BUILD"
ctest --output-on-failure
