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

#include "attention_cores.cuh"
#include "cuda_check.h"
#include "device_info.h"
#include "dtypes.cuh"
#include "mma_fragments.cuh"
#include "temporal_attention.h"

namespace xjfast {
namespace {

constexpr int kThreads = 128, kWarps = 4;
constexpr int kBlockM = kCoreBlockM;  // the Q quantization tile (xjfast.ops.temporal_attention.Q_TILE)
constexpr int kBlockN = kCoreBlockN;
static_assert(kBlockN == kAttentionBlockN, "the step the reference simulates");
constexpr float kE4M3Max = 448.f, kMinScale = 1e-12f, kPScale = 448.f;
constexpr float kLn2 = 0.69314718055994531f, kLog2e = 1.4426950408889634f;

// ---- shared-memory layout ---------------------------------------------------------------------
template <int D, class Core>
struct Layout {
  static constexpr int kSegs = D / 16;         // 16-channel segments of a query row
  static constexpr int kVRow = D + 16;         // V tiles arrive row-major (padded) for the transpose
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + Core::kQBytes;            // two stages
  static constexpr int kV = kK + 2 * Core::kKBytes;        // two stages
  static constexpr int kVt = kV + 2 * kBlockN * kVRow;
  static constexpr int kPart = kVt + Core::kVtBytes;       // float [kBlockM][kSegs]: q.mean partial sums
  static constexpr int kQMean = kPart + 4 * kBlockM * kSegs;  // float [kBlockM]
  static constexpr int kWarpMax = kQMean + 4 * kBlockM;   // float [kWarps]
  static constexpr int kColSum = kWarpMax + 4 * kWarps;   // float [kWarps][kBlockN] (attention mass only)
  static constexpr int kBytes = kColSum + 4 * kWarps * kBlockN;
  static_assert(kK % 128 == 0 && kV % 128 == 0 && kVt % 128 == 0, "tiles start 128-byte aligned");
};

// ---- PTX ---------------------------------------------------------------------------------------
// 16 bytes global -> shared, bypassing L1; src-size 0 writes zeros (keys past a unit's end read as 0).
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

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- inputs ------------------------------------------------------------------------------------
// Two consecutive 16-bit (or one 32-bit) elements of a 32-bit word, as floats.
template <typename In>
__device__ __forceinline__ float2 word_to_float2(uint32_t w);
template <>
__device__ __forceinline__ float2 word_to_float2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));  // exact
}
template <>
__device__ __forceinline__ float2 word_to_float2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}

// 16 consecutive channels of one query row (16-byte aligned), as floats.
template <typename In>
__device__ __forceinline__ void load_segment(const In* p, float (&x)[16]) {
  if constexpr (sizeof(In) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p) + i);
      x[4 * i] = f.x, x[4 * i + 1] = f.y, x[4 * i + 2] = f.z, x[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(p) + i);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = word_to_float2<In>(words[j]);
        x[8 * i + 2 * j] = f.x, x[8 * i + 2 * j + 1] = f.y;
      }
    }
  }
}

// Channels seg*16..seg*16+15 of query row `row` (zeros past Lq), temporally rotated by
// (the row's slot - unit_slot): pairs (2j, 2j+1) by the table's cos/sin, as the Triton kernel does.
template <typename In, int D>
__device__ __forceinline__ void rotated_segment(const QueryTiles& qt, const In* q_bh, int row, int seg,
                                                int unit_slot, float (&x)[16]) {
  if (row >= qt.Lq) {
#pragma unroll
    for (int j = 0; j < 16; ++j) x[j] = 0.f;
    return;
  }
  load_segment<In>(q_bh + row * qt.sq[1] + seg * 16, x);
  if (seg * 16 < qt.rope_dims) {  // past the temporal channels the table is the identity
    const int delta = qt.first_slot + __ldg(qt.frame_slots + row / qt.unit_T) - unit_slot;
    const float* trig = qt.rope + static_cast<int64_t>(delta + qt.rope_center) * D + seg * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float c = __ldg(trig + j), s = __ldg(trig + D / 2 + j);
      const float a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = a * c - b * s;
      x[2 * j + 1] = a * s + b * c;
    }
  }
}

