#!/usr/bin/env bash
# Stages issue 18's peers for a GPU session, from local git mirrors (`fetch` in this
# workplace, or any clone), into .peers/ (ignored: never committed):
#   .peers/low-bit-Shampoo   Sike-Wang/low-bit-Shampoo, with cub::Max() in csrc/kernels.cu
#                            replaced by a max functor (CUB in CUDA 13 no longer has it)
#   .peers/optimizers        facebookresearch/optimizers (its distributed_shampoo package)
# Then carry ".peers" (and ".gpu-deps") in the device call: scripts/gpu_check.sh builds the
# authors' CUDA library there and times both in bench/gpu_compare.py.
#
#   scripts/stage_peers.sh [AUTHORS_GIT_DIR] [META_GIT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AUTHORS_GIT="${1:-/work/.mirror/Sike-Wang+low-bit-Shampoo/repo}"
META_GIT="${2:-/work/.mirror/facebookresearch+optimizers/repo}"
DEST="$ROOT/.peers"

stage() {  # stage GIT_DIR NAME [PATHS...]: the snapshot's HEAD, without its history
  local git_dir=$1 name=$2
  shift 2
  [ -d "$git_dir" ] || { echo "stage_peers: $git_dir is not a git directory" >&2; exit 1; }
  rm -rf "${DEST:?}/$name"
  mkdir -p "$DEST/$name"
  git --git-dir="$git_dir" archive HEAD "$@" | tar -x -C "$DEST/$name"
  echo "staged $name at $(git --git-dir="$git_dir" rev-parse --short HEAD) in $DEST/$name"
}

stage "$AUTHORS_GIT" low-bit-Shampoo cudaC_python optimizers qtensor
kernels="$DEST/low-bit-Shampoo/cudaC_python/csrc/kernels.cu"
# A functor with cub::Max()'s meaning, defined once after the includes.
sed -i 's/cub::Max()/StagedMax()/g' "$kernels"
sed -i '0,/^#include <cub\/block\/block_reduce.cuh>/s//#include <cub\/block\/block_reduce.cuh>\nstruct StagedMax { template <typename T> __device__ __forceinline__ T operator()(const T\& a, const T\& b) const { return a < b ? b : a; } };/' "$kernels"
grep -q "struct StagedMax" "$kernels" || { echo "stage_peers: could not patch $kernels" >&2; exit 1; }
rm -f "$DEST"/low-bit-Shampoo/qtensor/libqtensor_*  # prebuilt for CUDA 11.7 / Windows: rebuilt on the GPU

stage "$META_GIT" optimizers distributed_shampoo
du -sh "$DEST"
