// kv_cache_compact: gather the selected candidates (kept tokens and tokens of the evicted page),
// dequantize them and requantize the keep buffer as one unit, in place.
//
// A unit (b, head) is spread over a thread-block cluster of up to 8 CTAs, each owning a
// contiguous chunk of the buffer's slots, so a 512-slot buffer of 12 heads takes 96 SMs instead
// of 12. Each thread owns 16 bytes of a row (16 e4m3 channels, 8 bf16, 4 fp32) with 4 rows' loads
// in flight. Pass 1 gathers the chunk's candidates into shared memory and folds their statistics;
// the CTAs exchange partial statistics through distributed shared memory (combined in rank order:
// every CTA computes the same bits); pass 2 requantizes the rows from shared memory into their
// slots. Every CTA has read all its candidates (and the buffer's old scales) before the cluster
// barrier and writes only after it, so the in-place update is safe whichever CTA reads which slot.
//
// When a chunk does not fit in 160 KiB (more than 5120 slots of e4m3 at head_dim 128, 2560 of
// bf16), one CTA takes the unit and pass 2 gathers again (from L2), in place: slot j receives
// candidate top[j] >= j (top is strictly ascending), so the slots go in tiles in order, and
// within a tile every thread reads all its candidates, then the block meets a barrier, then the
// tile is written. A tile's candidates lie at slots >= the tile's first slot, which no earlier
// tile wrote, and no thread writes a slot of the tile before every thread has read what it needs.
// Clusters need sm_90; the body compiles to a trap for older targets (the op registers the CUDA
// backend for compute capability 9.0 and up).
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "cluster.cuh"
#include "cuda_check.h"
#include "dtypes.cuh"
#include "kv_cache_compact.h"
#include "kv_unit.cuh"

namespace xjfast {
namespace {

namespace cg = cooperative_groups;

// ([[maybe_unused]]: built for an arch below sm_90, the kernel is a trap that uses none of them.)
constexpr int kThreads = 256;
[[maybe_unused]] constexpr int kWarps = kThreads / 32;
[[maybe_unused]] constexpr int kUnroll = 4;  // rows per thread whose loads are in flight together
constexpr int kMinChunk = 64;                // slots per CTA below which a unit takes fewer CTAs
constexpr int kStageBytes = 160 << 10;       // shared memory for a CTA's staged rows (sm_90/100: 227 KiB)
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

// Candidate top[j], clamped into [0, keep_count + T) (no access out of bounds).
[[maybe_unused]] __device__ __forceinline__ int64_t candidate(const CompactArgs& a, const int64_t* top, int j) {
  return min(max(top[j], int64_t{0}), static_cast<int64_t>(a.keep_count) + a.T - 1);
}

// Reads the raw K/V of candidate top[j] for this thread's channels c0...
template <typename S, int N>
__device__ __forceinline__ Candidate<S, N> gather(const CompactArgs& a, const int64_t* top, int j, int b, int h,
                                                  int c0) {
  const int64_t idx = candidate(a, top, j);
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

// The candidate requantized with the unit's new mean and scales, stored at slot j.
template <typename S, int N>
__device__ __forceinline__ void store_slot(const Candidate<S, N>& x, const Sources& src, int c0, const float (&mean)[N],
                                           const float (&v_scale)[N], float k_scale, S* keep_k, S* keep_v, int j,
                                           int64_t slot_stride) {
  float k[N], v[N];
  dequantize(x, src, c0, k, v);
#pragma unroll
  for (int i = 0; i < N; ++i) k[i] = (k[i] - mean[i]) / k_scale, v[i] = v[i] / v_scale[i];
  const int64_t out = static_cast<int64_t>(j) * slot_stride;
  store_packed(keep_k + out, pack<S, N>(k)), store_packed(keep_v + out, pack<S, N>(v));
}

template <typename S, bool kStaged>
__global__ void __launch_bounds__(kThreads) kv_cache_compact_kernel(CompactArgs a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  constexpr int N = 16 / sizeof(S);  // channels per thread
  using Row = Packed<S, N>;
  XJ_DYNAMIC_SHARED(16, uint4, staged_words);  // kStaged: this CTA's candidates, K rows then V rows
  __shared__ Sources src;
  __shared__ float scratch[4 * kWarps * kMaxD];
  __shared__ float partial[4 * kMaxD];  // this CTA's statistics, read by every CTA of the cluster
  __shared__ float mean_s[kMaxD], v_scale_s[kMaxD], k_amax_s[kMaxD];

  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int unit = blockIdx.x / C, b = unit / a.H, h = unit % a.H, D = a.D;
  const int lanes = D / N, rows = kThreads / lanes, row = threadIdx.x / lanes, c0 = threadIdx.x % lanes * N;
  const int chunk = (a.count + C - 1) / C, j_begin = min(a.count, rank * chunk), j_end = min(a.count, j_begin + chunk);
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  const int64_t* top = a.top + static_cast<int64_t>(b) * a.count;
  Row* staged_k = reinterpret_cast<Row*>(staged_words);
  Row* staged_v = staged_k + static_cast<int64_t>(chunk) * lanes;
  const auto slot = [&](int j) { return (j - j_begin) * lanes + threadIdx.x % lanes; };

  // The keep buffer's old quantization, copied before the new one overwrites it.
  for (int c = threadIdx.x; c < D; c += kThreads) {
    src.k_mean[0][c] = a.keep_k_mean[bh * D + c], src.v_scale[0][c] = a.keep_v_scale[bh * D + c];
    src.k_mean[1][c] = a.page_k_mean[bh * D + c], src.v_scale[1][c] = a.page_v_scale[bh * D + c];
  }
  if (threadIdx.x == 0) src.k_scale[0] = a.keep_k_scale[bh], src.k_scale[1] = a.page_k_scale[bh];
  __syncthreads();

  UnitStats<N> stats;
  for (int j0 = j_begin + row; j0 < j_end; j0 += kUnroll * rows) {
    Candidate<S, N> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * rows < j_end) x[u] = gather<S, N>(a, top, j0 + u * rows, b, h, c0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * rows;
      if (j >= j_end) continue;
      if constexpr (kStaged) staged_k[slot(j)] = x[u].k, staged_v[slot(j)] = x[u].v;
      float k[N], v[N];
      dequantize(x[u], src, c0, k, v);
      stats.fold(k, v);
    }
  }
  stats.template reduce_block<kThreads>(scratch, partial, D, lanes);
  // Every CTA's partial statistics are complete, and every CTA has read its candidates and the
  // old scales: from here on the keep buffer may be written.
  cluster.sync();
  combine_cluster_stats<kThreads>(cluster, partial, scratch, D);
  const bool fp8 = std::is_same_v<S, __nv_fp8_storage_t>;
  const float k_scale = unit_scales<kThreads>(scratch, D, a.count, fp8, mean_s, v_scale_s, k_amax_s);
  if (rank == 0) {
    for (int c = threadIdx.x; c < D; c += kThreads) a.keep_k_mean[bh * D + c] = mean_s[c], a.keep_v_scale[bh * D + c] = v_scale_s[c];
    if (threadIdx.x == 0) a.keep_k_scale[bh] = k_scale;
  }

  float mean[N], v_scale[N];
#pragma unroll
  for (int j = 0; j < N; ++j) mean[j] = mean_s[c0 + j], v_scale[j] = v_scale_s[c0 + j];
  S* keep_k = static_cast<S*>(a.keep_k) + (static_cast<int64_t>(b) * a.K * a.H + h) * D + c0;
  S* keep_v = static_cast<S*>(a.keep_v) + (static_cast<int64_t>(b) * a.K * a.H + h) * D + c0;
  const int64_t slot_stride = static_cast<int64_t>(a.H) * D;
  if constexpr (kStaged) {
    for (int j = j_begin + row; j < j_end; j += rows) {
      const Candidate<S, N> x{staged_k[slot(j)], staged_v[slot(j)], candidate(a, top, j) < a.keep_count ? 0 : 1};
      store_slot(x, src, c0, mean, v_scale, k_scale, keep_k, keep_v, j, slot_stride);
    }
  } else {  // one CTA (C == 1): tiles of kUnroll * rows slots, in order; the bounds are the same
            // for every thread, so every thread meets every barrier
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
        if (j < a.count) store_slot(x[u], src, c0, mean, v_scale, k_scale, keep_k, keep_v, j, slot_stride);
      }
    }
  }
  cluster.sync();  // no CTA exits while another may still read its `partial`
#else
  __trap();  // unreachable: clusters need sm_90, and the CUDA backend is registered for 9.0+
#endif
}

