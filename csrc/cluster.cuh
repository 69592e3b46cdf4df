// Thread-block clusters as the cache kernels (kv_cache_commit, kv_cache_compact) use them: one
// quantization unit spread over up to 8 CTAs, which exchange their partial statistics through
// distributed shared memory. Clusters need compute capability 9.0.
#pragma once
#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "device_info.h"
#include "launch.cuh"

namespace xjfast {

constexpr int kMaxCluster = 8;  // the portable cluster size

// (Compiled from sm_90 on: older archs have no cluster_group, and there the cache kernels are a trap.)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// The unit's statistics out[4][D] (sum, max, min of K, max |V|) from every CTA's partial[4][D],
// read from each rank's shared memory in rank order, so that every CTA computes the same bits.
// Call after a cluster barrier that follows the partials' writes; ends with a block barrier. The
// partials must stay alive until every CTA is past this (a cluster barrier before exiting).
template <int Threads>
__device__ __forceinline__ void combine_cluster_stats(cooperative_groups::cluster_group& cluster, float* partial,
                                                      float* out, int D) {
  const int C = static_cast<int>(cluster.num_blocks());
  for (int c = threadIdx.x; c < D; c += Threads) {
    float su = 0.f, ma = -INFINITY, mi = INFINITY, va = 0.f;
    for (int r = 0; r < C; ++r) {
      const float* p = cluster.map_shared_rank(partial, r);
      su += p[c], ma = fmaxf(ma, p[D + c]), mi = fminf(mi, p[2 * D + c]), va = fmaxf(va, p[3 * D + c]);
    }
    out[c] = su, out[D + c] = ma, out[2 * D + c] = mi, out[3 * D + c] = va;
  }
  __syncthreads();
}
#endif

// Says so, naming the op, instead of launching a cluster where there can be none.
inline void check_clusters_supported(const char* op) {
  const int device = current_device();
  const auto [major, minor] = compute_capability(device);
  if (major < 9)
    throw std::invalid_argument(std::string(op) + ": the CUDA kernel uses thread-block clusters (compute capability "
                                "9.0 and up), GPU " + std::to_string(device) + " has " + std::to_string(major) + "." +
                                std::to_string(minor));
}

// Launches `blocks` CTAs of `threads` in clusters of `cluster` along x, with `smem` bytes of
// dynamic shared memory (up to `smem_max`, allowed once per device: `devices` is the caller's
// static, one per kernel).
template <typename Args>
void launch_clustered(const char* op, void (*kernel)(Args), const Args& args, int cluster, int64_t blocks,
                      int threads, size_t smem, int smem_max, std::atomic<uint64_t>& devices, cudaStream_t stream) {
  check_clusters_supported(op);
#ifdef XJ_SIMT
  (void)smem_max, (void)devices, (void)stream;
  xj_simt::launch(dim3(static_cast<unsigned>(blocks)), dim3(threads), smem, cluster, [&] { kernel(args); });
#else
  // Without the opt-in a block gets 48 KiB of static and dynamic shared memory together, and
  // these kernels hold ~20 KiB static: opt in for any dynamic size (once per device and kernel).
  if (smem > 0) allow_dynamic_smem(kernel, smem_max, devices);
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster, attribute.val.clusterDim.y = 1, attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  XJ_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
#endif
}

}  // namespace xjfast
