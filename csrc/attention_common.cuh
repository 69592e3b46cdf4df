// What the attention kernels share (temporal_attention.cu: one warpgroup per 64-query tile with
// cp.async; temporal_attention_ws.cu: TMA producer + two consumer warpgroups): the query tile's
// rotation and quantization, the key units, the online softmax step over a 64-key tile, O's
// V-scale units and the output rows. A "group" here is one warpgroup of 128 threads that syncs on
// its own named barrier (barrier 0 = the whole CTA when the CTA is that warpgroup).
#pragma once

#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

#include "attention_cores.cuh"
#include "dtypes.cuh"
#include "mma_fragments.cuh"
#include "temporal_attention.h"

namespace xjfast {

constexpr int kGroupThreads = 128, kGroupWarps = 4;
constexpr int kBlockM = kCoreBlockM;  // the Q quantization tile (xjfast.ops.temporal_attention.Q_TILE)
constexpr int kBlockN = kCoreBlockN;
static_assert(kBlockN == kAttentionBlockN, "the step the reference simulates");
constexpr float kMinScale = 1e-12f, kPScale = 448.f;
constexpr float kLog2PScale = 8.807354922057604f;  // log2(kPScale): P's scale, folded into the exponent
constexpr float kLn2 = 0.69314718055994531f, kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void group_sync(int barrier) {
  if (barrier == 0) __syncthreads();  // a one-warpgroup CTA
#ifdef XJ_SIMT
  else xj_simt::named_barrier(barrier, kGroupThreads);
#else
  else asm volatile("bar.sync %0, %1;\n" ::"r"(barrier), "n"(kGroupThreads) : "memory");
#endif
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- the query tile ----------------------------------------------------------------------------
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

// frame_lags of query row `row`: how many of the oldest window frames its frame does not see, the
// sinks and the keep buffer being as many slots nearer to it (0 without lags, and past Lq).
__device__ __forceinline__ int row_lag(const QueryTiles& qt, int row) {
  return qt.frame_lags != nullptr && row < qt.Lq ? __ldg(qt.frame_lags + row / qt.unit_T) : 0;
}

// Channels seg*16..seg*16+15 of query row `row` (zeros past Lq), temporally rotated by
// (the row's slot - unit_slot), less the row's lag for an `anchored` unit (a sink, the keep
// buffer): pairs (2j, 2j+1) by the table's cos/sin, as the Triton kernel does.
template <typename In, int D>
__device__ __forceinline__ void rotated_segment(const QueryTiles& qt, const In* q_bh, int row, int seg,
                                                int unit_slot, bool anchored, float (&x)[16]) {
  if (row >= qt.Lq) {
#pragma unroll
    for (int j = 0; j < 16; ++j) x[j] = 0.f;
    return;
  }
  load_segment<In>(q_bh + row * qt.sq[1] + seg * 16, x);
  if (seg * 16 < qt.rope_dims) {  // past the temporal channels the table is the identity
    const int delta =
        qt.first_slot + __ldg(qt.frame_slots + row / qt.unit_T) - unit_slot - (anchored ? row_lag(qt, row) : 0);
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

// Where a group's query tile lives in shared memory: the e4m3 tile (the core's layout), q.mean
// partial sums [64][D / 16] and per-row results [64], the warps' amax [4].
struct QueryScratch {
  uint8_t* q;
  float* part;
  float* mean;
  float* warp_max;
};

// The query tile of rows m0..m0+63, rotated for one unit (at `unit_slot`, `anchored` or not, as
// rotated_segment) and quantized with one scale, into
// scratch.q (e4m3); scratch.mean[r] = (rotated q_r . k_mean) * sm_scale_log2. Returns its scale.
// Run by one group (its 128 threads, syncing on `barrier`). Two passes over the tile (the
// second re-reads q from L1/L2): the scale needs the whole tile's amax, and holding 64 rotated
// values per thread would cost the registers the accumulators need.
template <typename In, int D, class Core>
__device__ __forceinline__ float prepare_query_tile(const QueryTiles& qt, const In* q_bh, int m0, int unit_slot,
                                                   bool anchored, const float* k_mean, const QueryScratch& scratch,
                                                   int barrier) {
  constexpr int kSegs = D / 16;
  uint8_t* s_q = scratch.q;
  float *s_part = scratch.part, *s_qmean = scratch.mean, *s_warp_max = scratch.warp_max;
  const int warp = threadIdx.x % kGroupThreads / 32, lane = threadIdx.x % 32;
  // which (row, segment) an item is, and where its partial sum goes: the order whose stores of the
  // quantized tile hit distinct banks (padded rows: as items come; core matrices: query_item)
  const auto item_of = [](int item, int& row, int& seg) {
    if constexpr (Core::kCoreMatrixQ) {
      query_item(item, kGroupThreads, kSegs, row, seg);
    } else {
      row = item / kSegs, seg = item % kSegs;
    }
  };
  const auto part_of = [](int row, int seg) { return Core::kCoreMatrixQ ? seg * kBlockM + row : row * kSegs + seg; };
  float amax = 0.f;
  for (int item = threadIdx.x % kGroupThreads; item < kBlockM * kSegs; item += kGroupThreads) {
    int row, seg;
    item_of(item, row, seg);
    float x[16];
    rotated_segment<In, D>(qt, q_bh, m0 + row, seg, unit_slot, anchored, x);
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) dot += x[j] * __ldg(k_mean + seg * 16 + j), amax = fmaxf(amax, fabsf(x[j]));
    s_part[part_of(row, seg)] = dot;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (lane == 0) s_warp_max[warp] = amax;
  group_sync(barrier);
#pragma unroll
  for (int w = 0; w < kGroupWarps; ++w) amax = fmaxf(amax, s_warp_max[w]);
  const float q_scale = fmaxf(amax, kMinScale * kE4M3Max) / kE4M3Max;
  for (int item = threadIdx.x % kGroupThreads; item < kBlockM * kSegs; item += kGroupThreads) {
    int row, seg;
    item_of(item, row, seg);
    float x[16];
    rotated_segment<In, D>(qt, q_bh, m0 + row, seg, unit_slot, anchored, x);
    uint4 packed;  // x / q_scale by true division: the same e4m3 roundings as the reference
    packed.x = pack_e4m3(x[0] / q_scale, x[1] / q_scale, x[2] / q_scale, x[3] / q_scale);
    packed.y = pack_e4m3(x[4] / q_scale, x[5] / q_scale, x[6] / q_scale, x[7] / q_scale);
    packed.z = pack_e4m3(x[8] / q_scale, x[9] / q_scale, x[10] / q_scale, x[11] / q_scale);
    packed.w = pack_e4m3(x[12] / q_scale, x[13] / q_scale, x[14] / q_scale, x[15] / q_scale);
    *reinterpret_cast<uint4*>(s_q + Core::chunk_offset(row, seg)) = packed;
  }
  if constexpr (Core::kAsyncProxy) fence_proxy_async();
  if (threadIdx.x % kGroupThreads < kBlockM) {
    float dot = 0.f;
#pragma unroll
    for (int seg = 0; seg < kSegs; ++seg) dot += s_part[part_of(threadIdx.x % kGroupThreads, seg)];
    s_qmean[threadIdx.x % kGroupThreads] = dot * qt.sm_scale_log2;
  }
  group_sync(barrier);
  return q_scale;
}

// ---- key units ---------------------------------------------------------------------------------
// One key unit as the kernels read it.
struct Unit {
  const uint8_t* k;
  const uint8_t* v;
  int64_t stride;      // bytes between keys
  int tokens;
  float k_scale;
  const float* k_mean;
  const float* v_scale;
  int slot;
  bool anchored;       // a sink or the keep buffer: frame_lags bring it nearer (rotated_segment)
};

__device__ __forceinline__ Unit paged_unit(const PagedUnits& u, int64_t unit, int b, int h, int B, int H, int D,
                                           int tokens, int slot) {
  const int64_t bh = (unit * B + b) * H + h;
  const int64_t base = ((unit * B + b) * u.T * H + h) * D;
  return Unit{u.k + base, u.v + base, static_cast<int64_t>(H) * D, tokens, __ldg(u.k_scale + bh),
              u.k_mean + bh * D, u.v_scale + bh * D, slot, false};
}

// Key unit ui of the walk in slot order: sink pages, the keep buffer, window pages, the pass's
// frames. `source` 0 = cache page, 1 = keep buffer, 2 = pass unit; `index` its unit in that storage;
// `window` a window page's index among them (0 the oldest; -1 for the other units).
struct UnitRef {
  int source, index, pass_unit, window;
};

__device__ __forceinline__ UnitRef unit_ref(const AttentionArgs& a, int ui) {
  const int keep_units = a.keep_count > 0 ? 1 : 0;
  const int cached_units = a.n_pages + keep_units;
  if (ui >= cached_units) return {2, ui - cached_units, ui - cached_units, -1};
  if (keep_units && ui == a.n_sinks) return {1, 0, -1, -1};
  const int table_index = ui - (ui > a.n_sinks ? keep_units : 0);
  return {0, __ldg(a.page_table + table_index), -1, table_index >= a.n_sinks ? table_index - a.n_sinks : -1};
}

__device__ __forceinline__ int unit_count(const AttentionArgs& a) {
  return a.n_pages + (a.keep_count > 0 ? 1 : 0) + a.n_units;
}

__device__ __forceinline__ Unit unit_of(const AttentionArgs& a, const UnitRef& ref, int ui, int b, int h, int D) {
  const QueryTiles& qt = a.qt;
  Unit unit;
  if (ref.source == 0) unit = paged_unit(a.cache, ref.index, b, h, qt.B, qt.H, D, a.cache.T, ui);
  else if (ref.source == 1) unit = paged_unit(a.keep, 0, b, h, qt.B, qt.H, D, a.keep_count, ui);
  else return paged_unit(a.pass, ref.index, b, h, qt.B, qt.H, D, a.pass.T, qt.first_slot + __ldg(qt.frame_slots + ref.index));
  unit.anchored = ref.window < 0;
  return unit;
}

// Block-causal visibility of pass unit u to query row `row`: its own block, or an earlier one
// that is not private.
__device__ __forceinline__ bool unit_visible(const AttentionArgs& a, int u, int row) {
  if (!a.causal) return true;
  const int unit_block = u * a.pass.T / a.block_tokens, row_block = row / a.block_tokens;
  return row_block == unit_block || (unit_block < row_block && a.private_blocks[unit_block] == 0);
}

// Whether query row `row` sees unit `ref`: a pass unit as the block mask says, a window page
// unless the row lags past it (frame_lags), the sinks and the keep buffer always.
__device__ __forceinline__ bool row_sees(const AttentionArgs& a, const UnitRef& ref, int row) {
  if (ref.source == 2) return unit_visible(a, ref.pass_unit, row);
  return ref.window < 0 || row_lag(a.qt, row) <= ref.window;
}

// Whether any of rows r0..r1-1 sees pass unit u (the whole calling warp gets the answer).
__device__ __forceinline__ bool warp_sees_unit(const AttentionArgs& a, int u, int r0, int r1) {
  bool any = false;
  for (int r = r0 + threadIdx.x % 32; r < r1; r += 32) any |= unit_visible(a, u, r);
  return __any_sync(0xffffffffu, any);
}

// V tile [64 keys][D] -> the core's V^T tile [D channels][64 positions], positions ordered by
// key_of_position; byte c of key r of the V tile is at v_offset(r, c). Each thread (tid of
// `threads`, a multiple of 32, warps aligned on 32) moves 4 positions x 4 channels: four 32-bit
// loads, a byte transpose, four stores, in the order transpose_item and write_rotation give
// (free of bank conflicts).
template <int D, class Core, class VOffset>
__device__ __forceinline__ void transpose_value_tile(const uint8_t* s_v, VOffset v_offset, uint8_t* s_vt, int tid,
                                                     int threads) {
  for (int item = tid; item < kBlockN / 4 * (D / 4); item += threads) {
    int p, c, key[4];
    transpose_item(item, D, p, c, key);
    uint32_t w[4], out[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = *reinterpret_cast<const uint32_t*>(s_v + v_offset(key[i], c));
    transpose_4x4_bytes(w, out);
    const int rotation = write_rotation(c);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // channel c + jj, selected without indexing registers at run time
      const int jj = (j + rotation) & 3;
      const uint32_t word = jj == 0 ? out[0] : jj == 1 ? out[1] : jj == 2 ? out[2] : out[3];
      *reinterpret_cast<uint32_t*>(s_vt + Core::vt_offset(c + jj, p)) = word;
    }
  }
  if constexpr (Core::kAsyncProxy) fence_proxy_async();
}

// 2^x on the SFU alone (ex2.approx.ftz, 2^-inf = 0): exp2f wraps each call in a range check and
// two multiplies to produce results below 2^-126, which neither P (rounded to e4m3 after its
// 448: nothing below 2^-9 survives) nor the rescale factors need.
__device__ __forceinline__ float exp2_sfu(float x) {
#ifdef XJ_SIMT
  const float y = exp2f(x);
  return y < FLT_MIN ? 0.f : y;  // ftz
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---- the online softmax over one 64-key tile ----------------------------------------------------
// Per thread: accumulator rows g and g + 8 of its warp's 16, O in the m16n8 layout.
template <int D>
struct SoftmaxState {
  float o[D / 8][4];
  float m[2], l[2];
  __device__ void init() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }
  // O in a unit's V-scale units (times P's 448) while the unit is read: each P.V accumulates in
  // place; to_value_units(v_scale, false) brings it back.
  __device__ void to_value_units(const float* v_scale, bool into) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const float2 vs = *reinterpret_cast<const float2*>(v_scale + i * 8 + 2 * t);
      const float x = into ? kPScale / vs.x : vs.x / kPScale, y = into ? kPScale / vs.y : vs.y / kPScale;
      o[i][0] *= x, o[i][1] *= y, o[i][2] *= x, o[i][3] *= y;
    }
  }
};

// S (raw Q.K^T of keys n0..n0+63) -> P * 448 rounded to e4m3 as the P.V product's A operand, with
// the running max and sum of rows g, g+8 updated (exp2 domain) and the factor `alpha` by which
// their O is to be rescaled (by the core's accumulate_pv, which may fuse it with its sum). Rows
// that do not see the unit (`visible`) get a -inf bias, and their scores are masked too (a NaN
// score of a key they may not see, from a NaN in K, would otherwise make a NaN weight: -inf + NaN
// is NaN), so with kWholeTiles only a partial tile (keys past `tokens`) or one that some of this
// thread's rows may not see masks element by element (the mma.sync core masks every tile: one
// version of its key loop). P's 448 is folded into the exponent, 2^(s - m + log2 448), and l
// takes P's sum / 448.
template <int D, bool kWholeTiles>
__device__ __forceinline__ void softmax_tile(float (&s)[kBlockN / 8][4], int n0, int tokens, const bool (&visible)[2],
                                             float score_scale, const float (&q_mean)[2], SoftmaxState<D>& st,
                                             uint32_t (&pa)[kBlockN / 32][4], float (&alpha)[2]) {
  const int t = threadIdx.x % 4;
  const float bias[2] = {visible[0] ? q_mean[0] : -INFINITY, visible[1] ? q_mean[1] : -INFINITY};
  // and a row that may not see the unit does not take its scale either: a NaN scale (a NaN key
  // committed by a backend whose scales keep it) would make its -inf scores NaN
  const float row_scale[2] = {visible[0] ? score_scale : 1.f, visible[1] ? score_scale : 1.f};
  // A row's scores are s * score_scale + bias, score_scale > 0: the max is taken on the raw
  // scores, and each exponent is one FMA (scale, bias and max folded per row).
  float tile_max[2] = {-INFINITY, -INFINITY};
  if (kWholeTiles && n0 + kBlockN <= tokens && visible[0] && visible[1]) {  // a whole tile both rows see: no mask
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool live = visible[e / 2] && n0 + j * 8 + 2 * t + (e & 1) < tokens;
        s[j][e] = live ? s[j][e] : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
      }
    }
  }
  float offset[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(st.m[r], quad_max(tile_max[r]) * row_scale[r] + bias[r]);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen no key yet
    alpha[r] = exp2_sfu(st.m[r] - m_safe);
    offset[r] = bias[r] - (m_safe - kLog2PScale);  // -inf for a row that may not see the unit
    st.m[r] = m_new;
    st.l[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = exp2_sfu(fmaf(s[j][e], row_scale[e / 2], offset[e / 2]));  // P * 448
      row_sum[e / 2] += s[j][e];
    }
  }
  // this thread's columns; the quad is summed at the end
  st.l[0] += row_sum[0] * (1.f / kPScale), st.l[1] += row_sum[1] * (1.f / kPScale);
#pragma unroll
  for (int kc = 0; kc < kBlockN / 32; ++kc) p_fragment(s + 4 * kc, 1.f, pa[kc]);
}

// Normalize and write rows[0], rows[1] of (b, h); the LSE in natural log.
template <typename In, int D>
__device__ __forceinline__ void store_rows(const AttentionArgs& a, int b, int h, const int (&rows)[2],
                                           const SoftmaxState<D>& st) {
  const int t = threadIdx.x % 4;
  In* out_bh = static_cast<In*>(a.out) + b * a.so[0] + h * a.so[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(st.l[r]);
    if (rows[r] >= a.qt.Lq) continue;
    const float inv = total > 0.f ? 1.f / total : 0.f;  // a row that saw no key: 0 (its LSE -inf)
    In* out_row = out_bh + rows[r] * a.so[1];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      out_row[i * 8 + 2 * t] = from_float<In>(st.o[i][2 * r] * inv);
      out_row[i * 8 + 2 * t + 1] = from_float<In>(st.o[i][2 * r + 1] * inv);
    }
    if (t == 0) a.lse[(static_cast<int64_t>(b) * a.qt.H + h) * a.qt.Lq + rows[r]] = (st.m[r] + log2f(total)) * kLn2;
  }
}

}  // namespace xjfast