// Where a CTA's query tile lives in shared memory: the e4m3 tile, q.mean partial sums and per-row
// results, the warps' amax.
struct QueryScratch {
  uint8_t* q;
  float* part;
  float* mean;
  float* warp_max;
};

template <int D, class Core>
__device__ __forceinline__ QueryScratch query_scratch(uint8_t* smem) {
  using L = Layout<D, Core>;
  return {smem + L::kQ, reinterpret_cast<float*>(smem + L::kPart), reinterpret_cast<float*>(smem + L::kQMean),
          reinterpret_cast<float*>(smem + L::kWarpMax)};
}

// The query tile of rows m0..m0+63, rotated for one unit and quantized with one scale, into
// scratch.q (e4m3); scratch.mean[r] = (rotated q_r . k_mean) * sm_scale_log2. Returns its scale.
// Two passes over the tile (the second re-reads q from L1/L2): the scale needs the whole tile's
// amax, and holding 64 rotated values per thread would cost the registers the accumulators need.
template <typename In, int D, class Core>
__device__ float prepare_query_tile(const QueryTiles& qt, const In* q_bh, int m0, int unit_slot,
                                    const float* k_mean, const QueryScratch& scratch) {
  using L = Layout<D, Core>;
  uint8_t* s_q = scratch.q;
  float *s_part = scratch.part, *s_qmean = scratch.mean, *s_warp_max = scratch.warp_max;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float amax = 0.f;
  for (int item = threadIdx.x; item < kBlockM * L::kSegs; item += kThreads) {
    const int row = item / L::kSegs, seg = item % L::kSegs;
    float x[16];
    rotated_segment<In, D>(qt, q_bh, m0 + row, seg, unit_slot, x);
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) dot += x[j] * __ldg(k_mean + seg * 16 + j), amax = fmaxf(amax, fabsf(x[j]));
    s_part[item] = dot;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (lane == 0) s_warp_max[warp] = amax;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, s_warp_max[w]);
  const float q_scale = fmaxf(amax, kMinScale * kE4M3Max) / kE4M3Max;
  for (int item = threadIdx.x; item < kBlockM * L::kSegs; item += kThreads) {
    const int row = item / L::kSegs, seg = item % L::kSegs;
    float x[16];
    rotated_segment<In, D>(qt, q_bh, m0 + row, seg, unit_slot, x);
    uint4 packed;  // x / q_scale by true division: the same e4m3 roundings as the reference
    packed.x = pack_e4m3(x[0] / q_scale, x[1] / q_scale, x[2] / q_scale, x[3] / q_scale);
    packed.y = pack_e4m3(x[4] / q_scale, x[5] / q_scale, x[6] / q_scale, x[7] / q_scale);
    packed.z = pack_e4m3(x[8] / q_scale, x[9] / q_scale, x[10] / q_scale, x[11] / q_scale);
    packed.w = pack_e4m3(x[12] / q_scale, x[13] / q_scale, x[14] / q_scale, x[15] / q_scale);
    *reinterpret_cast<uint4*>(s_q + Core::chunk_offset(row, seg)) = packed;
  }
  if constexpr (Core::kAsyncProxy) fence_proxy_async();
  if (threadIdx.x < kBlockM) {
    float dot = 0.f;
#pragma unroll
    for (int seg = 0; seg < L::kSegs; ++seg) dot += s_part[threadIdx.x * L::kSegs + seg];
    s_qmean[threadIdx.x] = dot * qt.sm_scale_log2;
  }
  __syncthreads();
  return q_scale;
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

