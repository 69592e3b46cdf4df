// kv_cache_commit: whole frames of K/V -> pages: K minus its per-channel mean in e4m3 with one
// scale per (page, b, head), V in e4m3 with one scale per channel, and the mean itself.
//
// A unit (frame, b, head) is spread over a thread-block cluster of up to 8 CTAs, each owning a
// contiguous chunk of the frame's tokens, so one frame of 12 heads fills ~100 SMs instead of 12.
// Each thread owns 8 consecutive channels of a row (16-byte loads of bf16/fp16, two of fp32),
// with 4 rows' loads in flight. Pass 1 folds sum/max/min of K and max |V| per channel and keeps
// the raw rows in shared memory; the CTAs exchange their partial statistics through distributed
// shared memory (each combines them in rank order, so all compute the same bits); pass 2
// quantizes the rows from shared memory and stores 8 e4m3 bytes (or 16 bf16 bytes) at once.
// HBM sees the input once. When a CTA's chunk does not fit in its 160 KiB (fp32 input at
// D=128, or frames of more than 2560 tokens of bf16/fp16 at D=128), pass 2 re-reads it from
// global memory instead: the chunk was just read, so that read is served by L2.
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
#include "kv_cache_commit.h"
#include "kv_unit.cuh"

namespace xjfast {
namespace {

namespace cg = cooperative_groups;

// ([[maybe_unused]]: built for an arch below sm_90, the kernel is a trap that uses none of them.)
constexpr int kThreads = 256;
[[maybe_unused]] constexpr int kWarps = kThreads / 32;
[[maybe_unused]] constexpr int kVec = 8;     // channels per thread
[[maybe_unused]] constexpr int kUnroll = 4;  // rows per thread whose loads are in flight together
constexpr int kMinChunk = 128;               // tokens per CTA below which a unit takes fewer CTAs
constexpr int kStageBytes = 160 << 10;       // shared memory for a CTA's staged rows (sm_90/100: 227 KiB)
[[maybe_unused]] constexpr int kMaxD = 128;

template <typename In, typename S, bool kStaged>
__global__ void __launch_bounds__(kThreads) kv_cache_commit_kernel(CommitArgs a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  using Row = Packed<In, kVec>;
  XJ_DYNAMIC_SHARED(16, uint4, staged_words);  // kStaged: this CTA's chunk of K rows, then of V rows
  __shared__ float scratch[4 * kWarps * kMaxD];
  __shared__ float partial[4 * kMaxD];  // this CTA's statistics, read by every CTA of the cluster
  __shared__ float mean_s[kMaxD], v_scale_s[kMaxD], k_amax_s[kMaxD];

  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int unit = blockIdx.x / C, frame = unit / (a.B * a.H), b = unit / a.H % a.B, h = unit % a.H;
  const int D = a.D, lanes = D / kVec, rows = kThreads / lanes, row = threadIdx.x / lanes;
  const int c0 = threadIdx.x % lanes * kVec;
  const int64_t page = a.page_ids[frame];
  if (page < 0 || page >= a.P) return;  // the whole cluster (one frame) leaves: no write out of bounds
  const int chunk = (a.T + C - 1) / C, t_begin = min(a.T, rank * chunk), t_end = min(a.T, t_begin + chunk);
  const int64_t token0 = static_cast<int64_t>(frame) * a.T;
  const In* k = static_cast<const In*>(a.k) + b * a.sk[0] + h * a.sk[2] + token0 * a.sk[1] + c0;
  const In* v = static_cast<const In*>(a.v) + b * a.sv[0] + h * a.sv[2] + token0 * a.sv[1] + c0;
  Row* staged_k = reinterpret_cast<Row*>(staged_words);
  Row* staged_v = staged_k + static_cast<int64_t>(chunk) * lanes;
  const auto slot = [&](int t) { return (t - t_begin) * lanes + threadIdx.x % lanes; };

  UnitStats<kVec> stats;
  for (int t0 = t_begin + row; t0 < t_end; t0 += kUnroll * rows) {
    Row kr[kUnroll], vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * rows;
      if (t < t_end) kr[u] = load_packed<In, kVec>(k + t * a.sk[1]), vr[u] = load_packed<In, kVec>(v + t * a.sv[1]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * rows;
      if (t >= t_end) continue;
      if constexpr (kStaged) staged_k[slot(t)] = kr[u], staged_v[slot(t)] = vr[u];
      float kf[kVec], vf[kVec];
      unpack(kr[u], kf), unpack(vr[u], vf);
      stats.fold(kf, vf);
    }
  }
  stats.template reduce_block<kThreads>(scratch, partial, D, lanes);
  cluster.sync();  // every CTA's partial statistics are complete and visible to the cluster
  combine_cluster_stats<kThreads>(cluster, partial, scratch, D);
  const bool fp8 = std::is_same_v<S, __nv_fp8_storage_t>;
  const float k_scale = unit_scales<kThreads>(scratch, D, a.T, fp8, mean_s, v_scale_s, k_amax_s);
  const int64_t bh = (page * a.B + b) * a.H + h;
  if (rank == 0) {
    for (int c = threadIdx.x; c < D; c += kThreads) a.k_mean[bh * D + c] = mean_s[c], a.v_scale[bh * D + c] = v_scale_s[c];
    if (threadIdx.x == 0) a.k_scale[bh] = k_scale;
  }

  float mean[kVec], v_scale[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mean[j] = mean_s[c0 + j], v_scale[j] = v_scale_s[c0 + j];
  // row t of the page is token t of head h: [P, B, T, H, D]
  S* kp = static_cast<S*>(a.k_pages) + ((page * a.B + b) * a.T * a.H + h) * D + c0;
  S* vp = static_cast<S*>(a.v_pages) + ((page * a.B + b) * a.T * a.H + h) * D + c0;
  for (int t0 = t_begin + row; t0 < t_end; t0 += kUnroll * rows) {
    Row kr[kUnroll], vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * rows;
      if (t >= t_end) continue;
      if constexpr (kStaged) {
        kr[u] = staged_k[slot(t)], vr[u] = staged_v[slot(t)];
      } else {
        kr[u] = load_packed<In, kVec>(k + t * a.sk[1]), vr[u] = load_packed<In, kVec>(v + t * a.sv[1]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * rows;
      if (t >= t_end) continue;
      float kf[kVec], vf[kVec];
      unpack(kr[u], kf), unpack(vr[u], vf);
#pragma unroll
      for (int j = 0; j < kVec; ++j) kf[j] = (kf[j] - mean[j]) / k_scale, vf[j] = vf[j] / v_scale[j];
      const int64_t out = static_cast<int64_t>(t) * a.H * D;
      store_packed(kp + out, pack<S, kVec>(kf)), store_packed(vp + out, pack<S, kVec>(vf));
    }
  }
  cluster.sync();  // no CTA exits while another may still read its `partial`
#else
  __trap();  // unreachable: clusters need sm_90, and the CUDA backend is registered for 9.0+
#endif
}

template <typename In, typename S, bool kStaged>
void launch(const CommitArgs& a, int cluster, int64_t blocks, size_t smem, cudaStream_t stream) {
  static std::atomic<uint64_t> devices{0};
  launch_clustered("kv_cache_commit", kv_cache_commit_kernel<In, S, kStaged>, a, cluster, blocks, kThreads, smem,
                   kStageBytes, devices, stream);
}

template <typename In, typename S>
void launch_storage(const CommitArgs& a, cudaStream_t stream) {
  const int cluster = static_cast<int>(std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, (a.T + int64_t{kMinChunk} - 1) / kMinChunk)));
  const int64_t chunk = (a.T + cluster - 1) / cluster;
  const int64_t stage = 2 * chunk * a.D * static_cast<int64_t>(sizeof(In));
  const int64_t blocks = static_cast<int64_t>(a.n) * a.B * a.H * cluster;
  if (blocks > INT_MAX)
    throw std::invalid_argument("kv_cache_commit: n * B * H = " + std::to_string(blocks / cluster) +
                                " units are more than one launch can hold (" + std::to_string(INT_MAX / cluster) + ")");
  if (stage <= kStageBytes) launch<In, S, true>(a, cluster, blocks, static_cast<size_t>(stage), stream);
  else launch<In, S, false>(a, cluster, blocks, 0, stream);
}

template <typename In>
void launch_input(const CommitArgs& a, cudaStream_t stream) {
  switch (a.storage_dtype) {
    case kFloat8E4M3: return launch_storage<In, __nv_fp8_storage_t>(a, stream);
    case kBFloat16: return launch_storage<In, __nv_bfloat16>(a, stream);
    case kFloat32: return launch_storage<In, float>(a, stream);
    default:
      throw std::invalid_argument("kv_cache_commit: storage dtype must be e4m3, bfloat16 or float32 (code " +
                                  std::to_string(a.storage_dtype) + ")");
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The vector loads need the tensor's address and every stride that moves between rows (of a
// dimension longer than 1) to be multiples of 16 bytes.
void check_input(const char* name, const void* p, const int64_t* strides, const int64_t* sizes, int element) {
  bool ok = aligned16(p);
  for (int i = 0; i < 3; ++i) ok = ok && (sizes[i] == 1 || strides[i] * element % 16 == 0);
  if (!ok)
    throw std::invalid_argument(std::string("kv_cache_commit: ") + name + ": the CUDA kernel reads 16-byte vectors, "
                                "so the address and the (b, token, head) strides must be multiples of 16 bytes; got "
                                "address " + std::to_string(reinterpret_cast<uintptr_t>(p)) + ", strides (" +
                                std::to_string(strides[0]) + ", " + std::to_string(strides[1]) + ", " +
                                std::to_string(strides[2]) + ") of " + std::to_string(element) + "-byte elements");
}

int input_element_bytes(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kBFloat16: case kFloat16: return 2;
    default:
      throw std::invalid_argument("kv_cache_commit: input dtype must be float32, bfloat16 or float16 (code " +
                                  std::to_string(dtype) + ")");
  }
}

}  // namespace

void kv_cache_commit(const CommitArgs& a, cudaStream_t stream) {
  const std::pair<const char*, const void*> pointers[] = {
      {"k", a.k}, {"v", a.v}, {"page_ids", a.page_ids}, {"k_pages", a.k_pages}, {"v_pages", a.v_pages},
      {"k_scale", a.k_scale}, {"k_mean", a.k_mean}, {"v_scale", a.v_scale}};
  for (const auto& [name, p] : pointers)
    if (p == nullptr) throw std::invalid_argument(std::string("kv_cache_commit: ") + name + " is a null pointer");
  if (a.D != 64 && a.D != 128)
    throw std::invalid_argument("kv_cache_commit: head_dim must be 64 or 128, got " + std::to_string(a.D));
  if (a.n <= 0 || a.B <= 0 || a.T <= 0 || a.H <= 0 || a.P <= 0)
    throw std::invalid_argument("kv_cache_commit: sizes (n, B, T, H, P) must be positive, got (" +
                                std::to_string(a.n) + ", " + std::to_string(a.B) + ", " + std::to_string(a.T) + ", " +
                                std::to_string(a.H) + ", " + std::to_string(a.P) + ")");
  const int element = input_element_bytes(a.input_dtype);
  const int64_t sizes[3] = {a.B, static_cast<int64_t>(a.n) * a.T, a.H};
  check_input("k", a.k, a.sk, sizes, element);
  check_input("v", a.v, a.sv, sizes, element);
  for (const auto& [name, p] : {pointers[3], pointers[4]})
    if (!aligned16(p))
      throw std::invalid_argument(std::string("kv_cache_commit: ") + name + ": the storage must be 16-byte aligned "
                                  "for the vector stores, got address " + std::to_string(reinterpret_cast<uintptr_t>(p)));
  for (const auto& [name, p] : {pointers[2], pointers[5], pointers[6], pointers[7]})
    if (reinterpret_cast<uintptr_t>(p) % 4)
      throw std::invalid_argument(std::string("kv_cache_commit: ") + name + ": expected a 4-byte aligned address");
  dispatch_float(a.input_dtype, "kv_cache_commit input dtype", [&](auto t) { launch_input<decltype(t)>(a, stream); });
}

}  // namespace xjfast