template <typename S, bool kStaged>
void launch(const CompactArgs& a, int cluster, size_t smem, cudaStream_t stream) {
  static std::atomic<uint64_t> devices{0};
  launch_clustered("kv_cache_compact", kv_cache_compact_kernel<S, kStaged>, a, cluster,
                   static_cast<int64_t>(a.B) * a.H * cluster, kThreads, smem, kStageBytes, devices, stream);
}

// Clusters of up to 8 CTAs with at least kMinChunk slots each, staged in shared memory; one
// unstaged CTA per unit when a chunk does not fit.
template <typename S>
void launch_storage(const CompactArgs& a, cudaStream_t stream) {
  const int cluster = static_cast<int>(std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, (a.count + int64_t{kMinChunk} - 1) / kMinChunk)));
  const int64_t chunk = (a.count + cluster - 1) / cluster;
  const int64_t stage = 2 * chunk * a.D * static_cast<int64_t>(sizeof(S));
  if (stage <= kStageBytes) launch<S, true>(a, cluster, static_cast<size_t>(stage), stream);
  else launch<S, false>(a, 1, 0, stream);
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
  if (static_cast<int64_t>(a.B) * a.H * kMaxCluster > INT_MAX)
    throw std::invalid_argument("kv_cache_compact: B * H = " + std::to_string(static_cast<int64_t>(a.B) * a.H) +
                                " units are more than one launch can hold (" + std::to_string(INT_MAX / kMaxCluster) + ")");
  if (a.keep_count < 0 || a.keep_count > a.K)
    throw std::invalid_argument("kv_cache_compact: keep_count must be in [0, K = " + std::to_string(a.K) + "], got " +
                                std::to_string(a.keep_count));
  if (a.count < 1 || a.count > a.K || a.count > static_cast<int64_t>(a.keep_count) + a.T)
    throw std::invalid_argument("kv_cache_compact: count must be in [1, min(K, keep_count + T)], got " +
                                text("count", a.count) + " with " + text("K", a.K) + ", " +
                                text("keep_count", a.keep_count) + ", " + text("T", a.T));
  switch (a.storage_dtype) {
    case kFloat8E4M3: return launch_storage<__nv_fp8_storage_t>(a, stream);
    case kBFloat16: return launch_storage<__nv_bfloat16>(a, stream);
    case kFloat32: return launch_storage<float>(a, stream);
    default:
      throw std::invalid_argument("kv_cache_compact: storage dtype must be e4m3, bfloat16 or float32 (code " +
                                  std::to_string(a.storage_dtype) + ")");
  }
}

}  // namespace xjfast
