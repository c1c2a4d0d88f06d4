#!/usr/bin/env bash
# Installs everything lowbit needs on a fresh Debian machine, then builds it.
# Safe to run again: installed packages are skipped and the build is incremental.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

APT_PACKAGES=(cmake ninja-build ccache g++ zlib1g-dev libgtest-dev libgmock-dev libbenchmark-dev
              libcli11-dev libgloo-dev nlohmann-json3-dev dataset-fashion-mnist)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# LibTorch comes from PyTorch's CPU wheel (a GPU machine keeps the torch it has).
if ! python3 -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)"
  python3 -m pip install -q torch==2.13.0
fi
# The test suite (numpy, pytest, hypothesis for the property-based tests), the plots, and
# scikit-build-core: the build backend of `python3 -m pip install --no-build-isolation .`
# (README), which must come from this Python since build isolation is off.
python3 -c 'import numpy, pytest, matplotlib, hypothesis' 2>/dev/null ||
  python3 -m pip install -q numpy pytest matplotlib hypothesis
python3 -c 'import scikit_build_core' 2>/dev/null || python3 -m pip install -q "scikit-build-core>=0.10"

lowbit_configure_and_build
echo "setup: built $LOWBIT_BUILD (LibTorch $(python3 -c 'import torch;print(torch.__version__)'))"
