# Finds LibTorch from the Python wheel that is installed (torch.utils.cmake_prefix_path),
# unless the caller already pointed CMAKE_PREFIX_PATH / Torch_DIR at a LibTorch.
if(NOT Torch_DIR)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import torch; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _lowbit_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _lowbit_torch_rc)
  if(_lowbit_torch_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH "${_lowbit_torch_prefix}")
  elseif(SKBUILD)
    message(FATAL_ERROR "lowbit: ${Python3_EXECUTABLE} cannot import torch. The Python package "
      "is built against the torch already installed: install torch first, then run "
      "`python3 -m pip install --no-build-isolation .` (build isolation hides the installed torch).")
  endif()
endif()
find_package(Torch REQUIRED)
# The wheel's TorchConfig injects its flags into CMAKE_CXX_FLAGS; keep them.
set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")
get_filename_component(TORCH_LIBRARY_DIR "${TORCH_LIBRARY}" DIRECTORY)
message(STATUS "lowbit: LibTorch ${Torch_VERSION} from ${TORCH_INSTALL_PREFIX}")
