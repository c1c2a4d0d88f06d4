// Marks small helpers that the CPU kernels and the CUDA kernels share.
#pragma once
#if defined(__CUDACC__)
#define LOWBIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOWBIT_HOST_DEVICE inline
#endif
