#!/usr/bin/env bash
# Portability matrix: the numerics-heavy C++ tests (ctest entries) and pytest files under
# every MKL code path this CPU can run (AVX-512 only where /proc/cpuinfo has avx512f, AVX2,
# SSE4.2) x {1, 2} threads. MKL picks its kernels by CPU, so a tolerance fitted on one
# machine shows up here as a failing cell. One summary line per cell; exits non-zero if any
# cell fails. Logs of every cell go to $LOWBIT_MATRIX_LOGS (default build/test_matrix).
#
#   bash scripts/test_matrix.sh                 # the whole matrix (builds first)
#   LOWBIT_MATRIX_ISAS="AVX2" LOWBIT_MATRIX_THREADS="1" bash scripts/test_matrix.sh
#
# Sourced (scripts/test.sh does), it only defines lowbit_matrix_cell ISA THREADS, which runs
# one cell and prints its summary line.
#
# Threads: OMP_NUM_THREADS sets ATen's intra-op pool (at::get_num_threads follows it) and
# MKL_NUM_THREADS MKL's. python/tests/conftest.py pins torch.set_num_threads(2) for every
# Python test, so the pytest half of a 1-thread cell still runs its torch ops on 2 threads
# (only the MKL code path changes there). OMP_WAIT_POLICY defaults to PASSIVE: on a shared
# machine spinning OpenMP workers made a 2-thread cell 10x slower; it changes scheduling,
# not results.

LOWBIT_MATRIX_CTESTS=(codec_test linalg_test quant_error_test shampoo_test precond_test engine_test caspr_test
                      shampoo_variants_test second_order_test lowbit_adamw_test arith_test kfac_test hawq_test)
LOWBIT_MATRIX_PYTESTS=(test_reference.py test_optim.py test_shampoo_variants.py test_caspr.py
                       test_second_order.py test_adamw.py test_codec.py test_arith.py test_fqt.py test_kfac.py
                       test_hawq.py)

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# The ISAs to run: AVX512 only where the CPU has it (MKL silently falls back otherwise,
# which would run the AVX2 cell twice under another name).
lowbit_matrix_isas() {
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then echo "AVX512 AVX2 SSE4_2"; else echo "AVX2 SSE4_2"; fi
}

# lowbit_matrix_cell ISA THREADS: runs the C++ entries and the pytest files with
# MKL_ENABLE_INSTRUCTIONS=ISA and THREADS threads; prints one line; returns non-zero on failure.
lowbit_matrix_cell() {
  local isa="$1" threads="$2"
  local logs="${LOWBIT_MATRIX_LOGS:-$LOWBIT_BUILD/test_matrix}"
  local log_prefix="$logs/${isa}_t${threads}"
  mkdir -p "$logs"
  local regex
  regex="^($(IFS='|'; echo "${LOWBIT_MATRIX_CTESTS[*]}"))\$"
  local pyfiles=()
  for f in "${LOWBIT_MATRIX_PYTESTS[@]}"; do pyfiles+=("$LOWBIT_ROOT/python/tests/$f"); done

  local start=$SECONDS cpp_rc=0 py_rc=0
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  (cd "$LOWBIT_BUILD" && MKL_ENABLE_INSTRUCTIONS="$isa" OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" \
     ctest --output-on-failure -R "$regex") >"$log_prefix.ctest.log" 2>&1 || cpp_rc=$?
  MKL_ENABLE_INSTRUCTIONS="$isa" OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" \
    LOWBIT_LIBRARY="$LOWBIT_BUILD/liblowbit.so" PYTHONPATH="$LOWBIT_ROOT/python" \
    python3 -m pytest -q -p no:cacheprovider "${pyfiles[@]}" >"$log_prefix.pytest.log" 2>&1 || py_rc=$?

  local cpp_summary py_summary
  cpp_summary=$(grep -E "tests passed|tests failed" "$log_prefix.ctest.log" | tail -1 || true)
  py_summary=$(grep -E "(passed|failed|error)" "$log_prefix.pytest.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//' || true)
  local verdict=PASS
  if [ "$cpp_rc" -ne 0 ] || [ "$py_rc" -ne 0 ]; then verdict=FAIL; fi
  printf 'cell MKL_ENABLE_INSTRUCTIONS=%-7s threads=%s: %s | C++: %s | pytest: %s | %ds\n' \
    "$isa" "$threads" "$verdict" "${cpp_summary:-no summary (rc $cpp_rc)}" "${py_summary:-no summary (rc $py_rc)}" \
    $((SECONDS - start))
  if [ "$verdict" = FAIL ]; then
    if [ "$cpp_rc" -ne 0 ]; then
      grep -E "Failed|FAILED|Failure|\*\*\*" "$log_prefix.ctest.log" | head -20 | sed 's/^/    /' || true
    fi
    if [ "$py_rc" -ne 0 ]; then
      grep -E "^(FAILED|ERROR)|Error" "$log_prefix.pytest.log" | head -20 | sed 's/^/    /' || true
    fi
    echo "    logs: $log_prefix.ctest.log $log_prefix.pytest.log"
    return 1
  fi
  return 0
}

lowbit_matrix_main() {
  set -uo pipefail
  cmake --build "$LOWBIT_BUILD" -j "$(nproc)" --target lowbit "${LOWBIT_MATRIX_CTESTS[@]}" || return 1
  local isas="${LOWBIT_MATRIX_ISAS:-$(lowbit_matrix_isas)}" threads_list="${LOWBIT_MATRIX_THREADS:-1 2}"
  local failed=0 cells=0
  for isa in $isas; do
    for threads in $threads_list; do
      cells=$((cells + 1))
      lowbit_matrix_cell "$isa" "$threads" || failed=$((failed + 1))
    done
  done
  echo "test matrix: $((cells - failed)) of $cells cells passed"
  [ "$failed" -eq 0 ]
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  lowbit_matrix_main
fi
