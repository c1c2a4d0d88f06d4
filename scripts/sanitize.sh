#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the tests that feed lowbit untrusted
# or extreme input: the codec (values, options, from_state), checkpoint loading of every
# optimizer, the Shampoo robustness tests and the seeded fuzz tests. Builds only those
# test programs (and the library) in their own build directory, -O1 -g1, through ccache.
# Any sanitizer finding aborts the program that hit it, and any failure fails the script.
#
#   bash scripts/sanitize.sh                  # build-asan next to build/
#   LOWBIT_ASAN_BUILD=/tmp/asan bash scripts/sanitize.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ASAN_BUILD="${LOWBIT_ASAN_BUILD:-$LOWBIT_ROOT/build-asan}"
start=$SECONDS

# program : gtest filter (the tests in that program that belong to this run)
# (shampoo_test leaves out its convergence run and dense-reference comparisons: minutes of
# arithmetic under ASan that feed no untrusted input.)
RUNS=(
  "codec_test:*"
  "fuzz_test:*"
  "shampoo_test:ShampooRobustness.*:ShampooCheckpoint.*:EveryKind/Checkpoint.*:ShampooStep.*"
  "shampoo_variants_test:CholeskyShampoo.Checkpoint*:GraftBits.AllLowBit*:SoapAndGraftBits.*"
  "caspr_test:Caspr.Resumed*:Caspr.CheckpointOfTheOtherPreconditionerIsRefused:Caspr.ValidationNamesTheOption"
  "second_order_test:*"
  "lowbit_adamw_test:*"
)
targets=()
for run in "${RUNS[@]}"; do targets+=("${run%%:*}"); done

if [ ! -f "$ASAN_BUILD/build.ninja" ]; then
  launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  # -O1 keeps the sanitizers' reports exact and the build cheap; -g1 gives file:line in
  # stack traces without full debug information. NDEBUG as in the Release LibTorch.
  cmake -S "$LOWBIT_ROOT" -B "$ASAN_BUILD" -G Ninja -DLOWBIT_SANITIZE=ON -DLOWBIT_BUILD_BENCHMARKS=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" "${launcher[@]}"
fi
cmake --build "$ASAN_BUILD" -j "$(nproc)" --target "${targets[@]}"
build_seconds=$((SECONDS - start))

# halt_on_error / -fno-sanitize-recover: the first finding ends the program with a non-zero
# status. detect_leaks: LeakSanitizer over the whole program, with lsan.supp naming the only
# reports allowed (see that file for why each is LibTorch's own and not lowbit's).
# LOWBIT_ASAN_OPTIONS adds options, e.g. fast_unwind_on_malloc=0 for full allocation stacks
# through LibTorch's frames (which have no frame pointers).
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=23:detect_leaks=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1:detect_odr_violation=2:print_summary=1${LOWBIT_ASAN_OPTIONS:+:$LOWBIT_ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=24:print_summary=1"
export LSAN_OPTIONS="suppressions=$LOWBIT_ROOT/scripts/lsan.supp:print_suppressions=0"
# Two threads per process keep the parallel kernels' code paths while sharing the machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

logs="$ASAN_BUILD/sanitize-logs"
mkdir -p "$logs"
summary=()
failed=0
for run in "${RUNS[@]}"; do
  program="${run%%:*}"
  filter="${run#*:}"
  t0=$SECONDS
  status=0
  "$ASAN_BUILD/tests/$program" --gtest_color=no --gtest_filter="$filter" >"$logs/$program.log" 2>&1 || status=$?
  seconds=$((SECONDS - t0))
  tests=$(grep -c '^\[       OK \]' "$logs/$program.log" || true)
  if [ "$status" -eq 0 ] && grep -q '^\[  PASSED  \]' "$logs/$program.log"; then
    summary+=("PASS  $program  ($tests tests, ${seconds}s)")
    while IFS= read -r line; do summary+=("        $line"); done < <(grep -E '^(codec|checkpoint) fuzz' "$logs/$program.log" || true)
  else
    failed=1
    reason="exit status $status"
    grep -q 'ERROR: AddressSanitizer' "$logs/$program.log" && reason="AddressSanitizer finding"
    grep -q 'ERROR: LeakSanitizer' "$logs/$program.log" && reason="LeakSanitizer finding"
    grep -q 'runtime error:' "$logs/$program.log" && reason="UndefinedBehaviorSanitizer finding"
    grep -q '^\[  FAILED  \]' "$logs/$program.log" && [ "$reason" = "exit status $status" ] && reason="test failures"
    summary+=("FAIL  $program  ($reason, ${seconds}s; log $logs/$program.log)")
    echo "---- $program: last lines of its log ----"
    tail -n 60 "$logs/$program.log"
  fi
done

echo
echo "sanitize (ASan + UBSan, $ASAN_BUILD): build ${build_seconds}s, total $((SECONDS - start))s"
for line in "${summary[@]}"; do echo "  $line"; done
if [ "$failed" -ne 0 ]; then
  echo "sanitize: FAILED"
  exit 1
fi
echo "sanitize: all clean"
