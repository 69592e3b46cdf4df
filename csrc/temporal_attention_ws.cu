// temporal_attention, warp-specialized for Hopper (sm_90a): the math of temporal_attention.cu (and
// of the Triton kernel and the reference), with the data movement handed to a producer.
//
// One CTA of three warpgroups per (128-query tile, b, head):
//   producer  warp 0 (one lane) walks the key tiles in slot order and loads each 64-key K and V
//             tile with TMA (cp.async.bulk.tensor, 5-D maps over [units, B, T, H, D] e4m3, the
//             D-byte swizzle) into a ring of kStages stages, each completing on its `full`
//             mbarrier; warps 1-3 transpose each V tile into the V^T layout wgmma needs for P.V
//             (e4m3 operands are K-major only) and signal `vt_full`;
//   consumers two warpgroups of 64 query rows each (one Q quantization tile): per unit they rotate
//             and quantize their tile, then per key tile S = Q.K^T (wgmma, K read straight from the
//             swizzled TMA tile), the exp2 online softmax, O += P.V (wgmma, P from registers), and
//             release the stage on its `empty` mbarrier.
// The two consumer warpgroups share every K/V load and the transpose; while one runs its softmax
// the other's wgmma has the tensor cores. The producer gives registers to the consumers
// (setmaxnreg). Units no query row of the CTA sees are skipped by every role alike.
#include <cuda.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#include "attention_common.cuh"
#include "cuda_check.h"
#include "launch.cuh"
#include "temporal_attention.h"
#include "tma.cuh"

