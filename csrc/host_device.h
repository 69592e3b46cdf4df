// Code that both the CUDA kernels and the host use, compiled by nvcc for the device and by a plain
// C++ compiler for the host unit tests (tests/test_csrc_host.py).
#pragma once

#if defined(__CUDACC__)
#define XJ_HD __host__ __device__ __forceinline__
#else
#define XJ_HD inline
#endif
