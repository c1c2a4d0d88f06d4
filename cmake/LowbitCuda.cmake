# CUDA for lowbit, included right after LowbitTorch.
#
# - LibTorch built with CUDA: its config has already enabled the CUDA language and put its
#   architecture flags (TORCH_CUDA_ARCH_LIST) into CMAKE_CUDA_FLAGS. The codec kernels
#   (src/cuda) join the lowbit library, LOWBIT_WITH_CUDA is defined, and the CUDA-vs-CPU
#   test cuda_codec_test is registered.
# - LibTorch without CUDA but nvcc present: the kernels, which include no torch header, are
#   still compiled (object library lowbit_cuda_compile_check, part of `all`) so that a
#   machine without a GPU, CI included, keeps them compiling.
# - Neither: a status message, nothing else.
option(LOWBIT_CUDA_COMPILE_CHECK "Compile the CUDA kernels with nvcc when LibTorch has no CUDA" ON)

# TorchConfig sets TORCH_CUDA_LIBRARIES, and Caffe2Config CAFFE2_USE_CUDA, only in CUDA builds.
if(CAFFE2_USE_CUDA OR TORCH_CUDA_LIBRARIES)
  set(LOWBIT_WITH_CUDA ON)
else()
  set(LOWBIT_WITH_CUDA OFF)
endif()

set(LOWBIT_CUDA_KERNEL_SOURCES ${CMAKE_CURRENT_LIST_DIR}/../src/cuda/codec_kernels.cu)

# An object library of the torch-free kernel sources, position independent so that its
# objects can go into the shared lowbit library. It is separate from lowbit because lowbit's
# C++ options (-Wall, its precompiled header) are not nvcc options.
function(lowbit_add_cuda_kernels target)
  add_library(${target} OBJECT ${LOWBIT_CUDA_KERNEL_SOURCES})
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/include)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON CUDA_STANDARD 17
                                             CUDA_STANDARD_REQUIRED ON)
  # Bit-identical results with the CPU need every fp32 product and sum rounded on its own;
  # the kernels use __fmul_rn & co. for that, and no FMA contraction is the second guard.
  target_compile_options(${target} PRIVATE --fmad=false -Xcompiler=-Wall,-Wextra)
endfunction()

if(LOWBIT_WITH_CUDA)
  message(STATUS "lowbit: LibTorch has CUDA; building the CUDA codec kernels")
  lowbit_add_cuda_kernels(lowbit_cuda_kernels)

  # The lowbit target (and the tests' helpers) exist only further down CMakeLists.txt, so
  # they are joined at the end of the top-level directory.
  function(lowbit_join_cuda)
    target_sources(lowbit PRIVATE $<TARGET_OBJECTS:lowbit_cuda_kernels>
                                  ${PROJECT_SOURCE_DIR}/src/cuda/codec_cuda_ops.cpp)
    target_compile_definitions(lowbit PUBLIC LOWBIT_WITH_CUDA)
    if(TARGET CUDA::cudart)
      target_link_libraries(lowbit PRIVATE CUDA::cudart)  # the same shared runtime as torch
    endif()
    if(LOWBIT_BUILD_TESTS AND TARGET lowbit_test_pch)
      find_package(GTest REQUIRED)  # tests/ found it in its own scope only
      lowbit_test(cuda_codec_test ${PROJECT_SOURCE_DIR}/tests/cuda_codec_test.cpp)
    endif()
  endfunction()
  cmake_language(DEFER CALL lowbit_join_cuda)
elseif(LOWBIT_CUDA_COMPILE_CHECK)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # One architecture keeps the check cheap; the kernels are written for sm_90 (H100/H200).
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)
    endif()
    enable_language(CUDA)
    message(STATUS "lowbit: LibTorch has no CUDA; compiling the CUDA kernels with "
                   "${CMAKE_CUDA_COMPILER} (sm_${CMAKE_CUDA_ARCHITECTURES}) as a check only")
    lowbit_add_cuda_kernels(lowbit_cuda_compile_check)
  else()
    message(STATUS "lowbit: LibTorch has no CUDA and no nvcc was found; the CUDA kernels are not compiled")
  endif()
else()
  message(STATUS "lowbit: LibTorch has no CUDA; CUDA compile check off (LOWBIT_CUDA_COMPILE_CHECK)")
endif()
