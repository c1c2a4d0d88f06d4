#!/usr/bin/env bash
# Runs the whole test suite (building first, incrementally): GoogleTest through ctest,
# then the Python package's pytest suite against the library just built, then a
# portability run: the numerics-heavy tests again on MKL's SSE4.2 code path with one
# thread (one cell of scripts/test_matrix.sh), so that a tolerance fitted to this CPU's
# kernels (AVX-512 / AVX2) fails here rather than on another machine; last, the
# AddressSanitizer + UndefinedBehaviorSanitizer run of the tests that take untrusted or
# extreme input (scripts/sanitize.sh, its own build directory).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lowbit_configure_and_build
cd "$LOWBIT_BUILD"
ctest --output-on-failure

# Python package (python/lowbit) against the freshly built library; no install needed.
LOWBIT_LIBRARY="$LOWBIT_BUILD/liblowbit.so" PYTHONPATH="$LOWBIT_ROOT/python" python3 -m pytest -q -p no:cacheprovider "$LOWBIT_ROOT/python/tests"

# Portability run (the full matrix: bash scripts/test_matrix.sh).
source "$LOWBIT_ROOT/scripts/test_matrix.sh"
lowbit_matrix_cell SSE4_2 1

# ASan + UBSan: the codec, checkpoint loading, robustness and fuzz tests (build-asan/).
bash "$LOWBIT_ROOT/scripts/sanitize.sh"
