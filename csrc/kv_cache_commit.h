#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace xjfast {

struct CommitArgs {
  const void* k;            // [B, n*T, H, D] input keys (spatial rotary applied)
  const void* v;
  int64_t sk[3], sv[3];     // strides (b, token, head) in elements; the channel stride is 1
  const int32_t* page_ids;  // [n]; an id outside [0, P) makes the kernel skip that frame
  void* k_pages;            // [P, B, T, H, D] contiguous storage
  void* v_pages;
  float* k_scale;           // [P, B, H]
  float* k_mean;            // [P, B, H, D]
  float* v_scale;           // [P, B, H, D]
  int input_dtype, storage_dtype;
  int n, B, T, H, D, P;
};

// Throws std::invalid_argument (a null pointer, a size out of range, head_dim not 64/128, a dtype
// code, k/v or storage not 16-byte aligned: pointers and strides, for the 16-byte vector access)
// before anything is launched, and CudaError when the launch fails (e.g. no SASS for this GPU).
void kv_cache_commit(const CommitArgs& args, cudaStream_t stream);

}  // namespace xjfast
