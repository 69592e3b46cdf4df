// CUDA error handling shared by every kernel file: a failing call becomes a C++ exception that
// the bindings translate into xjfast._C.CudaError, naming the call and CUDA's message.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace xjfast {

struct CudaError : std::runtime_error {
  cudaError_t code;
  CudaError(cudaError_t c, const std::string& what) : std::runtime_error(what), code(c) {}
};

inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not blamed for it
    throw CudaError(status, std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                                cudaGetErrorString(status) + ")");
  }
}

}  // namespace xjfast

#define XJ_CUDA_CHECK(call) ::xjfast::check((call), #call)
