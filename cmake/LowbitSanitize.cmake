# LOWBIT_SANITIZE=ON: AddressSanitizer + UndefinedBehaviorSanitizer for every C++ target of
# the project (library, precompiled headers, tests, programs), compiled and linked, so that
# a precompiled header and the sources that use it always agree on the flags.
# scripts/sanitize.sh configures such a build in build-asan and runs the tests that matter
# under it. LibTorch itself is not instrumented: the executables link the ASan runtime
# first, which intercepts torch's allocations too, so heap errors on torch-allocated
# tensor storage are still caught in lowbit's code.
option(LOWBIT_SANITIZE "Build with -fsanitize=address,undefined (see scripts/sanitize.sh)" OFF)

if(LOWBIT_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "LOWBIT_SANITIZE needs GCC or Clang; the compiler is ${CMAKE_CXX_COMPILER_ID}")
  endif()
  # -fno-sanitize-recover: an undefined-behaviour finding aborts the test (with its stack
  # trace) instead of printing a line that a passing test would hide.
  set(LOWBIT_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:${LOWBIT_SANITIZE_FLAGS}>")
  add_link_options(-fsanitize=address,undefined)
  message(STATUS "lowbit: AddressSanitizer + UndefinedBehaviorSanitizer build")
endif()
