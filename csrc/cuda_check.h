// CUDA error handling shared by every kernel file: a failing call becomes a C++ exception that
// the bindings translate into the Python exception xjfast._C.CudaError (a RuntimeError), whose
// message names the call and CUDA's own name and description of the error.
//
//   XJ_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream));
//   my_kernel<<<grid, block, smem, stream>>>(...);
//   XJ_CUDA_CHECK_LAUNCH("my_kernel");
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace xjfast {

struct CudaError : std::runtime_error {
  cudaError_t code;
  CudaError(cudaError_t c, const std::string& what) : std::runtime_error(what), code(c) {}
};

inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    // Reset the runtime's last error (a non-sticky one) so the next call is not blamed for it.
    cudaGetLastError();
    throw CudaError(status, std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                                cudaGetErrorString(status) + ")");
  }
}

}  // namespace xjfast

namespace xjfast {

inline int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice(&device)");
  return device;
}

// Shared memory beyond 48 KiB a block, static and dynamic together, must be allowed per kernel and
// device (`bytes`: the dynamic part; plus the static part, at most the device's opt-in limit): done
// once per device (`devices` holds a bit per device index already allowed; one static per kernel).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& devices) {
  const int device = current_device();
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit && (devices.load() & bit)) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)");
  devices.fetch_or(bit);
}

}  // namespace xjfast

#define XJ_CUDA_CHECK(call) ::xjfast::check((call), #call)
// After a <<<...>>> launch, which returns nothing: a bad configuration shows up here.
#define XJ_CUDA_CHECK_LAUNCH(kernel_name) ::xjfast::check(cudaGetLastError(), "launch of " kernel_name)