// V tile [64 keys][D] (row-major) -> the core's V^T tile [D channels][64 positions], positions
// ordered by key_of_position. Each thread moves 4 positions x 4 channels: four 32-bit loads, a
// byte transpose, four stores.
template <int D, class Core>
__device__ __forceinline__ void transpose_value_tile(const uint8_t* s_v, uint8_t* s_vt) {
  for (int item = threadIdx.x; item < kBlockN / 4 * (D / 4); item += kThreads) {
    int p, c, key[4];
    transpose_item(item, kBlockN, p, c, key);
    uint32_t w[4], out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = *reinterpret_cast<const uint32_t*>(s_v + key[i] * Layout<D, Core>::kVRow + c);
    transpose_4x4_bytes(w, out);
#pragma unroll
    for (int j = 0; j < 4; ++j) *reinterpret_cast<uint32_t*>(s_vt + Core::vt_offset(c + j, p)) = out[j];
  }
  if constexpr (Core::kAsyncProxy) fence_proxy_async();
}

// One key unit as the kernel reads it.
struct Unit {
  const uint8_t* k;
  const uint8_t* v;
  int64_t stride;      // bytes between keys
  int tokens;
  float k_scale;
  const float* k_mean;
  const float* v_scale;
  int slot;
};

__device__ __forceinline__ Unit paged_unit(const PagedUnits& u, int64_t unit, int b, int h, int B, int H, int D,
                                           int tokens, int slot) {
  const int64_t bh = (unit * B + b) * H + h;
  const int64_t base = ((unit * B + b) * u.T * H + h) * D;
  return Unit{u.k + base, u.v + base, static_cast<int64_t>(H) * D, tokens, __ldg(u.k_scale + bh),
              u.k_mean + bh * D, u.v_scale + bh * D, slot};
}

