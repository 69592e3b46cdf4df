// temporal_attention: FP8 attention of a pass's queries over the paged KV cache and the pass's own
// keys on the tensor cores, the same math as the Triton kernel (kernels/temporal_attention.py) and
// the reference it is held to. Two cores (attention_cores.cuh) do the products: wgmma on sm_90a
// (Hopper's FP8 path), mma.sync m16n8k32 elsewhere; the host picks by GPU.
//
// One CTA of 4 warps per (64-query tile, b, head); warp w owns query rows 16w..16w+15. The CTA
// walks the key units in slot order (sink pages, the keep buffer, window pages, the pass's frames)
// and, per unit:
//   1. rotates its query rows' temporal channels by (query slot - unit slot), so cached keys never
//      carry the temporal rotary; adds q.mean back (each unit stores K minus its mean);
//   2. quantizes the rotated tile to e4m3 with one scale (tile amax / 448), into shared memory;
//   3. streams the unit's 64-key tiles through two cp.async stages: S = Q.K^T on the tensor cores,
//      exp2 online softmax in fp32, P scaled by 448 and rounded to e4m3, O += P.V on the tensor
//      cores, with O kept in this unit's V-scale units while the unit is read.
// P.V needs V with keys contiguous per channel (e4m3 operands are K-major only): each tile is
// transposed in shared memory, its keys permuted within each 16-key group so that the S
// accumulators of a thread are, as they are, the P operand of the next product (key_of_position).
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention_common.cuh"
#include "attention_cores.cuh"
#include "cuda_check.h"
#include "device_info.h"
#include "dtypes.cuh"
#include "launch.cuh"
#include "mma_fragments.cuh"
#include "temporal_attention.h"

