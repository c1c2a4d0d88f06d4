#!/usr/bin/env bash
# Stages the C++ build dependencies that the GPU machine lacks and cannot fetch (it reaches no
# package registry): GoogleTest, CLI11, nlohmann_json and zlib's headers, unpacked from their
# Debian packages into .gpu-deps/ (git-ignored). Run it here, on a Debian/Ubuntu machine with
# apt, before a device call that names ".gpu-deps" in its carry; scripts/gpu_check.sh finds
# them there. About 7 MB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.gpu-deps"
PACKAGES=(libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev zlib1g-dev zlib1g)

downloads="$(mktemp -d)"
trap 'rm -rf "$downloads"' EXIT
chmod 755 "$downloads"  # apt's unprivileged downloader writes here
(cd "$downloads" && apt-get download "${PACKAGES[@]}")
rm -rf "$DEPS"
mkdir -p "$DEPS"
for deb in "$downloads"/*.deb; do dpkg -x "$deb" "$DEPS"; done
rm -rf "$DEPS/usr/share/doc" "$DEPS/usr/share/lintian"
echo "gpu_deps: staged ${PACKAGES[*]} in $DEPS ($(du -sh "$DEPS" | cut -f1))"