template <typename In, int D, template <int> class CoreT>
__global__ void __launch_bounds__(kThreads) temporal_attention_kernel(const AttentionArgs a) {
  using Core = CoreT<D>;
  using L = Layout<D, Core>;
  extern __shared__ __align__(128) uint8_t smem[];  // tile bases stay 128-byte aligned
  const QueryScratch scratch = query_scratch<D, Core>(smem);
  uint8_t* s_vt = smem + L::kVt;

  const QueryTiles& qt = a.qt;
  const int m0 = blockIdx.x * kBlockM, b = blockIdx.y / qt.H, h = blockIdx.y % qt.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const In* q_bh = static_cast<const In*>(qt.q) + b * qt.sq[0] + h * qt.sq[2];
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this thread's accumulator rows

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const int keep_units = a.keep_count > 0 ? 1 : 0;
  const int cached_units = a.n_pages + keep_units;
  for (int ui = 0; ui < cached_units + a.n_units; ++ui) {
    // ---- the unit: sinks, the keep buffer, window pages, then the pass's frames ----
    Unit unit;
    bool visible[2] = {true, true};
    if (ui < cached_units) {
      const bool is_keep = keep_units && ui == a.n_sinks;
      const int i = ui - (ui > a.n_sinks ? keep_units : 0);  // page-table entry
      unit = is_keep ? paged_unit(a.keep, 0, b, h, qt.B, qt.H, D, a.keep_count, ui)
                     : paged_unit(a.cache, __ldg(a.page_table + i), b, h, qt.B, qt.H, D, a.cache.T, ui);
    } else {
      const int u = ui - cached_units;
      unit = paged_unit(a.pass, u, b, h, qt.B, qt.H, D, a.pass.T, qt.first_slot + __ldg(qt.frame_slots + u));
      if (a.causal) {
        const int unit_block = u * a.pass.T / a.block_tokens;
        const bool hidden = a.private_blocks[unit_block] != 0;
        bool any = false;
        for (int r = m0 + threadIdx.x; r < min(m0 + kBlockM, qt.Lq); r += kThreads) {
          const int row_block = r / a.block_tokens;
          any |= row_block == unit_block || (unit_block < row_block && !hidden);
        }
        if (!__syncthreads_or(any)) continue;  // no row of the tile sees this unit: skip it whole
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row_block = rows[e] / a.block_tokens;
          visible[e] = row_block == unit_block || (unit_block < row_block && !hidden);
        }
      }
    }

    const int tiles = (unit.tokens + kBlockN - 1) / kBlockN;
    const auto k_offset = [](int r, int c) { return Core::chunk_offset(r, c); };
    const auto v_offset = [](int r, int c) { return r * L::kVRow + c * 16; };
    load_tile<D>(smem + L::kK, unit.k, unit.stride, 0, unit.tokens, k_offset);
    load_tile<D>(smem + L::kV, unit.v, unit.stride, 0, unit.tokens, v_offset);
    cp_async_commit();
    const float q_scale = prepare_query_tile<In, D, Core>(qt, q_bh, m0, unit.slot, unit.k_mean, scratch);
    const float q_mean[2] = {scratch.mean[warp * 16 + g], scratch.mean[warp * 16 + g + 8]};
    const float score_scale = q_scale * unit.k_scale * qt.sm_scale_log2;

    // O in this unit's V-scale units (times P's 448) while it is read: each P.V accumulates in place.
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const float2 vs = *reinterpret_cast<const float2*>(unit.v_scale + i * 8 + 2 * t);
      o[i][0] *= kPScale / vs.x, o[i][1] *= kPScale / vs.y, o[i][2] *= kPScale / vs.x, o[i][3] *= kPScale / vs.y;
    }

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
      transpose_value_tile<D, Core>(s_v, s_vt);
      float s[kBlockN / 8][4];
      Core::scores(scratch.q, s_k, s);

      // exp2 online softmax over this tile, rows g and g + 8 of the warp
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool live = n0 + j * 8 + 2 * t + (e & 1) < unit.tokens && visible[e / 2];
          s[j][e] = live ? s[j][e] * score_scale + q_mean[e / 2] : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
        }
      }
      float m_safe[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
        m_safe[r] = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen no key yet
        const float alpha = exp2f(m[r] - m_safe[r]);
        m[r] = m_new;
        l[r] *= alpha;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[i][2 * r] *= alpha, o[i][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j][e] = exp2f(s[j][e] - m_safe[e / 2]);
          row_sum[e / 2] += s[j][e];
        }
      }
      l[0] += row_sum[0], l[1] += row_sum[1];  // this thread's columns; the quad is summed at the end
      uint32_t pa[kBlockN / 32][4];  // P * 448 rounded to e4m3, as the product's A operand
#pragma unroll
      for (int kc = 0; kc < kBlockN / 32; ++kc) p_fragment(s + 4 * kc, kPScale, pa[kc]);
      __syncthreads();  // the transposed V tile is complete
      Core::accumulate_pv(pa, s_vt, o);
      __syncthreads();  // this stage and s_vt are free for the next prefetch and transpose
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const float2 vs = *reinterpret_cast<const float2*>(unit.v_scale + i * 8 + 2 * t);
      o[i][0] *= vs.x / kPScale, o[i][1] *= vs.y / kPScale, o[i][2] *= vs.x / kPScale, o[i][3] *= vs.y / kPScale;
    }
  }

  // ---- normalize and write out rows g, g+8; LSE in natural log ----
  In* out_bh = static_cast<In*>(a.out) + b * a.so[0] + h * a.so[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    if (rows[r] >= qt.Lq) continue;
    const float inv = 1.f / total;
    In* out_row = out_bh + rows[r] * a.so[1];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      out_row[i * 8 + 2 * t] = from_float<In>(o[i][2 * r] * inv);
      out_row[i * 8 + 2 * t + 1] = from_float<In>(o[i][2 * r + 1] * inv);
    }
    if (t == 0) a.lse[(static_cast<int64_t>(b) * qt.H + h) * qt.Lq + rows[r]] = (m[r] + log2f(total)) * kLn2;
  }
}

