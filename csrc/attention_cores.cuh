// The tensor-core "cores" of the attention kernels: where the Q, K and V^T tiles of a CTA sit in
// shared memory, and the two products S = Q.K^T and O += P.V on one warpgroup (4 warps, rows
// 16w..16w+15 per warp; S and O in the m16n8 accumulator layout of mma_fragments.cuh either way).
//
//   MmaSyncCore  mma.sync m16n8k32 e4m3 (sm_89 and later): row-major tiles padded by 16 bytes,
//                operands gathered by ldmatrix. On sm_90 and sm_100 the hardware runs it as
//                e4m3 -> f16 unpacks plus 16-bit HMMA: portable, not Hopper's FP8 rate.
//   WgmmaCore    wgmma.mma_async m64nNk32 e4m3 (sm_90a only): Q and K read by the tensor cores
//                from shared memory through descriptors (core-matrix layout, no swizzle), P from
//                registers, V^T from shared memory: Hopper's FP8 tensor-core path (QGMMA).
#pragma once

#include <cstdint>

#include "mma_fragments.cuh"

namespace xjfast {

constexpr int kCoreBlockM = 64;  // query rows per CTA (the Q quantization tile)
constexpr int kCoreBlockN = 64;  // keys per tile (the online softmax's step)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mma.sync ----------------------------------------------------------------------------------
// Four 8x8 matrices of 16-bit elements (= 8 rows x 16 bytes of e4m3); see mma_fragments.cuh.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef XJ_SIMT
  xj_simt::ldmatrix_x4(r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row))
               : "memory");
#endif
}

// mma.sync on e4m3 operands exists from sm_89 on. Built for an older arch (for denoise_step, which
// runs from sm_80), the attention kernels are a trap there: the host launches them from sm_90 on.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
constexpr bool kMmaE4m3 = false;
#else
constexpr bool kMmaE4m3 = true;
#endif

// d += a (16x32, row) . b (32x8, col), e4m3 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef XJ_SIMT
  xj_simt::mma_e4m3(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <int D>
struct MmaSyncCore {
  static constexpr bool kAsyncProxy = false;           // the tensor cores read what ldmatrix loaded
  static constexpr bool kCoreMatrixQ = false;          // Q in padded rows (chunk_offset)
  static constexpr bool kWholeTiles = false;           // softmax_tile masks every tile (one loop version)
  static constexpr bool kCompiled = kMmaE4m3;          // on every arch _C is built for from sm_89 on
  static constexpr int kRow = D + 16;                   // the pad puts an ldmatrix's 8 rows on distinct banks
  static constexpr int kVtRow = kCoreBlockN + 16;
  static constexpr int kQBytes = kCoreBlockM * kRow;
  static constexpr int kKBytes = kCoreBlockN * kRow;
  static constexpr int kVtBytes = D * kVtRow;

  // Byte offset of the 16-byte chunk `chunk` of row `row` of the Q or K tile.
  __device__ static int chunk_offset(int row, int chunk) { return row * kRow + chunk * 16; }
  // Byte offset of positions pos..pos+3 (pos % 4 == 0) of channel `ch` in the V^T tile.
  __device__ static int vt_offset(int ch, int pos) { return ch * kVtRow + pos; }

  // S (this warp's 16 rows x 64 keys) = Q . K^T. The Q fragments are re-read per tile (4 ldmatrix)
  // rather than held: the registers go to O.
  __device__ static void scores(const uint8_t* s_q, const uint8_t* s_k, float (&s)[kCoreBlockN / 8][4]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint8_t* q_row = s_q + (warp * 16 + a_fragment_row(lane)) * kRow + a_fragment_byte(lane);
    const uint8_t* k_row = s_k + b_fragment_row(lane) * kRow + b_fragment_byte(lane);
#pragma unroll
    for (int j = 0; j < kCoreBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 32; ++kc) {
      uint32_t qa[4];
      ldmatrix_x4(qa, q_row + kc * 32);
#pragma unroll
      for (int p = 0; p < kCoreBlockN / 16; ++p) {
        uint32_t b[4];
        ldmatrix_x4(b, k_row + p * 16 * kRow + kc * 32);
        mma_e4m3(s[2 * p], qa, b[0], b[1]);
        mma_e4m3(s[2 * p + 1], qa, b[2], b[3]);
      }
    }
  }

  // o = o * alpha (per row: elements 0-1 row g, 2-3 row g + 8) + P (16 x 64; p already rounded by
  // the caller's scale in p_fragment) . V^T tile. (On sm_90/sm_100 this e4m3 mma runs as unpacks
  // and 16-bit HMMA, whose fp32 accumulator is whole: o is the accumulator.)
  __device__ static void accumulate_pv(const uint32_t (&pa)[kCoreBlockN / 32][4], const uint8_t* s_vt,
                                       const float (&alpha)[2], float (&o)[D / 8][4]) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] *= alpha[0], o[i][1] *= alpha[0], o[i][2] *= alpha[1], o[i][3] *= alpha[1];
    const int lane = threadIdx.x % 32;
    const uint8_t* row = s_vt + b_fragment_row(lane) * kVtRow + b_fragment_byte(lane);
#pragma unroll
    for (int kc = 0; kc < kCoreBlockN / 32; ++kc) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4(b, row + dp * 16 * kVtRow + kc * 32);
        mma_e4m3(o[2 * dp], pa[kc], b[0], b[1]);
        mma_e4m3(o[2 * dp + 1], pa[kc], b[2], b[3]);
      }
    }
  }
};