namespace xjfast {
namespace {

constexpr int kThreads = kGroupThreads, kWarps = kGroupWarps;

// ---- shared-memory layout ---------------------------------------------------------------------
template <int D, class Core>
struct Layout {
  static constexpr int kSegs = D / 16;         // 16-channel segments of a query row
  static constexpr int kVRow = D + 16;         // V tiles arrive row-major (padded) for the transpose
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + Core::kQBytes;            // two stages
  static constexpr int kV = kK + 2 * Core::kKBytes;        // two stages
  static constexpr int kVt = kV + 2 * kBlockN * kVRow;
  static constexpr int kPart = kVt + Core::kVtBytes;       // float [64 * kSegs]: q.mean partial sums
  static constexpr int kQMean = kPart + 4 * kBlockM * kSegs;  // float [kBlockM]
  static constexpr int kWarpMax = kQMean + 4 * kBlockM;   // float [kWarps]
  static constexpr int kColSum = kWarpMax + 4 * kWarps;   // float [kWarps][kBlockN] (attention mass only)
  static constexpr int kBytes = kColSum + 4 * kWarps * kBlockN;
  static_assert(kK % 128 == 0 && kV % 128 == 0 && kVt % 128 == 0, "tiles start 128-byte aligned");
};

// ---- PTX ---------------------------------------------------------------------------------------
// 16 bytes global -> shared, bypassing L1; src-size 0 writes zeros (keys past a unit's end read as 0).
#ifdef XJ_SIMT
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  xj_simt::cp_async_16(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { xj_simt::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  xj_simt::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

template <int D, class Core>
__device__ __forceinline__ QueryScratch query_scratch(uint8_t* smem) {
  using L = Layout<D, Core>;
  return {smem + L::kQ, reinterpret_cast<float*>(smem + L::kPart), reinterpret_cast<float*>(smem + L::kQMean),
          reinterpret_cast<float*>(smem + L::kWarpMax)};
}

// Keys n0..n0+63 of a unit (rows `stride` bytes apart, `valid` of them) into a shared tile, the
// 16-byte chunk `c` of key r at offset(r, c); missing keys are zero-filled (their V rows then
// contribute 0 * 0).
template <int D, class Offset>
__device__ __forceinline__ void load_tile(uint8_t* s_tile, const uint8_t* base, int64_t stride, int n0, int valid,
                                          Offset offset) {
  constexpr int kChunks = D / 16;
  for (int c = threadIdx.x; c < kBlockN * kChunks; c += kThreads) {
    const int r = c / kChunks, col = c % kChunks;
    const bool live = n0 + r < valid;
    cp_async_16(s_tile + offset(r, col), live ? base + (n0 + r) * stride + col * 16 : base, live);
  }
}

// False (after a trap) for a core this arch lacks (wgmma built for sm_100a, mma.sync e4m3 for sm_80;
// never launched there): the kernel's body after the check is then dead code, and not compiled.
template <class Core>
__device__ __forceinline__ bool compiled_here() {
  if constexpr (!Core::kCompiled) __trap();
  return Core::kCompiled;
}

template <typename In, int D, template <int> class CoreT>
__global__ void __launch_bounds__(kThreads) temporal_attention_kernel(const AttentionArgs a) {
  using Core = CoreT<D>;
  if (!compiled_here<Core>()) return;
  using L = Layout<D, Core>;
  XJ_DYNAMIC_SHARED(128, uint8_t, smem);  // tile bases stay 128-byte aligned
  const QueryScratch scratch = query_scratch<D, Core>(smem);
  uint8_t* s_vt = smem + L::kVt;

  const QueryTiles& qt = a.qt;
  const int m0 = blockIdx.x * kBlockM, b = blockIdx.y / qt.H, h = blockIdx.y % qt.H;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4;
  const In* q_bh = static_cast<const In*>(qt.q) + b * qt.sq[0] + h * qt.sq[2];
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this thread's accumulator rows

  SoftmaxState<D> st;
  st.init();
  const int units = unit_count(a);
  for (int ui = 0; ui < units; ++ui) {
    const UnitRef ref = unit_ref(a, ui);
    // no row of the tile sees this unit: skip it whole
    if (ref.source == 2 && !warp_sees_unit(a, ref.pass_unit, m0, min(m0 + kBlockM, qt.Lq))) continue;
    const Unit unit = unit_of(a, ref, ui, b, h, D);
    const bool visible[2] = {row_sees(a, ref, rows[0]), row_sees(a, ref, rows[1])};

    const int tiles = (unit.tokens + kBlockN - 1) / kBlockN;
    const auto k_offset = [](int r, int c) { return Core::chunk_offset(r, c); };
    const auto v_offset = [](int r, int c) { return r * L::kVRow + c * 16; };
    load_tile<D>(smem + L::kK, unit.k, unit.stride, 0, unit.tokens, k_offset);
    load_tile<D>(smem + L::kV, unit.v, unit.stride, 0, unit.tokens, v_offset);
    cp_async_commit();
    const float q_scale =
        prepare_query_tile<In, D, Core>(qt, q_bh, m0, unit.slot, unit.anchored, unit.k_mean, scratch, 0);
    const float q_mean[2] = {scratch.mean[warp * 16 + g], scratch.mean[warp * 16 + g + 8]};
    const float score_scale = q_scale * unit.k_scale * qt.sm_scale_log2;
    st.to_value_units(unit.v_scale, true);

    for (int tile = 0; tile < tiles; ++tile) {
      const int stage = tile & 1, n0 = tile * kBlockN;
      uint8_t* s_k = smem + L::kK + stage * Core::kKBytes;
      uint8_t* s_v = smem + L::kV + stage * kBlockN * L::kVRow;
      if (tile + 1 < tiles) {  // prefetch the next tile into the other stage
        load_tile<D>(smem + L::kK + (stage ^ 1) * Core::kKBytes, unit.k, unit.stride, n0 + kBlockN, unit.tokens,
                     k_offset);
        load_tile<D>(smem + L::kV + (stage ^ 1) * kBlockN * L::kVRow, unit.v, unit.stride, n0 + kBlockN,
                     unit.tokens, v_offset);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      if constexpr (Core::kAsyncProxy) fence_proxy_async();
      __syncthreads();  // this tile's K and V are in shared memory
      transpose_value_tile<D, Core>(s_v, [](int r, int c) { return r * L::kVRow + c; }, s_vt, threadIdx.x, kThreads);
      float s[kBlockN / 8][4];
      Core::scores(scratch.q, s_k, s);
      uint32_t pa[kBlockN / 32][4];  // P * 448 rounded to e4m3, as the product's A operand
      float alpha[2];
      softmax_tile<D, Core::kWholeTiles>(s, n0, unit.tokens, visible, score_scale, q_mean, st, pa, alpha);
      __syncthreads();  // the transposed V tile is complete
      // No barrier here: the next tile's prefetch overwrites this stage, which every thread has
      // finished reading (scores, transpose) before the barrier above, and its transpose overwrites
      // s_vt only after the next tile's first barrier, which follows this product in every thread.
      Core::accumulate_pv(pa, s_vt, alpha, st.o);
    }
    st.to_value_units(unit.v_scale, false);
  }
  store_rows<In, D>(a, b, h, rows, st);
}

// One CTA per (64 keys of the page, b, head): every query tile, quantized as the attention did,
// p = exp2(s - lse) summed over the queries, added to mass in fixed point with integer atomics
// (summing the heads too, in an order that does not change the total).
template <typename In, int D, template <int> class CoreT>
__global__ void __launch_bounds__(kThreads) attention_mass_kernel(const AttentionMassArgs a) {
  using Core = CoreT<D>;
  if (!compiled_here<Core>()) return;
  using L = Layout<D, Core>;
  XJ_DYNAMIC_SHARED(128, uint8_t, smem);  // tile bases stay 128-byte aligned
  const QueryScratch scratch = query_scratch<D, Core>(smem);
  uint8_t* s_k = smem + L::kK;
  float* s_colsum = reinterpret_cast<float*>(smem + L::kColSum);

  const QueryTiles& qt = a.qt;
  const int n0 = blockIdx.x * kBlockN, b = blockIdx.y / qt.H, h = blockIdx.y % qt.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const In* q_bh = static_cast<const In*>(qt.q) + b * qt.sq[0] + h * qt.sq[2];
  const int page = __ldg(a.page_table + a.table_index);
  const Unit unit = paged_unit(a.cache, page, b, h, qt.B, qt.H, D, a.cache.T, a.slot);
  load_tile<D>(s_k, unit.k, unit.stride, n0, unit.tokens, [](int r, int c) { return Core::chunk_offset(r, c); });
  cp_async_commit();

  float colsum[kBlockN / 8][2] = {};
  for (int m0 = 0; m0 < qt.Lq; m0 += kBlockM) {
    bool counted[2];  // rows past Lq, or lagging past this page (frame_lags), add nothing
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      counted[r] = row < qt.Lq && row_lag(qt, row) <= a.window;
    }
    const float q_scale =
        prepare_query_tile<In, D, Core>(qt, q_bh, m0, unit.slot, false, unit.k_mean, scratch, 0);
    cp_async_wait<0>();
    if constexpr (Core::kAsyncProxy) fence_proxy_async();
    __syncthreads();  // the key tile (first iteration) and the query tile are in shared memory
    float s[kBlockN / 8][4];
    Core::scores(scratch.q, s_k, s);
    const float score_scale = q_scale * unit.k_scale * qt.sm_scale_log2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (!counted[r]) continue;
      const float shift = scratch.mean[warp * 16 + g + 8 * r] -
                          __ldg(a.lse + (static_cast<int64_t>(b) * qt.H + h) * qt.Lq + row) * kLog2e;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
        colsum[j][0] += exp2f(s[j][2 * r] * score_scale + shift), colsum[j][1] += exp2f(s[j][2 * r + 1] * score_scale + shift);
    }
    __syncthreads();  // the query tile is read before the next one overwrites it
  }
  // sum over the warp's rows (lanes of equal t), then over the warps
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) colsum[j][e] += __shfl_xor_sync(0xffffffffu, colsum[j][e], offset);
      if (g == 0) s_colsum[warp * kBlockN + j * 8 + 2 * t + e] = colsum[j][e];
    }
  }
  __syncthreads();
  if (threadIdx.x < kBlockN && n0 + threadIdx.x < unit.tokens) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_colsum[w * kBlockN + threadIdx.x];
    const float x = total * kMassScale;  // >= 0; from 2^23 on an integer, where x + 0.5f would round to even
    const auto fixed = static_cast<unsigned long long>(x < 8388608.f ? x + 0.5f : x);  // to nearest, ties up
    atomicAdd(reinterpret_cast<unsigned long long*>(a.mass) + (static_cast<int64_t>(page) * qt.B + b) * unit.tokens +
                  n0 + threadIdx.x,
              fixed);
  }
}

