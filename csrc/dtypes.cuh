// Element types of the tensors the kernels read and write, selected at run time by a code that
// the Python side passes (xjfast/ops/_cuda.py: DTYPE_CODES).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "host_device.h"

namespace xjfast {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat8E4M3 = 3 };

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }

// Calls f(T{}) with T the C++ type of a 16/32-bit floating dtype code.
template <typename F>
void dispatch_float(int dtype, const char* name, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat16: return f(__half{});
    default: throw std::invalid_argument(std::string(name) + ": expected float32, bfloat16 or float16 (code " +
                                         std::to_string(dtype) + ")");
  }
}

}  // namespace xjfast