namespace xjfast {
namespace {

constexpr int kConsumers = 2;                      // warpgroups, one 64-row Q tile each
constexpr int kThreads = kGroupThreads * (1 + kConsumers);
constexpr int kTileM = kConsumers * kBlockM;       // query rows per CTA
constexpr int kStages = 4;                         // K/V tiles in flight
enum Source : int { kCache = 0, kKeep = 1, kPass = 2 };  // UnitRef::source

// Tensor maps of the three key-unit families (Source order), then the arguments.
struct WsArgs {
  CUtensorMap k_map[3];
  CUtensorMap v_map[3];
  AttentionArgs a;
};

template <int D>
struct WsLayout {
  static constexpr int kTile = kBlockN * D;                    // bytes of a K, V or V^T tile
  static constexpr int kK = 0;                                 // [kStages] K, as TMA swizzles it
  static constexpr int kV = kK + kStages * kTile;              // [kStages] V, likewise
  static constexpr int kVt = kV + kStages * kTile;             // [kStages] V^T, core matrices
  static constexpr int kQ = kVt + kStages * kTile;             // [kConsumers] Q, core matrices
  static constexpr int kPart = kQ + kConsumers * kBlockM * D;  // float [kConsumers][D / 16][64]
  static constexpr int kQMean = kPart + 4 * kConsumers * kBlockM * (D / 16);  // float [kConsumers][64]
  static constexpr int kWarpMax = kQMean + 4 * kConsumers * kBlockM;         // float [kConsumers][4]
  static constexpr int kBarriers = kWarpMax + 4 * kConsumers * kGroupWarps;  // full, vt_full, empty
  static constexpr int kBytes = kBarriers + 8 * 3 * kStages;
  static constexpr int kAlloc = kBytes + 1024;  // the dynamic base is rounded up to 1024 bytes
  static_assert(kTile % 1024 == 0, "swizzled tiles start 1024-byte aligned");
  static_assert(kBarriers % 8 == 0, "mbarriers are 8-byte aligned");
};

#ifdef XJ_WGMMA
constexpr int kTransposeThreads = kGroupThreads - 32;   // producer warps 1-3
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 * (40 + 2 * 232) <= 64K registers

__device__ __forceinline__ int unit_tokens(const AttentionArgs& a, const UnitRef& ref) {
  return ref.source == kCache ? a.cache.T : ref.source == kKeep ? a.keep_count : a.pass.T;
}

// Whether any query row of the CTA (rows r0..r1-1) sees unit `ref` (the calling warp, converged).
__device__ __forceinline__ bool cta_sees(const AttentionArgs& a, const UnitRef& ref, int r0, int r1) {
  return ref.source != kPass || warp_sees_unit(a, ref.pass_unit, r0, r1);
}
#endif

template <typename In, int D>
__global__ void __launch_bounds__(kThreads, 1) temporal_attention_ws_kernel(const __grid_constant__ WsArgs w) {
#ifdef XJ_WGMMA
  using L = WsLayout<D>;
  using Core = WgmmaCore<D>;
  XJ_DYNAMIC_SHARED(1024, uint8_t, smem_raw);
  uint8_t* smem = smem_raw + ((1024 - smem_u32(smem_raw) % 1024) % 1024);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* vt_full = full + kStages;
  uint64_t* empty = vt_full + kStages;

  const AttentionArgs& a = w.a;
  const QueryTiles& qt = a.qt;
  const int cta_m0 = blockIdx.x * kTileM, cta_m1 = min(cta_m0 + kTileM, qt.Lq);
  const int b = blockIdx.y / qt.H, h = blockIdx.y % qt.H;
  const int group = threadIdx.x / kGroupThreads, warp = threadIdx.x / 32 % kGroupWarps, lane = threadIdx.x % 32;
  const int units = unit_count(a);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full + s, 1);                             // the producer's expect_tx arrival
      mbarrier_init(vt_full + s, kTransposeThreads);
      mbarrier_init(empty + s, kConsumers * kGroupThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (group == 0) {  // ---- producer warpgroup ----
    setmaxnreg_dec<kProducerRegs>();
    int item = 0;  // key tiles so far: stage item % kStages, its round item / kStages
    for (int ui = 0; ui < units; ++ui) {
      const UnitRef ref = unit_ref(a, ui);
      if (!cta_sees(a, ref, cta_m0, cta_m1)) continue;
      const int tokens = unit_tokens(a, ref);
      for (int n0 = 0; n0 < tokens; n0 += kBlockN, ++item) {
        const int stage = item % kStages, round = item / kStages;
        if (warp == 0) {
          if (lane == 0) {
            if (round > 0) mbarrier_wait(empty + stage, (round - 1) & 1);  // the consumers freed it
            mbarrier_arrive_expect_tx(full + stage, 2 * L::kTile);
            const int coords[5] = {0, h, n0, b, ref.index};
            tma_load_5d(&w.k_map[ref.source], smem + L::kK + stage * L::kTile, coords, full + stage);
            tma_load_5d(&w.v_map[ref.source], smem + L::kV + stage * L::kTile, coords, full + stage);
          }
          __syncwarp();
        } else {
          mbarrier_wait(full + stage, round & 1);
          transpose_value_tile<D, Core>(
              smem + L::kV + stage * L::kTile, [](int r, int c) { return swizzled_offset(r, c, D); },
              smem + L::kVt + stage * L::kTile, threadIdx.x - 32, kTransposeThreads);
          mbarrier_arrive(vt_full + stage);
        }
      }
    }
    return;
  }

  // ---- consumer warpgroups ----
  setmaxnreg_inc<kConsumerRegs>();
  const int c = group - 1, m0 = cta_m0 + c * kBlockM, g = lane / 4;
  const QueryScratch scratch{smem + L::kQ + c * kBlockM * D,
                             reinterpret_cast<float*>(smem + L::kPart) + c * kBlockM * (D / 16),
                             reinterpret_cast<float*>(smem + L::kQMean) + c * kBlockM,
                             reinterpret_cast<float*>(smem + L::kWarpMax) + c * kGroupWarps};
  const In* q_bh = static_cast<const In*>(qt.q) + b * qt.sq[0] + h * qt.sq[2];
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  SoftmaxState<D> st;
  st.init();
  int item = 0;
  for (int ui = 0; ui < units; ++ui) {
    const UnitRef ref = unit_ref(a, ui);
    if (!cta_sees(a, ref, cta_m0, cta_m1)) continue;
    const Unit unit = unit_of(a, ref, ui, b, h, D);
    const bool visible[2] = {row_sees(a, ref, rows[0]), row_sees(a, ref, rows[1])};
    const float q_scale = prepare_query_tile<In, D, Core>(qt, q_bh, m0, unit.slot, unit.anchored, unit.k_mean, scratch,
                                                                1 + c);
    const float q_mean[2] = {scratch.mean[warp * 16 + g], scratch.mean[warp * 16 + g + 8]};
    const float score_scale = q_scale * unit.k_scale * qt.sm_scale_log2;
    st.to_value_units(unit.v_scale, true);
    for (int n0 = 0; n0 < unit.tokens; n0 += kBlockN, ++item) {
      const int stage = item % kStages, round = item / kStages;
      mbarrier_wait(full + stage, round & 1);
      float s[kBlockN / 8][4];
      Core::template scores<true>(scratch.q, smem + L::kK + stage * L::kTile, s);
      uint32_t pa[kBlockN / 32][4];
      float alpha[2];
      softmax_tile<D, true>(s, n0, unit.tokens, visible, score_scale, q_mean, st, pa, alpha);
      mbarrier_wait(vt_full + stage, round & 1);
      Core::accumulate_pv(pa, smem + L::kVt + stage * L::kTile, alpha, st.o);
      mbarrier_arrive(empty + stage);
    }
    st.to_value_units(unit.v_scale, false);
  }
  store_rows<In, D>(a, b, h, rows, st);
#else
  __trap();
#endif
}

// ---- host side ---------------------------------------------------------------------------------
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found through the runtime (_C links no libcuda).
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found),
          "cudaGetDriverEntryPointByVersion(\"cuTensorMapEncodeTiled\")");
    if (found != cudaDriverEntryPointSuccess || p == nullptr)
      throw CudaError(cudaErrorNotSupported, "temporal_attention: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// The map of K or V of a unit family: [units][B][T][H][D] e4m3 as 5-D (D innermost) with `tokens`
// of the storage's T readable (keys past them arrive as zeros), one 64-key box of one (b, head).
// Encoded in place, into the launch's arguments: the driver takes only a 64-byte aligned map, and
// the temporary of a returned CUtensorMap is not reliably aligned (g++ 12 at -O1 put it 32 bytes
// off, alignas(128) notwithstanding: tests/simt's driver refused it; nvcc's -O3 host code happened
// to align it).
void encode_unit_map(CUtensorMap* map, const uint8_t* base, const PagedUnits& u, int tokens, int B, int H, int D) {
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(H), static_cast<cuuint64_t>(tokens),
                              static_cast<cuuint64_t>(B), static_cast<cuuint64_t>(u.count)};
  const cuuint64_t row = static_cast<cuuint64_t>(H) * D;
  const cuuint64_t strides[4] = {static_cast<cuuint64_t>(D), row, row * u.T, row * u.T * B};  // bytes
  const cuuint32_t box[5] = {static_cast<cuuint32_t>(D), 1, kBlockN, 1, 1};
  const cuuint32_t unit_strides[5] = {1, 1, 1, 1, 1};
  const CUresult status = encode_tiled()(
      map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 5, const_cast<uint8_t*>(base), dims, strides, box, unit_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    throw std::invalid_argument("temporal_attention: cuTensorMapEncodeTiled rejected a key-unit map (CUresult " +
                                std::to_string(static_cast<int>(status)) + ")");
}

template <typename In, int D>
void launch(const WsArgs& w, cudaStream_t stream) {
  static std::atomic<uint64_t> devices{0};
  constexpr auto kernel = temporal_attention_ws_kernel<In, D>;
  allow_dynamic_smem(kernel, WsLayout<D>::kAlloc, devices);
  const dim3 grid((w.a.qt.Lq + kTileM - 1) / kTileM, w.a.qt.B * w.a.qt.H);
  run_kernel(kernel, grid, kThreads, WsLayout<D>::kAlloc, stream, w);
  check(cudaGetLastError(), "launch of temporal_attention_ws_kernel");
}

}  // namespace

void temporal_attention_ws(const AttentionArgs& a, cudaStream_t stream) {
  const QueryTiles& qt = a.qt;
  WsArgs w;
  std::memset(&w, 0, sizeof(w));  // the maps of families without units stay unused
  w.a = a;
  const auto family = [&](Source s, const PagedUnits& u, int tokens) {
    encode_unit_map(&w.k_map[s], u.k, u, tokens, qt.B, qt.H, qt.D);
    encode_unit_map(&w.v_map[s], u.v, u, tokens, qt.B, qt.H, qt.D);
  };
  if (a.n_pages > 0) family(kCache, a.cache, a.cache.T);
  if (a.keep_count > 0) family(kKeep, a.keep, a.keep_count);
  family(kPass, a.pass, a.pass.T);
  dispatch_float(qt.dtype, "temporal_attention q dtype", [&](auto t) {
    if (qt.D == 64) launch<decltype(t), 64>(w, stream);
    else launch<decltype(t), 128>(w, stream);
  });
}

}  // namespace xjfast
