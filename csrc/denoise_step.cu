// denoise_step: x0 = a * x_t + m * model_out (per-sample a, m), and with a next sigma
// x_next = keep * x0 + noise * eps, eps drawn in-kernel from Philox4x32-10 exactly as the
// reference maps it (one Philox call per group of 4 elements of a latent frame). model_out is
// either the latent layout or the head's [B, N, pt*ph*pw*C] tokens (Wan2.1's unpatchify order).
#include <cstdint>
#include <stdexcept>

#include "cuda_check.h"
#include "denoise_step.h"
#include "dtypes.cuh"
#include "philox.cuh"

namespace xjfast {
namespace {

constexpr int kThreads = 256;  // one thread per group of 4 elements

template <typename T, bool kTokens, bool kNext>
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
#pragma unroll  // eps[j] stays in registers
  for (int j = 0; j < 4; ++j) {
    const int64_t i = 4 * group + j;
    if (i >= total) continue;
    const int x = i % g.W, y = (i / g.W) % g.H, c = (i / (static_cast<int64_t>(g.W) * g.H)) % g.C;
    const int b = i / (static_cast<int64_t>(g.W) * g.H * g.C);
    const float a = coef[4 * b], m = coef[4 * b + 1];
    const float x_t = to_float(xt[b * g.sx[0] + c * g.sx[1] + f * g.sx[2] + y * g.sx[3] + x * g.sx[4]]);
    int64_t mo_off;
    if (kTokens) {
      const int64_t token = (static_cast<int64_t>(f / g.pt) * (g.H / g.ph) + y / g.ph) * (g.W / g.pw) + x / g.pw;
      const int64_t channel = (static_cast<int64_t>((f % g.pt) * g.ph + y % g.ph) * g.pw + x % g.pw) * g.C + c;
      mo_off = b * g.sm[0] + token * g.sm[1] + channel * g.sm[2];
    } else {
      mo_off = b * g.sm[0] + c * g.sm[1] + f * g.sm[2] + y * g.sm[3] + x * g.sm[4];
    }
    const float pred = a * x_t + m * to_float(mo[mo_off]);
    const int64_t out = ((static_cast<int64_t>(b) * g.C + c) * g.F + f) * g.H * g.W + static_cast<int64_t>(y) * g.W + x;
    x0[out] = from_float<T>(pred);
    if (kNext) xn[out] = from_float<T>(coef[4 * b + 2] * pred + coef[4 * b + 3] * eps[j]);
  }
}

template <typename T, bool kTokens>
void launch(const DenoiseArgs& a, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(a.geometry.B) * a.geometry.C * a.geometry.H * a.geometry.W;
  const dim3 grid(static_cast<unsigned>((total / 4 + kThreads) / kThreads), a.geometry.F);
  auto* xn = static_cast<T*>(a.x_next);
  if (xn != nullptr) {
    denoise_step_kernel<T, kTokens, true><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(a.x_t), static_cast<const T*>(a.model_out), a.coef, static_cast<T*>(a.x0), xn,
        a.geometry, a.frame_index, a.frame_index_ptr, a.seed);
  } else {
    denoise_step_kernel<T, kTokens, false><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(a.x_t), static_cast<const T*>(a.model_out), a.coef, static_cast<T*>(a.x0), nullptr,
        a.geometry, a.frame_index, a.frame_index_ptr, a.seed);
  }
  XJ_CUDA_CHECK_LAUNCH("denoise_step_kernel");
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