// One CTA per (64 keys of the page, b, head): every query tile, quantized as the attention did,
// p = exp2(s - lse) summed over the queries, added to mass with atomics (summing the heads too).
template <typename In, int D, template <int> class CoreT>
__global__ void __launch_bounds__(kThreads) attention_mass_kernel(const AttentionMassArgs a) {
  using Core = CoreT<D>;
  using L = Layout<D, Core>;
  extern __shared__ __align__(128) uint8_t smem[];  // tile bases stay 128-byte aligned
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
    const float q_scale = prepare_query_tile<In, D, Core>(qt, q_bh, m0, unit.slot, unit.k_mean, scratch);
    cp_async_wait<0>();
    if constexpr (Core::kAsyncProxy) fence_proxy_async();
    __syncthreads();  // the key tile (first iteration) and the query tile are in shared memory
    float s[kBlockN / 8][4];
    Core::scores(scratch.q, s_k, s);
    const float score_scale = q_scale * unit.k_scale * qt.sm_scale_log2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (row >= qt.Lq) continue;
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
    atomicAdd(a.mass + (static_cast<int64_t>(page) * qt.B + b) * unit.tokens + n0 + threadIdx.x, total);
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

// The core for this launch: wgmma where the GPU is sm_90 (the sm_90a SASS of _C), else mma.sync.
bool use_wgmma(int core) {
  if (core == kCoreMmaSync) return false;
  const auto [major, minor] = compute_capability(current_device());
  const bool hopper = major == 9 && minor == 0;
  require(core != kCoreWgmma || hopper, "the wgmma core needs an sm_90 GPU, this one is sm_" +
                                            std::to_string(major * 10 + minor));
  return hopper;
}

// One launch, with the opt-in for the kernel's shared memory (once per device and kernel).
template <auto Kernel, class Args>
void launch_kernel(const Args& a, int smem, dim3 grid, const char* what, cudaStream_t stream) {
  static std::atomic<uint64_t> devices{0};
  allow_dynamic_smem(Kernel, smem, devices);
  Kernel<<<grid, kThreads, smem, stream>>>(a);
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
  check_units(a.cache, "cache", a.n_pages > 0);
  check_units(a.keep, "keep buffer", a.keep_count > 0);
  require(a.keep_count <= a.keep.T, "keep_count exceeds the keep buffer");
  check_units(a.pass, "pass units", true);
  require(a.n_units > 0 && static_cast<int64_t>(a.n_units) * a.pass.T == qt.Lq,
          "the pass units must cover Lq exactly");
  require(!a.causal || (a.private_blocks != nullptr && a.block_tokens > 0 && qt.Lq % a.block_tokens == 0),
          "a block-causal mask needs block_tokens dividing Lq and the private flags");
  require(a.core == kCoreAuto || a.core == kCoreMmaSync || a.core == kCoreWgmma, "unknown core");
  const bool wgmma = use_wgmma(a.core);
  dispatch(qt.dtype, qt.D, [&](auto t, auto d) {
    if (wgmma) launch_attention<decltype(t), decltype(d)::value, WgmmaCore>(a, stream);
    else launch_attention<decltype(t), decltype(d)::value, MmaSyncCore>(a, stream);
  });
}

void attention_mass(const AttentionMassArgs& a, cudaStream_t stream) {
  check_queries(a.qt, element_size(a.qt.dtype));
  require(a.lse != nullptr && a.mass != nullptr, "lse and mass must not be null");
  check_units(a.cache, "cache", true);
  require(a.page_table != nullptr && a.table_index >= 0 && a.slot >= 0,
          "the page table must not be null, table_index and slot must be >= 0");
  require(a.core == kCoreAuto || a.core == kCoreMmaSync || a.core == kCoreWgmma, "unknown core");
  const bool wgmma = use_wgmma(a.core);
  dispatch(a.qt.dtype, a.qt.D, [&](auto t, auto d) {
    if (wgmma) launch_mass<decltype(t), decltype(d)::value, WgmmaCore>(a, stream);
    else launch_mass<decltype(t), decltype(d)::value, MmaSyncCore>(a, stream);
  });
}

}  // namespace xjfast
