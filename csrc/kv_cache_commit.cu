// kv_cache_commit: whole frames of K/V -> pages: K minus its per-channel mean in e4m3 with one
// scale per (page, b, head), V in e4m3 with one scale per channel, and the mean itself.
// One block per (frame, b*head); each thread owns 8 consecutive channels of one token row, so a
// warp reads whole rows; pass 1 folds sum/max/min of K and max|V| per channel (reduced across
// the block's rows in shared memory), pass 2 re-reads (L2) and writes the quantized values.
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "dtypes.cuh"
#include "kv_cache_commit.h"

namespace xjfast {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // channels per thread
constexpr float kE4M3Max = 448.0f, kMinScale = 1e-12f;

template <typename S>
__device__ __forceinline__ void store_value(S* p, float x) { *p = from_float<S>(x); }
template <>
__device__ __forceinline__ void store_value(__nv_fp8_storage_t* p, float x) {
  *p = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);  // cvt.rn.satfinite, as the reference rounds
}

template <typename In, typename S>
__global__ void __launch_bounds__(kThreads) kv_cache_commit_kernel(CommitArgs a) {
  extern __shared__ float smem[];  // 4 * rows * D floats: sum, max, min, max|v| per row group
  const int frame = blockIdx.x, b = blockIdx.y / a.H, h = blockIdx.y % a.H, D = a.D;
  const int lanes = D / kVec, lane = threadIdx.x % lanes, row = threadIdx.x / lanes, rows = kThreads / lanes;
  const int c0 = lane * kVec;
  const int64_t page = a.page_ids[frame];
  const In* k = static_cast<const In*>(a.k) + b * a.sk[0] + h * a.sk[2] + static_cast<int64_t>(frame) * a.T * a.sk[1];
  const In* v = static_cast<const In*>(a.v) + b * a.sv[0] + h * a.sv[2] + static_cast<int64_t>(frame) * a.T * a.sv[1];

  float sum[kVec], mx[kVec], mn[kVec], vmax[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) sum[j] = 0.f, mx[j] = -FLT_MAX, mn[j] = FLT_MAX, vmax[j] = 0.f;
  if (row < rows) {
    for (int t = row; t < a.T; t += rows) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float kk = to_float(k[t * a.sk[1] + c0 + j]), vv = to_float(v[t * a.sv[1] + c0 + j]);
        sum[j] += kk, mx[j] = fmaxf(mx[j], kk), mn[j] = fminf(mn[j], kk), vmax[j] = fmaxf(vmax[j], fabsf(vv));
      }
    }
  }
  float* s_sum = smem;
  float* s_max = smem + rows * D;
  float* s_min = smem + 2 * rows * D;
  float* s_vmax = smem + 3 * rows * D;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    s_sum[row * D + c0 + j] = sum[j], s_max[row * D + c0 + j] = mx[j];
    s_min[row * D + c0 + j] = mn[j], s_vmax[row * D + c0 + j] = vmax[j];
  }
  __syncthreads();
  // per channel: reduce the row groups (thread c < D owns channel c), then the K amax over channels
  __shared__ float s_mean[128], s_vscale[128], s_kamax[128];
  __shared__ float s_kscale;
  if (threadIdx.x < D) {
    const int c = threadIdx.x;
    float su = 0.f, ma = -FLT_MAX, mi = FLT_MAX, va = 0.f;
    for (int r = 0; r < rows; ++r) {
      su += s_sum[r * D + c], ma = fmaxf(ma, s_max[r * D + c]);
      mi = fminf(mi, s_min[r * D + c]), va = fmaxf(va, s_vmax[r * D + c]);
    }
    const float mean = su / a.T;
    const bool fp8 = a.storage_dtype == kFloat8E4M3;
    s_mean[c] = mean;
    s_kamax[c] = fmaxf(ma - mean, mean - mi);
    s_vscale[c] = fp8 ? fmaxf(va, kMinScale * kE4M3Max) / kE4M3Max : 1.0f;
    const int64_t row_bh = (page * a.B + b) * a.H + h;
    a.k_mean[row_bh * D + c] = mean;
    a.v_scale[row_bh * D + c] = s_vscale[c];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float amax = 0.f;
    for (int c = 0; c < D; ++c) amax = fmaxf(amax, s_kamax[c]);
    const bool fp8 = a.storage_dtype == kFloat8E4M3;
    s_kscale = fp8 ? fmaxf(amax, kMinScale * kE4M3Max) / kE4M3Max : 1.0f;
    a.k_scale[(page * a.B + b) * a.H + h] = s_kscale;
  }
  __syncthreads();
  if (row >= rows) return;
  const float k_scale = s_kscale;
  S* kp = static_cast<S*>(a.k_pages) + ((page * a.B + b) * a.T * a.H + h) * static_cast<int64_t>(D);
  S* vp = static_cast<S*>(a.v_pages) + ((page * a.B + b) * a.T * a.H + h) * static_cast<int64_t>(D);
  for (int t = row; t < a.T; t += rows) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int c = c0 + j;
      const int64_t out = static_cast<int64_t>(t) * a.H * D + c;
      store_value(kp + out, (to_float(k[t * a.sk[1] + c]) - s_mean[c]) / k_scale);
      store_value(vp + out, to_float(v[t * a.sv[1] + c]) / s_vscale[c]);
    }
  }
}

template <typename In>
void launch_storage(const CommitArgs& a, cudaStream_t stream) {
  const dim3 grid(a.n, a.B * a.H);
  const size_t smem = 4 * sizeof(float) * (kThreads / (a.D / kVec)) * a.D;
  switch (a.storage_dtype) {
    case kFloat8E4M3: kv_cache_commit_kernel<In, __nv_fp8_storage_t><<<grid, kThreads, smem, stream>>>(a); break;
    case kBFloat16: kv_cache_commit_kernel<In, __nv_bfloat16><<<grid, kThreads, smem, stream>>>(a); break;
    case kFloat32: kv_cache_commit_kernel<In, float><<<grid, kThreads, smem, stream>>>(a); break;
    default: throw std::invalid_argument("kv_cache_commit: storage dtype must be e4m3, bfloat16 or float32");
  }
  XJ_CUDA_CHECK_LAUNCH("kv_cache_commit_kernel");
}

}  // namespace

void kv_cache_commit(const CommitArgs& a, cudaStream_t stream) {
  if (!a.k || !a.v || !a.page_ids || !a.k_pages || !a.v_pages || !a.k_scale || !a.k_mean || !a.v_scale)
    throw std::invalid_argument("kv_cache_commit: a null pointer among the inputs and the storage");
  if (a.D != 64 && a.D != 128)
    throw std::invalid_argument("kv_cache_commit: head_dim must be 64 or 128, got " + std::to_string(a.D));
  if (a.n <= 0 || a.B <= 0 || a.H <= 0 || a.T <= 0 || a.B * a.H > 65535)
    throw std::invalid_argument("kv_cache_commit: expected positive sizes and B * H <= 65535");
  dispatch_float(a.input_dtype, "kv_cache_commit input dtype", [&](auto t) { launch_storage<decltype(t)>(a, stream); });
}

}  // namespace xjfast
