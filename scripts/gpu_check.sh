#!/usr/bin/env bash
# The checks of lowbit's CUDA path that a GPU session runs in one device call: configure
# build-cuda against the machine's CUDA torch (TORCH_CUDA_ARCH_LIST 9.0: H100/H200), build,
# run ctest (the CUDA-vs-CPU codec test first) and pytest as scripts/test.sh does, then
# `lowbit bench codec --device cuda` and bench/gpu_compare.py. Logs go to $OUT (what the device tool brings back; it
# takes at most 8 files), else ./gpu-logs. See docs/cuda.md.
#
#   here, once:  scripts/gpu_deps.sh        (GoogleTest, CLI11, nlohmann_json, zlib -> .gpu-deps/)
#                scripts/stage_peers.sh     (optional: the authors' code and Meta DS -> .peers/)
#   there:       scripts/gpu_check.sh       with ".gpu-deps" (and ".peers") in the call's carry
#   one step:    scripts/gpu_check.sh build|test|bench   (the build dir stays on a warm machine)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="${OUT:-$ROOT/gpu-logs}"
BUILD="${LOWBIT_CUDA_BUILD:-$ROOT/build-cuda}"
DEPS="$ROOT/.gpu-deps"
WHAT="${1:-all}"
mkdir -p "$LOGS"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
failed=()

# step NAME LOG COMMAND...: runs COMMAND with its output appended to LOG; a failure is
# reported with the log's tail and remembered, and the next steps still run.
step() {
  local name=$1 log=$2
  shift 2
  echo "== $name ($(date +%T)): $*" | tee -a "$LOGS/summary.log"
  echo "== $name: $*" >>"$log"
  if "$@" >>"$log" 2>&1; then
    echo "   ok ($(date +%T))" | tee -a "$LOGS/summary.log"
  else
    echo "   FAILED (exit $?), last lines of $(basename "$log"):" | tee -a "$LOGS/summary.log"
    tail -n 40 "$log" | tee -a "$LOGS/summary.log"
    failed+=("$name")
  fi
}

environment() {
  nvidia-smi
  nvcc --version
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
                "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  cmake --version | head -1
  c++ --version | head -1
  command -v ninja && ninja --version
}

configure() {
  # The python3 on PATH holds the CUDA torch; CMake's own Python search might find another.
  local args=(-S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90
              -DLOWBIT_BUILD_BENCHMARKS=OFF -DPython3_EXECUTABLE="$(command -v python3)")
  command -v ninja >/dev/null && args+=(-G Ninja)
  if [ -d "$DEPS/usr" ]; then  # staged by scripts/gpu_deps.sh
    args+=(-DCMAKE_PREFIX_PATH="$DEPS/usr")
    if [ ! -f /usr/include/zlib.h ]; then
      args+=(-DZLIB_INCLUDE_DIR="$DEPS/usr/include" -DZLIB_LIBRARY="$DEPS/lib/x86_64-linux-gnu/libz.so.1")
    fi
  fi
  cmake "${args[@]}"
}

# The CUDA build must really have the CUDA kernels (not only the compile check).
has_cuda_kernels() {
  grep -q "LibTorch has CUDA; building the CUDA codec kernels" "$LOGS/build.log"
}

# The authors' quantization library (their cudaC_python), built for this GPU and installed
# under the name their qtensor/cextension.py looks for (libqtensor_cuda<torch's CUDA>.so).
build_authors_library() {
  local src="$ROOT/.peers/low-bit-Shampoo" version
  version="$(python3 -c 'import torch; print("".join(torch.version.cuda.split(".")[:2]))')"
  cmake -S "$src/cudaC_python" -B "$src/cudaC_python/build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES=90 &&
    cmake --build "$src/cudaC_python/build" -j "$(nproc)" &&
    cp "$(ls "$src"/cudaC_python/build/qtensor/libqtensor_cuda*.so | head -1)" "$src/qtensor/libqtensor_cuda$version.so"
}

python_tests() {
  LOWBIT_LIBRARY="$BUILD/liblowbit.so" PYTHONPATH="$ROOT/python" \
    python3 -m pytest -q -p no:cacheprovider "$ROOT/python/tests"
}

cd "$ROOT" || exit 1
echo "gpu_check $WHAT: logs in $LOGS, build in $BUILD ($(date))" | tee -a "$LOGS/summary.log"
step environment "$LOGS/env.log" environment
if [ "$WHAT" = all ] || [ "$WHAT" = build ]; then
  step configure "$LOGS/build.log" configure
  step cuda-enabled "$LOGS/build.log" has_cuda_kernels
  step build "$LOGS/build.log" cmake --build "$BUILD" -j "$(nproc)"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = test ]; then
  step cuda-codec-test "$LOGS/ctest.log" ctest --test-dir "$BUILD" -R '^cuda_codec_test$' --output-on-failure
  step ctest "$LOGS/ctest.log" ctest --test-dir "$BUILD" -E '^cuda_codec_test$' --output-on-failure --timeout 900
  step pytest "$LOGS/pytest.log" python_tests
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  step bench-codec "$LOGS/bench_codec.log" "$BUILD/lowbit" bench codec --device cuda \
    --orders 1024 4096 8192 --repeats 20 --json "$LOGS/bench_codec.json"
  # Issue 18: step time and peak memory of lowbit fp32 / 4-bit against torch AdamW, on the shape
  # sets and end to end (ViT-S/16, ResNet-18: skipped if timm / torchvision are missing), and
  # against the peers when LOWBIT_AUTHORS (a built checkout of Sike-Wang/low-bit-Shampoo) and
  # LOWBIT_META_DS (a checkout of facebookresearch/optimizers, or "installed") are set.
  # scripts/stage_peers.sh stages both in .peers/ (carry it): then they are timed by default.
  if [ -z "${LOWBIT_AUTHORS:-}" ] && [ -d "$ROOT/.peers/low-bit-Shampoo" ]; then
    step authors-library "$LOGS/gpu_compare.log" build_authors_library
    ls "$ROOT"/.peers/low-bit-Shampoo/qtensor/libqtensor_cuda*.so >/dev/null 2>&1 &&
      LOWBIT_AUTHORS="$ROOT/.peers/low-bit-Shampoo"
  fi
  if [ -z "${LOWBIT_META_DS:-}" ] && [ -d "$ROOT/.peers/optimizers" ] &&
     python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    LOWBIT_META_DS="$ROOT/.peers/optimizers"
  fi
  peers=()
  [ -n "${LOWBIT_AUTHORS:-}" ] && peers+=(--authors "$LOWBIT_AUTHORS")
  [ -n "${LOWBIT_META_DS:-}" ] && peers+=(--meta-ds "$LOWBIT_META_DS")
  step gpu-compare "$LOGS/gpu_compare.log" env LOWBIT_LIBRARY="$BUILD/liblowbit.so" PYTHONPATH="$ROOT/python" \
    python3 "$ROOT/bench/gpu_compare.py" --device cuda "${peers[@]}" --json "$LOGS/gpu_compare.json"
  # Issue 18: whether padding different orders to batch their eigh / QR pays on the GPU.
  step padding "$LOGS/gpu_compare.log" python3 "$ROOT/bench/padding.py" --device cuda --repeats 5
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" | tee -a "$LOGS/summary.log"
  exit 1
fi
echo "gpu_check: all passed" | tee -a "$LOGS/summary.log"