// ---- wgmma (sm_90a) ----------------------------------------------------------------------------
// Compiled only where the instructions exist (and in the CPU emulator, tests/simt, which has them);
// elsewhere the kernels built on WgmmaCore are never launched (the host picks the core by compute
// capability) and trap if they were.
#if (defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(XJ_SIMT)
#define XJ_WGMMA 1
#endif

#define XJ_F4(a, i) "+f"(a[i][0]), "+f"(a[i][1]), "+f"(a[i][2]), "+f"(a[i][3])
#define XJ_F16(a, i) XJ_F4(a, i), XJ_F4(a, i + 1), XJ_F4(a, i + 2), XJ_F4(a, i + 3)

__device__ __forceinline__ void wgmma_fence() {
#if defined(XJ_SIMT)
  xj_simt::converge_warp();  // .sync.aligned: the warp's threads together (no memory barrier)
#elif defined(XJ_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit_and_wait() {
#if defined(XJ_SIMT)  // the emulated wgmma completes as it is issued
#elif defined(XJ_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Pins the registers a wgmma reads or writes asynchronously in place around wgmma_fence and
// wgmma_commit_and_wait: PTX leaves any other access to them between fence and wait undefined,
// and without this the compiler may move ordinary reads or writes of them (the accumulator's
// zeroing or rescale, P's packing) across those asm statements (CUTLASS's warpgroup_fence_operand).
// (The emulator's wgmma is a function call that completes as it returns: nothing to pin.)
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N][4]) {
#ifndef XJ_SIMT
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[i][e])::"memory");
#endif
}
template <int N>
__device__ __forceinline__ void fence_operands(const uint32_t (&r)[N][4]) {
#ifndef XJ_SIMT
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" ::"r"(r[i][e]) : "memory");
#endif
}
// Shared memory written by ordinary stores (cp.async included) that the tensor cores read next.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(XJ_SIMT)
  xj_simt::fence_proxy_async();
#elif defined(XJ_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// s (64 x 64 over the warpgroup) = or += A (desc) . B (desc), one k-step of 32.
__device__ __forceinline__ void wgmma_m64n64k32_ss(float (&s)[8][4], uint64_t a, uint64_t b, int accumulate) {
#if defined(XJ_SIMT)
  xj_simt::wgmma_e4m3(&s[0][0], 64, nullptr, a, b, accumulate != 0);
#elif defined(XJ_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : XJ_F16(s, 0), XJ_F16(s, 4)
      : "l"(a), "l"(b), "r"(accumulate));
#else
  __trap();
#endif
}

