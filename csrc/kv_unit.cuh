// What the cache kernels (kv_cache_commit, kv_cache_compact) share: rows moved 16 bytes per
// instruction, and the statistics and scales of one quantization unit (a page, the keep buffer),
// as xjfast.ops.kv_cache_commit.quantize_unit defines them: K mean per channel, one K scale from
// max |K - mean| over the unit, one V scale per channel (the CUDA twin of kernels/fp8.py's helpers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace xjfast {

constexpr float kE4M3Largest = 448.0f;
// xjfast.ops.fp8.MIN_SCALE * E4M3_MAX, rounded once to float as torch rounds the Python product:
// the floor of an amax, so that an all-zero unit gets a scale that 0 / scale leaves 0.
constexpr float kMinAmax = static_cast<float>(1e-12 * 448.0);

__device__ __forceinline__ float scale_from_amax(float amax) { return fmaxf(amax, kMinAmax) / kE4M3Largest; }

// N elements of T held as whole 16-byte words (or one 8-byte word: 8 e4m3 bytes). Callers
// guarantee the alignment of the addresses (their launchers check pointers and strides).
template <typename T, int N>
struct Packed {
  static constexpr int kBytes = N * sizeof(T);
  static_assert(kBytes == 8 || kBytes % 16 == 0, "a packed row segment is 8 bytes or whole 16-byte words");
  using Word = std::conditional_t<kBytes == 8, uint2, uint4>;
  static constexpr int kWords = kBytes / sizeof(Word);
  Word w[kWords];
};

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_packed(const T* p) {
  using P = Packed<T, N>;
  P r;
  const typename P::Word* q = reinterpret_cast<const typename P::Word*>(p);
#pragma unroll
  for (int i = 0; i < P::kWords; ++i) r.w[i] = q[i];
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, N>& r) {
  using P = Packed<T, N>;
  typename P::Word* q = reinterpret_cast<typename P::Word*>(p);
#pragma unroll
  for (int i = 0; i < P::kWords; ++i) q[i] = r.w[i];
}

// e4m3 bytes (`__nv_fp8_storage_t`), bf16, fp16 or fp32 -> fp32, exactly.
template <typename T, int N>
__device__ __forceinline__ void unpack(const Packed<T, N>& p, float (&x)[N]) {
  if constexpr (std::is_same_v<T, float>) {
    const float* f = reinterpret_cast<const float*>(p.w);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = f[i];
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      float2 f;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(p.w)[i]);
      } else if constexpr (std::is_same_v<T, __half>) {
        f = __half22float2(reinterpret_cast<const __half2*>(p.w)[i]);
      } else {
        static_assert(std::is_same_v<T, __nv_fp8_storage_t>, "e4m3 bytes, bf16, fp16 or fp32");
        // e4m3 -> fp16 is exact (cvt.rn.f16x2.e4m3x2), and fp16 -> fp32 too
        f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(
            reinterpret_cast<const __nv_fp8x2_storage_t*>(p.w)[i], __NV_E4M3)));
      }
      x[2 * i] = f.x, x[2 * i + 1] = f.y;
    }
  }
}

// fp32 -> the storage type, rounded to nearest even; e4m3 saturates (cvt.rn.satfinite), as
// torch's clamp(-448, 448).to(float8_e4m3fn) does in the reference.
template <typename T, int N>
__device__ __forceinline__ Packed<T, N> pack(const float (&x)[N]) {
  Packed<T, N> r;
  if constexpr (std::is_same_v<T, float>) {
    float* f = reinterpret_cast<float*>(r.w);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = x[i];
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        reinterpret_cast<__nv_bfloat162*>(r.w)[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
      } else if constexpr (std::is_same_v<T, __half>) {
        reinterpret_cast<__half2*>(r.w)[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
      } else {
        static_assert(std::is_same_v<T, __nv_fp8_storage_t>, "e4m3 bytes, bf16, fp16 or fp32");
        reinterpret_cast<__nv_fp8x2_storage_t*>(r.w)[i] =
            __nv_cvt_float2_to_fp8x2(make_float2(x[2 * i], x[2 * i + 1]), __NV_SATFINITE, __NV_E4M3);
      }
    }
  }
  return r;
}

