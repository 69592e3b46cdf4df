// kv_cache_compact: gather the selected candidates (kept tokens and tokens of the evicted page),
// dequantize them and requantize the keep buffer as one unit, in place.
//
// One block per (b, head); each thread owns 16 bytes of a row (16 e4m3 channels, 8 bf16, 4 fp32)
// with 4 rows' loads in flight. Pass 1 gathers every selected row and folds the unit's
// statistics; pass 2 gathers them again (from L2: the unit is a few hundred KiB at most) and
// writes slot j. In place, with 256 threads: slot j receives candidate top[j] >= j (top is
// strictly ascending), so pass 2 goes over the slots in tiles in order, and within a tile every
// thread reads all its candidates, then the block meets a barrier, then the tile is written. A
// tile's candidates lie at slots >= the tile's first slot, which no earlier tile wrote, and no
// thread writes a slot of the tile before every thread has read what it needs.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda_check.h"
#include "dtypes.cuh"
#include "kv_cache_compact.h"
#include "kv_unit.cuh"

namespace xjfast {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // rows per thread whose loads are in flight together
constexpr int kMaxD = 128;

// The quantization of the two candidate sources, 0: the keep buffer as it was, 1: the page.
struct Sources {
  float k_scale[2];
  float k_mean[2][kMaxD], v_scale[2][kMaxD];
};

template <typename S, int N>
struct Candidate {
  Packed<S, N> k, v;
  int source;
};

// Reads the raw K/V of candidate top[j] for this thread's channels c0...
template <typename S, int N>
__device__ __forceinline__ Candidate<S, N> gather(const CompactArgs& a, const int64_t* top, int j, int b, int h,
                                                  int c0) {
  const int64_t last = static_cast<int64_t>(a.keep_count) + a.T - 1;
  const int64_t idx = min(max(top[j], int64_t{0}), last);
  const bool kept = idx < a.keep_count;
  const int64_t token = kept ? (static_cast<int64_t>(b) * a.K + idx) : (static_cast<int64_t>(b) * a.T + idx - a.keep_count);
  const int64_t offset = (token * a.H + h) * a.D + c0;
  const S* k = static_cast<const S*>(kept ? a.keep_k : a.page_k) + offset;
  const S* v = static_cast<const S*>(kept ? a.keep_v : a.page_v) + offset;
  return {load_packed<S, N>(k), load_packed<S, N>(v), kept ? 0 : 1};
}

// K = q * k_scale + k_mean, V = q * v_scale, rounded after each operation as the reference does
// (no fused multiply-add), so that the statistics and the stored values see the same numbers.
template <typename S, int N>
__device__ __forceinline__ void dequantize(const Candidate<S, N>& x, const Sources& src, int c0, float (&k)[N],
                                           float (&v)[N]) {
  unpack(x.k, k), unpack(x.v, v);
  const float k_scale = src.k_scale[x.source];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    k[j] = __fadd_rn(__fmul_rn(k[j], k_scale), src.k_mean[x.source][c0 + j]);
    v[j] = __fmul_rn(v[j], src.v_scale[x.source][c0 + j]);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) kv_cache_compact_kernel(CompactArgs a) {
  constexpr int N = 16 / sizeof(S);  // channels per thread
  __shared__ Sources src;
  __shared__ float scratch[4 * kWarps * kMaxD];
  __shared__ float stats_s[4 * kMaxD];
  __shared__ float mean_s[kMaxD], v_scale_s[kMaxD], k_amax_s[kMaxD];

  const int b = blockIdx.x / a.H, h = blockIdx.x % a.H, D = a.D;
  const int lanes = D / N, rows = kThreads / lanes, row = threadIdx.x / lanes, c0 = threadIdx.x % lanes * N;
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  const int64_t* top = a.top + static_cast<int64_t>(b) * a.count;

  // The keep buffer's old quantization, copied before the new one overwrites it.
  for (int c = threadIdx.x; c < D; c += kThreads) {
    src.k_mean[0][c] = a.keep_k_mean[bh * D + c], src.v_scale[0][c] = a.keep_v_scale[bh * D + c];
    src.k_mean[1][c] = a.page_k_mean[bh * D + c], src.v_scale[1][c] = a.page_v_scale[bh * D + c];
  }
  if (threadIdx.x == 0) src.k_scale[0] = a.keep_k_scale[bh], src.k_scale[1] = a.page_k_scale[bh];
  __syncthreads();

  UnitStats<N> stats;
  for (int j0 = row; j0 < a.count; j0 += kUnroll * rows) {
    Candidate<S, N> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * rows < a.count) x[u] = gather<S, N>(a, top, j0 + u * rows, b, h, c0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * rows >= a.count) continue;
      float k[N], v[N];
      dequantize(x[u], src, c0, k, v);
      stats.fold(k, v);
    }
  }
  stats.template reduce_block<kThreads>(scratch, stats_s, D, lanes);
  const bool fp8 = std::is_same_v<S, __nv_fp8_storage_t>;
  const float k_scale = unit_scales<kThreads>(stats_s, D, a.count, fp8, mean_s, v_scale_s, k_amax_s);
  // Every thread copied the old scales to `src` before the first barrier: safe to overwrite.
  for (int c = threadIdx.x; c < D; c += kThreads) a.keep_k_mean[bh * D + c] = mean_s[c], a.keep_v_scale[bh * D + c] = v_scale_s[c];
  if (threadIdx.x == 0) a.keep_k_scale[bh] = k_scale;

  float mean[N], v_scale[N];