// ---- host side ---------------------------------------------------------------------------------
void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("temporal_attention: " + what);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_queries(const QueryTiles& qt, size_t element) {
  require(qt.q != nullptr && qt.frame_slots != nullptr, "q and frame_slots must not be null");
  require(qt.D == 64 || qt.D == 128, "head_dim must be 64 or 128, got " + std::to_string(qt.D));
  require(qt.B > 0 && qt.H > 0 && qt.Lq > 0 && qt.unit_T > 0, "expected positive B, H, Lq and unit tokens");
  require(static_cast<int64_t>(qt.B) * qt.H <= 65535, "B * H must be <= 65535 (the grid's second dimension)");
  // Query rows are read 16 bytes at a time.
  require(aligned(qt.q, 16) && (qt.sq[0] * element) % 16 == 0 && (qt.sq[1] * element) % 16 == 0 &&
              (qt.sq[2] * element) % 16 == 0,
          "q must be 16-byte aligned, with strides that are multiples of 16 bytes");
  require(qt.rope_dims == 0 || (qt.rope != nullptr && qt.rope_center >= 0 && qt.rope_dims % 2 == 0 &&
                                qt.rope_dims <= qt.D),
          "a temporal rotary needs its cos/sin table and an even rope_dims <= head_dim");
}

