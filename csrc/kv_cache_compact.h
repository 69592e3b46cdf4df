#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace xjfast {

// One layer's keep buffer and one evicted page, all contiguous and of one storage dtype.
struct CompactArgs {
  void* keep_k;               // [B, K, H, D], updated in place
  void* keep_v;
  float* keep_k_scale;        // [B, H]
  float* keep_k_mean;         // [B, H, D]
  float* keep_v_scale;        // [B, H, D]
  const void* page_k;         // [B, T, H, D]
  const void* page_v;
  const float* page_k_scale;  // [B, H]
  const float* page_k_mean;   // [B, H, D]
  const float* page_v_scale;  // [B, H, D]
  // [B, count] strictly ascending candidate indices (< keep_count: keep slot, else page token
  // index - keep_count), as xjfast.ops.kv_cache_compact.select_keep makes them: ascending is what
  // makes the one-CTA (unstaged) in-place update safe; the clustered one stages every candidate
  // first. An index out of range is clamped (no access out of bounds).
  const int64_t* top;
  int storage_dtype;
  int B, K, T, H, D;
  int keep_count, count;      // tokens kept before, and after (count <= K, count <= keep_count + T)
};

// Throws std::invalid_argument (a null pointer, a size out of range, head_dim not 64/128, the
// storage dtype code, a misaligned pointer) before anything is launched, and CudaError when the
// launch fails (e.g. no SASS for this GPU).
void kv_cache_compact(const CompactArgs& args, cudaStream_t stream);

}  // namespace xjfast