#pragma unroll
  for (int j = 0; j < N; ++j) mean[j] = mean_s[c0 + j], v_scale[j] = v_scale_s[c0 + j];
  S* keep_k = static_cast<S*>(a.keep_k) + (static_cast<int64_t>(b) * a.K * a.H + h) * D + c0;
  S* keep_v = static_cast<S*>(a.keep_v) + (static_cast<int64_t>(b) * a.K * a.H + h) * D + c0;
  // Tiles of kUnroll * rows slots, in order; the bounds are the same for every thread, so every
  // thread meets every barrier.
  for (int tile = 0; tile < a.count; tile += kUnroll * rows) {
    Candidate<S, N> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = tile + u * rows + row;
      if (j < a.count) x[u] = gather<S, N>(a, top, j, b, h, c0);
    }
    __syncthreads();  // the tile's candidates are in registers: its slots may be overwritten now
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = tile + u * rows + row;
      if (j >= a.count) continue;
      float k[N], v[N];
      dequantize(x[u], src, c0, k, v);
#pragma unroll
      for (int i = 0; i < N; ++i) k[i] = (k[i] - mean[i]) / k_scale, v[i] = v[i] / v_scale[i];
      const int64_t out = static_cast<int64_t>(j) * a.H * D;
      store_packed(keep_k + out, pack<S, N>(k)), store_packed(keep_v + out, pack<S, N>(v));
    }
  }
}

template <typename S>
void launch(const CompactArgs& a, cudaStream_t stream) {
  kv_cache_compact_kernel<S><<<a.B * a.H, kThreads, 0, stream>>>(a);
  XJ_CUDA_CHECK_LAUNCH("kv_cache_compact_kernel");
}

std::string text(const char* name, int64_t value) { return std::string(name) + " = " + std::to_string(value); }

}  // namespace

void kv_cache_compact(const CompactArgs& a, cudaStream_t stream) {
  const std::pair<const char*, const void*> vectors[] = {
      {"keep.k", a.keep_k}, {"keep.v", a.keep_v}, {"page.k", a.page_k}, {"page.v", a.page_v}};
  const std::pair<const char*, const void*> scalars[] = {
      {"keep.k_scale", a.keep_k_scale}, {"keep.k_mean", a.keep_k_mean}, {"keep.v_scale", a.keep_v_scale},
      {"page.k_scale", a.page_k_scale}, {"page.k_mean", a.page_k_mean}, {"page.v_scale", a.page_v_scale},
      {"top", a.top}};
  for (const auto& [name, p] : vectors) {
    if (p == nullptr) throw std::invalid_argument(std::string("kv_cache_compact: ") + name + " is a null pointer");
    if (reinterpret_cast<uintptr_t>(p) % 16)
      throw std::invalid_argument(std::string("kv_cache_compact: ") + name + ": the CUDA kernel moves 16-byte "
                                  "vectors, so the address must be a multiple of 16, got " +
                                  std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
  for (const auto& [name, p] : scalars) {
    if (p == nullptr) throw std::invalid_argument(std::string("kv_cache_compact: ") + name + " is a null pointer");
    const uintptr_t align = p == static_cast<const void*>(a.top) ? 8 : 4;
    if (reinterpret_cast<uintptr_t>(p) % align)
      throw std::invalid_argument(std::string("kv_cache_compact: ") + name + ": expected a " + std::to_string(align) +
                                  "-byte aligned address, got " + std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
  if (a.D != 64 && a.D != 128)
    throw std::invalid_argument("kv_cache_compact: head_dim must be 64 or 128, got " + std::to_string(a.D));
  if (a.B <= 0 || a.K <= 0 || a.T < 0 || a.H <= 0)
    throw std::invalid_argument("kv_cache_compact: expected B, K, H >= 1 and T >= 0, got " + text("B", a.B) + ", " +
                                text("K", a.K) + ", " + text("T", a.T) + ", " + text("H", a.H));
  if (static_cast<int64_t>(a.B) * a.H > INT_MAX)
    throw std::invalid_argument("kv_cache_compact: B * H = " + std::to_string(static_cast<int64_t>(a.B) * a.H) +
                                " blocks are more than one launch can hold");
  if (a.keep_count < 0 || a.keep_count > a.K)
    throw std::invalid_argument("kv_cache_compact: keep_count must be in [0, K = " + std::to_string(a.K) + "], got " +
                                std::to_string(a.keep_count));
  if (a.count < 1 || a.count > a.K || a.count > static_cast<int64_t>(a.keep_count) + a.T)
    throw std::invalid_argument("kv_cache_compact: count must be in [1, min(K, keep_count + T)], got " +
                                text("count", a.count) + " with " + text("K", a.K) + ", " +
                                text("keep_count", a.keep_count) + ", " + text("T", a.T));
  switch (a.storage_dtype) {
    case kFloat8E4M3: return launch<__nv_fp8_storage_t>(a, stream);
    case kBFloat16: return launch<__nv_bfloat16>(a, stream);
    case kFloat32: return launch<float>(a, stream);
    default:
      throw std::invalid_argument("kv_cache_compact: storage dtype must be e4m3, bfloat16 or float32 (code " +
                                  std::to_string(a.storage_dtype) + ")");
  }
}

}  // namespace xjfast