void check_units(const PagedUnits& u, const char* name, bool used) {
  if (!used) return;
  require(u.k && u.v && u.k_scale && u.k_mean && u.v_scale, std::string(name) + ": null pointer");
  require(u.T > 0, std::string(name) + ": tokens per unit must be positive");
  require(aligned(u.k, 16) && aligned(u.v, 16) && aligned(u.v_scale, 8),
          std::string(name) + ": e4m3 storage must be 16-byte aligned (and V scales 8-byte)");
}

// The core for this launch: wgmma where the GPU is sm_90 and _C holds sm_90a SASS (a plain sm_90
// build has no wgmma: its kernels would trap), else mma.sync; the warp-specialized kernel
// (kCoreWs) counts as wgmma here and needs both too.
bool use_wgmma(int core) {
  require(core == kCoreAuto || core == kCoreMmaSync || core == kCoreWgmma || core == kCoreWs, "unknown core");
  if (core == kCoreMmaSync) return false;
  const auto [major, minor] = compute_capability(current_device());
  const bool hopper = major == 9 && minor == 0, sm90a = built_for("90a");
  const std::string what = core == kCoreWs ? "the warp-specialized kernel" : "the wgmma core";
  require(core == kCoreAuto || hopper, what + " needs an sm_90 GPU, this one is sm_" + std::to_string(major * 10 + minor));
  require(core == kCoreAuto || sm90a, what + " needs xjfast._C built for sm_90a (XJFAST_CUDA_ARCHS holds 90a)");
  return hopper && sm90a;
}

// One launch, with the opt-in for the kernel's shared memory (once per device and kernel).
template <auto Kernel, class Args>
void launch_kernel(const Args& a, int smem, dim3 grid, const char* what, cudaStream_t stream) {
  static std::atomic<uint64_t> devices{0};
  allow_dynamic_smem(Kernel, smem, devices);
  run_kernel(Kernel, grid, kThreads, smem, stream, a);
  check(cudaGetLastError(), what);
}

