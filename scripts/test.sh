#!/usr/bin/env bash
# Runs the whole test suite (building first, incrementally): GoogleTest through ctest,
# then the Python package's pytest suite against the library just built.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lowbit_configure_and_build
cd "$LOWBIT_BUILD"
ctest --output-on-failure

# Python package (python/lowbit) against the freshly built library; no install needed.
LOWBIT_LIBRARY="$LOWBIT_BUILD/liblowbit.so" PYTHONPATH="$LOWBIT_ROOT/python" python3 -m pytest -q -p no:cacheprovider "$LOWBIT_ROOT/python/tests"