// Running statistics of the N channels a thread owns, over the unit's rows it reads.
template <int N>
struct UnitStats {
  float sum[N], max[N], min[N], vmax[N];

  __device__ __forceinline__ UnitStats() {
#pragma unroll
    for (int j = 0; j < N; ++j) sum[j] = 0.f, max[j] = -INFINITY, min[j] = INFINITY, vmax[j] = 0.f;
  }

  __device__ __forceinline__ void fold(const float (&k)[N], const float (&v)[N]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      sum[j] += k[j], max[j] = fmaxf(max[j], k[j]), min[j] = fminf(min[j], k[j]);
      vmax[j] = fmaxf(vmax[j], fabsf(v[j]));
    }
  }

  // Combines the threads of the block that own the same channels (thread i owns channels
  // (i % lanes) * N onwards of some row) into out[4][D]: sum, max, min of K and max |V| per
  // channel, in a fixed order (deterministic). scratch: 4 * (Threads / 32) * D floats. Every
  // thread of the block calls it; it ends with a barrier.
  template <int Threads>
  __device__ __forceinline__ void reduce_block(float* scratch, float* out, int D, int lanes) {
    for (int offset = lanes; offset < 32; offset <<= 1) {  // the rows inside a warp
#pragma unroll
      for (int j = 0; j < N; ++j) {
        sum[j] += __shfl_xor_sync(~0u, sum[j], offset);
        max[j] = fmaxf(max[j], __shfl_xor_sync(~0u, max[j], offset));
        min[j] = fminf(min[j], __shfl_xor_sync(~0u, min[j], offset));
        vmax[j] = fmaxf(vmax[j], __shfl_xor_sync(~0u, vmax[j], offset));
      }
    }
    constexpr int kWarps = Threads / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane < lanes) {  // the warp's first row now holds the warp's statistics
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int c = lane * N + j;
        scratch[(0 * kWarps + warp) * D + c] = sum[j], scratch[(1 * kWarps + warp) * D + c] = max[j];
        scratch[(2 * kWarps + warp) * D + c] = min[j], scratch[(3 * kWarps + warp) * D + c] = vmax[j];
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < D; c += Threads) {
      float su = 0.f, ma = -INFINITY, mi = INFINITY, va = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        su += scratch[(0 * kWarps + w) * D + c], ma = fmaxf(ma, scratch[(1 * kWarps + w) * D + c]);
        mi = fminf(mi, scratch[(2 * kWarps + w) * D + c]), va = fmaxf(va, scratch[(3 * kWarps + w) * D + c]);
      }
      out[c] = su, out[D + c] = ma, out[2 * D + c] = mi, out[3 * D + c] = va;
    }
    __syncthreads();
  }
};

// From a unit's statistics stats[4][D] over `count` tokens: mean[D] and v_scale[D] (shared
// memory, written before the barrier inside), and the K scale, returned to every thread. With a
// bf16/fp32 storage (fp8 false) the scales are 1. k_amax: D floats of scratch.
template <int Threads>
__device__ __forceinline__ float unit_scales(const float* stats, int D, int count, bool fp8, float* mean,
                                             float* v_scale, float* k_amax) {
  for (int c = threadIdx.x; c < D; c += Threads) {
    const float m = stats[c] / static_cast<float>(count);
    mean[c] = m;
    k_amax[c] = fmaxf(stats[D + c] - m, m - stats[2 * D + c]);  // max |K - mean|: subtraction is monotonic
    v_scale[c] = fp8 ? scale_from_amax(stats[3 * D + c]) : 1.0f;
  }
  __syncthreads();
  float amax = 0.f;  // each warp reduces the channels itself: a max is exact in any order
  for (int c = threadIdx.x % 32; c < D; c += 32) amax = fmaxf(amax, k_amax[c]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, offset));
  return fp8 ? scale_from_amax(amax) : 1.0f;
}

}  // namespace xjfast
