// Kernel launches and dynamic shared memory, written once so that the same kernels also run on the
// CPU: tests/simt compiles csrc/ with a host compiler and -DXJ_SIMT, where a launch runs every CTA
// as fibers and the dynamic shared memory is the emulated CTA's. nvcc's code is unchanged by it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace xjfast {

// kernel<<<grid, block, smem, stream>>>(args...); the caller checks cudaGetLastError().
template <typename... Params, typename... Args>
void run_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#ifdef XJ_SIMT
  (void)stream;
  xj_simt::launch(grid, block, smem, 0, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
#endif
}

}  // namespace xjfast

// Declares `name` as the CTA's dynamic shared memory, an array of `type` aligned to `align` bytes.
#ifdef XJ_SIMT
#define XJ_DYNAMIC_SHARED(align, type, name) type* const name = reinterpret_cast<type*>(::xj_simt::dynamic_shared())
#else
#define XJ_DYNAMIC_SHARED(align, type, name) extern __shared__ __align__(align) type name[]
#endif