// o (64 x N over the warpgroup) = or += A (registers, this warp's 16 x 32) . B (desc), N = 64 or 128.
__device__ __forceinline__ void wgmma_rs(float (&o)[8][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
#if defined(XJ_SIMT)
  xj_simt::wgmma_e4m3(&o[0][0], 64, a, 0, b, accumulate != 0);
#elif defined(XJ_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : XJ_F16(o, 0), XJ_F16(o, 4)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
#else
  __trap();
#endif
}
__device__ __forceinline__ void wgmma_rs(float (&o)[16][4], const uint32_t (&a)[4], uint64_t b, int accumulate) {
#if defined(XJ_SIMT)
  xj_simt::wgmma_e4m3(&o[0][0], 128, a, 0, b, accumulate != 0);
#elif defined(XJ_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : XJ_F16(o, 0), XJ_F16(o, 4), XJ_F16(o, 8), XJ_F16(o, 12)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
#else
  __trap();
#endif
}

template <int D>
struct WgmmaCore {
  static constexpr bool kAsyncProxy = true;  // wgmma reads shared memory through the async proxy
  static constexpr bool kCoreMatrixQ = true;  // Q in core matrices (chunk_offset)
  static constexpr bool kWholeTiles = true;   // softmax_tile masks only a unit's partial tile
#ifdef XJ_WGMMA
  static constexpr bool kCompiled = true;
#else
  static constexpr bool kCompiled = false;  // kernels on this core are a trap here
#endif
  // Q and K tiles: rows of D bytes as core matrices, D / 16 of them per group of 8 rows.
  static constexpr int kRowGroup = k_major_group_stride(D);
  // V^T tile: D rows (channels) of 64 positions, 4 core matrices per group of 8 channels.
  static constexpr int kVtGroup = k_major_group_stride(kCoreBlockN);
  static constexpr int kQBytes = kCoreBlockM * D;
  static constexpr int kKBytes = kCoreBlockN * D;
  static constexpr int kVtBytes = D * kCoreBlockN;

  __device__ static int chunk_offset(int row, int chunk) { return core_matrix_offset(row, chunk * 16, kRowGroup); }
  __device__ static int vt_offset(int ch, int pos) { return core_matrix_offset(ch, pos, kVtGroup); }

  // S = Q.K^T with K in this core's layout, or (kTmaK) as TMA writes it for the warp-specialized
  // kernel: rows of D bytes with the D-byte swizzle (swizzled_k_step_descriptor).
  template <bool kTmaK = false>
  __device__ static void scores(const uint8_t* s_q, const uint8_t* s_k, float (&s)[kCoreBlockN / 8][4]) {
#pragma unroll
    for (int j = 0; j < kCoreBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;  // (the first k-step ignores them)
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < D / 32; ++kc) {
      const uint64_t k = kTmaK ? swizzled_k_step_descriptor(smem_u32(s_k), kc, D)
                               : k_step_descriptor(smem_u32(s_k), kc, kRowGroup);
      wgmma_m64n64k32_ss(s, k_step_descriptor(smem_u32(s_q), kc, kRowGroup), k, kc > 0);
    }
    wgmma_commit_and_wait();
    fence_operands(s);
  }

  // o = o * alpha (per row, as MmaSyncCore's) + P.V of one 64-key tile, the product summed apart
  // and added in fp32 (two-level accumulation): an FP8 wgmma keeps 13 mantissa bits of the
  // accumulator it adds into (SageAttention2, DeepSeek-V3), an error that would grow with the
  // number of keys if o itself were that accumulator.
  __device__ static void accumulate_pv(const uint32_t (&pa)[kCoreBlockN / 32][4], const uint8_t* s_vt,
                                       const float (&alpha)[2], float (&o)[D / 8][4]) {
    float pv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) pv[i][0] = pv[i][1] = pv[i][2] = pv[i][3] = 0.f;  // (the first k-step ignores them)
    fence_operands(pv);
    fence_operands(pa);  // packed by ordinary instructions
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < kCoreBlockN / 32; ++kc)
      wgmma_rs(pv, pa[kc], k_step_descriptor(smem_u32(s_vt), kc, kVtGroup), kc > 0);
    wgmma_commit_and_wait();
    fence_operands(pv);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] = fmaf(o[i][0], alpha[0], pv[i][0]), o[i][1] = fmaf(o[i][1], alpha[0], pv[i][1]);
      o[i][2] = fmaf(o[i][2], alpha[1], pv[i][2]), o[i][3] = fmaf(o[i][3], alpha[1], pv[i][3]);
    }
  }
};

#undef XJ_F16
#undef XJ_F4

}  // namespace xjfast
