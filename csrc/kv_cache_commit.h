#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace xjfast {

struct CommitArgs {
  const void* k;            // [B, n*T, H, D] input keys (spatial rotary applied)
  const void* v;
  int64_t sk[3], sv[3];     // strides (b, token, head) in elements; the channel stride is 1
  const int32_t* page_ids;  // [n]
  void* k_pages;            // [P, B, T, H, D] contiguous storage
  void* v_pages;
  float* k_scale;           // [P, B, H]
  float* k_mean;            // [P, B, H, D]
  float* v_scale;           // [P, B, H, D]
  int input_dtype, storage_dtype;
  int n, B, T, H, D;
};

void kv_cache_commit(const CommitArgs& args, cudaStream_t stream);

}  // namespace xjfast
