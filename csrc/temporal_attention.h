#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace xjfast {

// Which kernel and tensor-core path: auto (wgmma on sm_90, else mma.sync), one of those two, or
// ws: the warp-specialized sm_90a kernel (TMA + mbarrier pipeline, a producer warpgroup and two
// wgmma consumer warpgroups; temporal_attention_ws.cu).
enum AttentionCore : int { kCoreAuto = 0, kCoreMmaSync = 1, kCoreWgmma = 2, kCoreWs = 3 };

// The query side, shared by the attention and the attention-mass kernels: q [B, Lq, H, D] and how
// each query row finds its temporal slot (first_slot + frame_slots[row / unit_T]).
struct QueryTiles {
  const void* q;
  int64_t sq[3];               // strides (b, token, head), elements; channel stride 1
  int dtype;                   // DType of q (and of the output)
  int B, H, Lq, D;
  int first_slot, unit_T;
  const int32_t* frame_slots;  // [Lq / unit_T]
  const int32_t* frame_lags;   // [Lq / unit_T]: window frames hidden from the unit's rows, or null (none)
  float sm_scale_log2;         // softmax scale times log2(e)
  const float* rope;           // [2 * rope_center + 1, 2, D / 2] cos, sin per slot difference
  int rope_center, rope_dims;  // rope_dims == 0: no temporal rotary
};

// Key units in the page format (e4m3 rows of D bytes, H * D bytes apart; K minus its mean with one
// scale per (unit, b, head); V with one scale per (unit, b, head, channel)).
struct PagedUnits {
  const uint8_t* k;            // [units, B, T, H, D]
  const uint8_t* v;
  const float* k_scale;        // [units, B, H]
  const float* k_mean;         // [units, B, H, D]
  const float* v_scale;        // [units, B, H, D]
  int T;                       // tokens per unit
  int count;                   // units in the storage (the TMA tensor maps' outer extent)
};

struct AttentionArgs {
  QueryTiles qt;
  void* out;                   // like q
  int64_t so[3];
  float* lse;                  // [B, H, Lq], natural log
  PagedUnits cache;            // cached pages, read in slot order through the page table
  const int32_t* page_table;
  int n_pages, n_sinks;
  PagedUnits keep;             // the keep buffer as one unit of keep_count tokens ([1, B, K, H, D])
  int keep_count;
  PagedUnits pass;             // the pass's own frames (mask blocks without a cache), quantized like pages
  int n_units;
  const int8_t* private_blocks;  // per mask block
  int block_tokens;
  bool causal;
  int core;                    // AttentionCore
};

// mass[page, b, t] += sum over heads and queries of softmax(q . k_t) for the keys of one page,
// page = page_table[table_index]: read on the device, so a captured graph follows the ring. Each
// head's sum is added in int64 fixed point (times kMassScale, rounded): integer atomics sum the
// heads to the same total in any order, so the tokens keep_tokens keeps do not vary run to run.
constexpr float kMassScale = 4294967296.0f;  // 2^32 = xjfast.ops.temporal_attention.MASS_SCALE
struct AttentionMassArgs {
  QueryTiles qt;
  const float* lse;            // [B, H, Lq] from the attention launch
  PagedUnits cache;
  const int32_t* page_table;
  int table_index, slot;
  int window;                  // the page's index among the window pages (frame_lags hide the oldest)
  int64_t* mass;               // [P, B, T] fixed point
  int core;                    // AttentionCore
};

void temporal_attention(const AttentionArgs& args, cudaStream_t stream);
// The warp-specialized kernel (an sm_90 GPU; temporal_attention checks the arguments and calls it).
void temporal_attention_ws(const AttentionArgs& args, cudaStream_t stream);
void attention_mass(const AttentionMassArgs& args, cudaStream_t stream);

// The online softmax's step (keys per tile): the reference simulates P's rounding with it.
constexpr int kAttentionBlockN = 64;

}  // namespace xjfast
