// Hopper's asynchronous data movement (sm_90a): TMA tensor loads that complete on an mbarrier, the
// mbarrier operations of a producer/consumer pipeline, and the register reallocation between
// warpgroups (setmaxnreg). Compiled only where XJ_WGMMA holds (attention_cores.cuh); the kernels
// built on them trap elsewhere and the host never launches them there. Under XJ_SIMT each is the
// CPU emulator's (tests/simt/runtime.cpp), which takes shared-memory addresses as the PTX does.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "attention_cores.cuh"

namespace xjfast {

#ifdef XJ_WGMMA

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
#ifdef XJ_SIMT
  xj_simt::mbarrier_init(smem_u32(bar), arrivals);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory");
#endif
}
// Makes initialized barriers visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void fence_barrier_init() {
#ifdef XJ_SIMT
  // the emulator's barriers are visible to every thread as soon as they are initialized
#else
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef XJ_SIMT
  xj_simt::mbarrier_arrive(smem_u32(bar), 0);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}
// One arrival that also announces `bytes` of TMA transactions the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef XJ_SIMT
  xj_simt::mbarrier_arrive(smem_u32(bar), bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
#ifdef XJ_SIMT
  return xj_simt::mbarrier_try_wait(smem_u32(bar), parity);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
#endif
}
__device__ __forceinline__ uint64_t global_time_ns() {
#ifdef XJ_SIMT
  return xj_simt::global_timer();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
#endif
}
// Far above any real wait (a tile's TMA takes microseconds, and compute-sanitizer slows a launch
// by 100x at most), and far below the minutes a hung launch would otherwise hold the GPU. A
// debugger that stops the GPU for longer wants -DXJ_MBARRIER_TIMEOUT_NS=0 (no timeout).
#ifndef XJ_MBARRIER_TIMEOUT_NS
#define XJ_MBARRIER_TIMEOUT_NS 5000000000ll
#endif
constexpr int64_t kMbarrierTimeoutNs = XJ_MBARRIER_TIMEOUT_NS;
// Waits until the phase of parity `parity` has completed. A phase that never completes (an
// arrival miscounted, a TMA that faulted) traps after kMbarrierTimeoutNs instead of hanging: the
// host then sees the launch fail ("unspecified launch failure") and the process can report it.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  if (mbarrier_try_wait(bar, parity)) return;  // the common case reads no clock
  const uint64_t start = global_time_ns();
  while (!mbarrier_try_wait(bar, parity)) {
    // signed: a timer the driver steps back reads as no time passed, not as 2^64 ns
    if (kMbarrierTimeoutNs > 0 && static_cast<int64_t>(global_time_ns() - start) > kMbarrierTimeoutNs) __trap();
  }
}

// The box at `coords` (innermost first) of a 5-D tensor map into shared memory; its bytes count
// towards `bar`'s transactions. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_5d(const CUtensorMap* map, void* dst, const int (&coords)[5], uint64_t* bar) {
#ifdef XJ_SIMT
  xj_simt::tma_load(map, smem_u32(dst), coords, 5, smem_u32(bar));
#else
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(coords[0]), "r"(coords[1]), "r"(coords[2]), "r"(coords[3]),
      "r"(coords[4]), "r"(smem_u32(bar))
      : "memory");
#endif
}

// The warpgroup gives back registers to, or takes them from, the CTA's pool.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef XJ_SIMT
  xj_simt::setmaxnreg(N);
#else
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef XJ_SIMT
  xj_simt::setmaxnreg(N);
#else
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

#endif  // XJ_WGMMA

}  // namespace xjfast
