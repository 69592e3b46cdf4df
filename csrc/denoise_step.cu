// denoise_step: x0 = a * x_t + m * model_out (per-sample a, m), and with a next sigma
// x_next = keep * x0 + noise * eps, eps drawn in-kernel from Philox4x32-10 exactly as the
// reference maps it (one Philox call per group of 4 elements of a latent frame). model_out is
// either the latent layout or the head's [B, N, pt*ph*pw*C] tokens (Wan2.1's unpatchify order).
// Where W % 4 == 0 the four elements of a group are four neighbours of one row: the index math
// is done once per group and x_t, the latent model_out and the outputs move as one 8- or 16-byte
// access each (the host checks alignment and strides; otherwise the general path runs).
#include <cstdint>
#include <stdexcept>

#include "cuda_check.h"
#include "denoise_step.h"
#include "dtypes.cuh"
#include "launch.cuh"
#include "philox.cuh"

namespace xjfast {
namespace {

constexpr int kThreads = 256;  // one thread per group of 4 elements

// Four consecutive elements as one aligned access: 8 bytes of 16-bit values, 16 of float.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_float(e[j]);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint2 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = from_float<T>(v[j]);
    *reinterpret_cast<uint2*>(p) = w;
  }
}

template <typename T, bool kTokens, bool kNext, bool kRows>
__global__ void denoise_step_kernel(const T* __restrict__ xt, const T* __restrict__ mo, const float* __restrict__ coef,
                                    T* __restrict__ x0, T* __restrict__ xn, DenoiseGeometry g, uint64_t frame_index,
                                    const int64_t* __restrict__ frame_index_ptr, uint64_t seed) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(g.B) * g.C * g.H * g.W;  // elements of one latent frame
  if (4 * group >= total) return;
  const int f = blockIdx.y;
  float eps[4] = {0.f, 0.f, 0.f, 0.f};
  if (kNext) {
    const uint64_t first = frame_index_ptr != nullptr ? static_cast<uint64_t>(*frame_index_ptr) : frame_index;
    philox_normal4(static_cast<uint64_t>(group), first + f, seed, eps);
  }
  if constexpr (kRows) {  // elements x..x+3 of row (b, c, y): one index computation, vector accesses
    const int i = static_cast<int>(4 * group);  // the host checked a frame fits in int
    const int x = i % g.W, row = i / g.W, y = row % g.H, c = (row / g.H) % g.C, b = row / (g.H * g.C);
    const float a = coef[4 * b], m = coef[4 * b + 1];
    float x_t[4], pred[4], next[4];
    load4(xt + b * g.sx[0] + c * g.sx[1] + f * g.sx[2] + y * g.sx[3] + x, x_t);
    if (kTokens) {
#pragma unroll
      for (int j = 0; j < 4; ++j) pred[j] = to_float(mo[model_out_offset<true>(g, b, c, f, y, x + j)]);
    } else {
      load4(mo + model_out_offset<false>(g, b, c, f, y, x), pred);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pred[j] = a * x_t[j] + m * pred[j];
      next[j] = coef[4 * b + 2] * pred[j] + coef[4 * b + 3] * eps[j];
    }
    const int64_t out = ((static_cast<int64_t>(b) * g.C + c) * g.F + f) * g.H * g.W + static_cast<int64_t>(y) * g.W + x;
    store4(x0 + out, pred);
    if (kNext) store4(xn + out, next);
  } else {
#pragma unroll  // eps[j] stays in registers
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * group + j;
      if (i >= total) continue;
      const int x = i % g.W, y = (i / g.W) % g.H, c = (i / (static_cast<int64_t>(g.W) * g.H)) % g.C;
      const int b = i / (static_cast<int64_t>(g.W) * g.H * g.C);
      const float a = coef[4 * b], m = coef[4 * b + 1];
      const float x_t = to_float(xt[b * g.sx[0] + c * g.sx[1] + f * g.sx[2] + y * g.sx[3] + x * g.sx[4]]);
      const float pred = a * x_t + m * to_float(mo[model_out_offset<kTokens>(g, b, c, f, y, x)]);
      const int64_t out = ((static_cast<int64_t>(b) * g.C + c) * g.F + f) * g.H * g.W + static_cast<int64_t>(y) * g.W + x;
      x0[out] = from_float<T>(pred);
      if (kNext) xn[out] = from_float<T>(coef[4 * b + 2] * pred + coef[4 * b + 3] * eps[j]);
    }
  }
}