template <typename In, int D, template <int> class CoreT>
void launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  launch_kernel<temporal_attention_kernel<In, D, CoreT>>(a, Layout<D, CoreT<D>>::kBytes,
                                                         dim3((a.qt.Lq + kBlockM - 1) / kBlockM, a.qt.B * a.qt.H),
                                                         "launch of temporal_attention_kernel", stream);
}

template <typename In, int D, template <int> class CoreT>
void launch_mass(const AttentionMassArgs& a, cudaStream_t stream) {
  launch_kernel<attention_mass_kernel<In, D, CoreT>>(a, Layout<D, CoreT<D>>::kBytes,
                                                     dim3((a.cache.T + kBlockN - 1) / kBlockN, a.qt.B * a.qt.H),
                                                     "launch of attention_mass_kernel", stream);
}

size_t element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

template <typename Launch>
void dispatch(int dtype, int D, Launch&& launch) {
  dispatch_float(dtype, "temporal_attention q dtype", [&](auto t) {
    if (D == 64) launch(t, std::integral_constant<int, 64>{});
    else launch(t, std::integral_constant<int, 128>{});
  });
}

}  // namespace

void temporal_attention(const AttentionArgs& a, cudaStream_t stream) {
  const QueryTiles& qt = a.qt;
  check_queries(qt, element_size(qt.dtype));
  require(a.out != nullptr && a.lse != nullptr, "out and lse must not be null");
  require(aligned(a.out, 4) && a.so[0] % 2 == 0 && a.so[1] % 2 == 0 && a.so[2] % 2 == 0,
          "out must be 4-byte aligned with even strides");
  require(a.n_pages >= 0 && a.n_sinks >= 0 && a.n_sinks <= a.n_pages && a.keep_count >= 0,
          "expected 0 <= n_sinks <= n_pages and keep_count >= 0");
  require(a.n_pages == 0 || a.page_table != nullptr, "page_table must not be null with cached pages");
  require(a.n_pages <= a.cache.count, "the page table lists " + std::to_string(a.n_pages) +
                                          " pages, the cache holds " + std::to_string(a.cache.count));
  check_units(a.cache, "cache", a.n_pages > 0);
  check_units(a.keep, "keep buffer", a.keep_count > 0);
  require(a.keep_count <= a.keep.T, "keep_count exceeds the keep buffer");
  check_units(a.pass, "pass units", true);
  require(a.n_units > 0 && static_cast<int64_t>(a.n_units) * a.pass.T == qt.Lq,
          "the pass units must cover Lq exactly");
  require(!a.causal || (a.private_blocks != nullptr && a.block_tokens > 0 && qt.Lq % a.block_tokens == 0 &&
                        a.block_tokens % a.pass.T == 0),
          "a block-causal mask needs block_tokens dividing Lq, whole pass units per block and the private flags");
  const bool wgmma = use_wgmma(a.core);
  if (a.core == kCoreWs) return temporal_attention_ws(a, stream);
  dispatch(qt.dtype, qt.D, [&](auto t, auto d) {
    if (wgmma) launch_attention<decltype(t), decltype(d)::value, WgmmaCore>(a, stream);
    else launch_attention<decltype(t), decltype(d)::value, MmaSyncCore>(a, stream);
  });
}

void attention_mass(const AttentionMassArgs& a, cudaStream_t stream) {
  check_queries(a.qt, element_size(a.qt.dtype));
  require(a.lse != nullptr && a.mass != nullptr, "lse and mass must not be null");
  check_units(a.cache, "cache", true);
  require(a.page_table != nullptr && a.table_index >= 0 && a.slot >= 0 && a.window >= 0,
          "the page table must not be null, table_index, slot and window must be >= 0");
  const bool wgmma = use_wgmma(a.core);  // the warp-specialized attention's mass: the wgmma kernel
  dispatch(a.qt.dtype, a.qt.D, [&](auto t, auto d) {
    if (wgmma) launch_mass<decltype(t), decltype(d)::value, WgmmaCore>(a, stream);
    else launch_mass<decltype(t), decltype(d)::value, MmaSyncCore>(a, stream);
  });
}

}  // namespace xjfast
