// Included before every source of xjfast._C when tests/simt_extension.py compiles csrc/ for the CPU
// (g++ -include prelude.h -DXJ_SIMT): what nvcc gives device code, made of host code. A CTA runs as
// one fiber per CUDA thread on one OS thread (so `__shared__` is thread_local), the CTAs of a
// cluster on as many OS threads; barriers and warp collectives switch fibers (runtime.cpp).
//
// What it covers is what the kernels use: __syncthreads and named barriers, warp shuffles and
// votes, ldmatrix and mma.sync m16n8k32 e4m3, cp.async (landing at its wait_group), 64-bit atomicAdd,
// clusters with distributed shared memory; of sm_90a (XJ_WGMMA), wgmma m64nNk32 e4m3 through
// shared-memory descriptors, mbarriers, TMA tensor loads (cuTensorMapEncodeTiled included) and
// setmaxnreg; and the runtime calls the host code makes.
#pragma once

#define __shared__ thread_local
#define __launch_bounds__(...)
#define __grid_constant__

#include <cuda_runtime.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

namespace xj_simt {

uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();

void syncthreads();
// bar.sync id, threads
void named_barrier(int id, int threads);
void syncwarp();
// The warp's threads together, ordering no memory (a .sync.aligned instruction that is no barrier).
void converge_warp();
[[noreturn]] void trap();

// The 32 lanes' values of one warp-wide exchange: each lane passes its own, and after every lane
// of the warp has arrived reads any lane's. Valid until the lane's next exchange but one.
constexpr size_t kLaneSlot = 64;  // bytes a lane may pass in one exchange
const void* warp_exchange(const void* mine, size_t bytes);
template <class T>
struct Lanes {
  const uint8_t* base;
  T operator[](int lane) const {
    T x;
    std::memcpy(&x, base + lane * kLaneSlot, sizeof(T));
    return x;
  }
};
template <class T>
Lanes<T> exchange(const T& mine) {
  static_assert(sizeof(T) <= kLaneSlot, "a warp exchange carries at most 64 bytes a lane");
  return {static_cast<const uint8_t*>(warp_exchange(&mine, sizeof(T)))};
}
int lane_id();

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l addresses row l % 8 of matrix l / 8.
void ldmatrix_x4(uint32_t (&r)[4], const void* row);
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32, d += a . b
void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// cp.async.cg.shared.global of 16 bytes (zeros: !valid), commit_group and wait_group `pending`: a
// copy lands when its thread waits for its group (or exits).
void cp_async_16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// The calling CTA's dynamic shared memory (poisoned with 0xFF bytes at the CTA's start).
uint8_t* dynamic_shared();
// Its address in the .shared window, as __cvta_generic_to_shared gives it (the window holds only
// the dynamic shared memory, from 128 bytes past a 256-byte boundary: no kernel declares more
// alignment that it does not make itself).
uint32_t shared_address(const void* p);

// ---- sm_90a ----
// wgmma.mma_async.sync.aligned.m64nNk32.f32.e4m3.e4m3 over the calling thread's warpgroup, complete
// when it returns: d (this thread's N / 2 accumulators) = A . B, plus d when `accumulate`; A from
// `a` (this warp's 16 x 32 in registers) or, when `a` is null, from descriptor a_desc; B from b_desc.
void wgmma_e4m3(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, bool accumulate);
void setmaxnreg(int registers);
// fence.proxy.async.shared::cta: the calling thread's shared-memory writes so far become visible to
// the async proxy (wgmma's operand reads) of the threads a barrier then orders after it.
void fence_proxy_async();
void mbarrier_init(uint32_t bar, int arrivals);
// An arrival that first expects `tx_bytes` of transactions (mbarrier.arrive[.expect_tx]).
void mbarrier_arrive(uint32_t bar, uint32_t tx_bytes);
bool mbarrier_try_wait(uint32_t bar, uint32_t parity);
uint64_t global_timer();
// cp.async.bulk.tensor.<rank>d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
void tma_load(const void* map, uint32_t dst, const int* coords, int rank, uint32_t bar);

// Runs `body` as every thread of every CTA of the grid; `cluster` > 0: in clusters of that many
// CTAs along x (0: a launch without clusters).
void launch(dim3 grid, dim3 block, size_t dynamic_smem, int cluster, const std::function<void()>& body);

// Clusters: the calling CTA's rank and count, a barrier over all their threads, and the address in
// CTA `rank`'s shared memory of what `p` addresses in the caller's.
unsigned cluster_rank();
unsigned cluster_blocks();
void cluster_sync();
void* map_shared_rank(const void* p, unsigned rank);

}  // namespace xj_simt

#define threadIdx (::xj_simt::thread_index())
#define blockIdx (::xj_simt::block_index())
#define blockDim (::xj_simt::block_dim())
#define gridDim (::xj_simt::grid_dim())

inline void __syncthreads() { xj_simt::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { xj_simt::syncwarp(); }
inline void __trap() { xj_simt::trap(); }
template <class T>
T __shfl_xor_sync(unsigned, T x, int mask) {
  return xj_simt::exchange(x)[xj_simt::lane_id() ^ mask];
}
inline bool __any_sync(unsigned, bool pred) {
  const auto lanes = xj_simt::exchange(pred);
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) return true;
  return false;
}
template <class T>
T __ldg(const T* p) { return *p; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long x) {
  return __atomic_fetch_add(p, x, __ATOMIC_RELAXED);
}
inline float __uint_as_float(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline size_t __cvta_generic_to_shared(const void* p) { return xj_simt::shared_address(p); }
using std::max;
using std::min;
// cuda_runtime.h's template form, which it declares for nvcc only
template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