// Whether every group is four neighbours of one row that move as one aligned access each.
template <typename T>
bool row_groups(const DenoiseArgs& a) {
  const DenoiseGeometry& g = a.geometry;
  const int64_t quad = 4 * sizeof(T);
  auto aligned = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % quad == 0; };
  const bool xt_rows = g.sx[4] == 1 && g.sx[0] % 4 == 0 && g.sx[1] % 4 == 0 && g.sx[2] % 4 == 0 && g.sx[3] % 4 == 0;
  const bool mo_rows = a.tokens || (g.sm[4] == 1 && g.sm[0] % 4 == 0 && g.sm[1] % 4 == 0 && g.sm[2] % 4 == 0 &&
                                    g.sm[3] % 4 == 0 && aligned(a.model_out));
  return g.W % 4 == 0 && static_cast<int64_t>(g.B) * g.C * g.H * g.W < (int64_t{1} << 31) && xt_rows && mo_rows &&
         aligned(a.x_t) && aligned(a.x0) && aligned(a.x_next);
}

template <typename T, bool kTokens, bool kRows>
void launch(const DenoiseArgs& a, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(a.geometry.B) * a.geometry.C * a.geometry.H * a.geometry.W;
  const dim3 grid(static_cast<unsigned>((total / 4 + kThreads) / kThreads), a.geometry.F);
  auto* xn = static_cast<T*>(a.x_next);
  if (xn != nullptr) {
    run_kernel(denoise_step_kernel<T, kTokens, true, kRows>, grid, kThreads, 0, stream,
        static_cast<const T*>(a.x_t), static_cast<const T*>(a.model_out), a.coef, static_cast<T*>(a.x0), xn,
        a.geometry, a.frame_index, a.frame_index_ptr, a.seed);
  } else {
    run_kernel(denoise_step_kernel<T, kTokens, false, kRows>, grid, kThreads, 0, stream,
        static_cast<const T*>(a.x_t), static_cast<const T*>(a.model_out), a.coef, static_cast<T*>(a.x0), nullptr,
        a.geometry, a.frame_index, a.frame_index_ptr, a.seed);
  }
  XJ_CUDA_CHECK_LAUNCH("denoise_step_kernel");
}

template <typename T, bool kTokens>
void launch(const DenoiseArgs& a, cudaStream_t stream) {
  row_groups<T>(a) ? launch<T, kTokens, true>(a, stream) : launch<T, kTokens, false>(a, stream);
}

}  // namespace

void denoise_step(const DenoiseArgs& a, cudaStream_t stream) {
  if (a.x_t == nullptr || a.model_out == nullptr || a.coef == nullptr || a.x0 == nullptr)
    throw std::invalid_argument("denoise_step: a null pointer among x_t, model_out, coef, x0");
  const DenoiseGeometry& g = a.geometry;
  if (g.B <= 0 || g.C <= 0 || g.F <= 0 || g.H <= 0 || g.W <= 0 || g.F > 65535)
    throw std::invalid_argument("denoise_step: expected a latent shape [B, C, F <= 65535, H, W] of positive sizes");
  if (a.tokens && (g.pt <= 0 || g.ph <= 0 || g.pw <= 0 || g.F % g.pt || g.H % g.ph || g.W % g.pw))
    throw std::invalid_argument("denoise_step: the latent shape is not divisible by the patch size");
  dispatch_float(a.dtype, "denoise_step dtype", [&](auto t) {
    using T = decltype(t);
    a.tokens ? launch<T, true>(a, stream) : launch<T, false>(a, stream);
  });
}

}  // namespace xjfast
