// Where the operands of mma.sync m16n8k32 (e4m3) come from: the shared-memory rows each lane
// points ldmatrix at, the key order of the P operand built from S accumulators, and the byte
// transpose that gives V that order. __host__ __device__ so that tests/test_csrc_host.py runs
// this very code against the PTX ISA's fragment layouts on the host (csrc/host_tests.cpp).
//
// The layouts (PTX ISA, mma.m16n8k32 with .e4m3; g = lane / 4, t = lane % 4):
//   A (16 x 32): reg0 = row g, bytes 4t..4t+3; reg1 = row g+8, same bytes; reg2, reg3 = bytes +16.
//   B (32 x 8):  reg0 = column g, k = 4t..4t+3; reg1 = k + 16.
//   C (16 x 8):  c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g+8.
// ldmatrix.x4 (b16): lane l gives the address of row l % 8 of matrix l / 8; each lane receives,
// of each matrix, bytes 4(l%4)..4(l%4)+3 of its row l / 4 — one e4m3 operand register.
// wgmma (sm_90a) m64nNk32 e4m3: the accumulators and an A operand in registers follow the same
// per-warp layouts, warp w of the warpgroup holding rows 16w..16w+15; operands in shared memory
// are read through descriptors (core_matrix_offset, wgmma_descriptor).
#pragma once

#include <cstdint>

#include "e4m3.cuh"
#include "host_device.h"

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

namespace xjfast {

// A operand from a row-major tile (rows = M, bytes = K): matrices rows 0-7 | rows 8-15 of bytes
// 0-15, then the same of bytes 16-31 (reg0..reg3).
XJ_HD int a_fragment_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
XJ_HD int a_fragment_byte(int lane) { return (lane >> 4) * 16; }

// B operands of two n-tiles from a tile whose rows are N (keys, or channels of V^T) and bytes K:
// rows 0-7 of bytes 0-15 | 16-31 (reg0, reg1 of the first n-tile), then rows 8-15 (the second).
XJ_HD int b_fragment_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
XJ_HD int b_fragment_byte(int lane) { return ((lane >> 3) & 1) * 16; }

// Which key of a 16-key group sits at position p of the P operand. Lane (g, t) holds the S
// accumulators of keys 2t, 2t+1 of each 8-key n-tile; packed as they are, two n-tiles per
// register (positions 4t..4t+3), they give this order. V^T's columns are stored in it.
XJ_HD int key_of_position(int p) {
  const int t = p >> 2, i = p & 3;
  return 2 * t + (i & 1) + 8 * (i >> 1);
}

XJ_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, selector);
#else
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t out = 0;
  for (int n = 0; n < 4; ++n) out |= static_cast<uint32_t>((bytes >> (8 * ((selector >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return out;
#endif
}

// Four words (4 bytes each, say 4 channels of 4 keys) -> four words (4 keys of each channel).
XJ_HD void transpose_4x4_bytes(const uint32_t (&w)[4], uint32_t (&out)[4]) {
  const uint32_t t0 = byte_perm(w[0], w[1], 0x5140), t1 = byte_perm(w[0], w[1], 0x7362);
  const uint32_t t2 = byte_perm(w[2], w[3], 0x5140), t3 = byte_perm(w[2], w[3], 0x7362);
  out[0] = byte_perm(t0, t2, 0x5410), out[1] = byte_perm(t0, t2, 0x7632);
  out[2] = byte_perm(t1, t3, 0x5410), out[3] = byte_perm(t1, t3, 0x7632);
}

// Four floats -> four e4m3 bytes, round to nearest even, saturating; the first in the lowest byte.
XJ_HD uint32_t pack_e4m3(float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__)
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
#else
  return static_cast<uint32_t>(float_to_e4m3(a)) | (static_cast<uint32_t>(float_to_e4m3(b)) << 8) |
         (static_cast<uint32_t>(float_to_e4m3(c)) << 16) | (static_cast<uint32_t>(float_to_e4m3(d)) << 24);
#endif
}

// The P operand of 32 keys (A, 16 x 32) from the S accumulators s[0..3] of their four n-tiles, each
// value times `scale` (P's 448) before its rounding; key order per key_of_position.
XJ_HD void p_fragment(const float (*s)[4], float scale, uint32_t (&a)[4]) {
  a[0] = pack_e4m3(s[0][0] * scale, s[0][1] * scale, s[1][0] * scale, s[1][1] * scale);
  a[1] = pack_e4m3(s[0][2] * scale, s[0][3] * scale, s[1][2] * scale, s[1][3] * scale);
  a[2] = pack_e4m3(s[2][0] * scale, s[2][1] * scale, s[3][0] * scale, s[3][1] * scale);
  a[3] = pack_e4m3(s[2][2] * scale, s[2][3] * scale, s[3][2] * scale, s[3][3] * scale);
}

// Item `item` of the V-tile transpose (a tile of `channels` channels, 4 positions x 4 channels per
// item): its first position p, first channel c, and the keys of positions p..p+3. The 32
// consecutive items of a warp take 4 position groups (one 16-key block) x 8 channel groups: their
// 4-byte reads of V rows, plain or swizzled, fall in 32 distinct banks (but for rows of 64
// swizzled bytes: 2 per bank), and so do their writes of V^T rows when each item writes its
// channels starting at write_rotation(c) (host_tests banks).
XJ_HD void transpose_item(int item, int channels, int& p, int& c, int (&key)[4]) {
  const int lane = item % 32, block = item / 32, channel_blocks = channels / 32;
  p = ((block / channel_blocks) * 4 + lane % 4) * 4;
  c = ((block % channel_blocks) * 8 + lane / 4) * 4;
  for (int i = 0; i < 4; ++i) key[i] = (p & ~15) + key_of_position((p & 15) + i);
}

// Item `item` of a pass of `threads` threads over a query tile of 16-channel segments stored as
// core matrices: each thread keeps one segment (per_segment = threads / segs threads share it)
// and takes rows per_segment apart, so that each quarter warp's 16-byte stores fall on 8
// different rows mod 8, i.e. 8 distinct bank groups (taking consecutive segments of one row, they
// would all fall 128 bytes apart, in one bank group). Per-item values kept in shared memory go
// segment-major, seg * rows + row (host_tests banks).
XJ_HD void query_item(int item, int threads, int segs, int& row, int& seg) {
  const int per_segment = threads / segs, t = item % threads;
  seg = t / per_segment;
  row = t % per_segment + per_segment * (item / threads);
}

// The first of the 4 channels c..c+3 an item writes to V^T: a warp's lanes of one position
// group then write 4 different channel rows at once.
XJ_HD int write_rotation(int c) { return (c / 8) & 3; }

// A wgmma operand in shared memory, K-major and without swizzle, is made of "core matrices" of 8
// rows x 16 bytes stored as 128 contiguous bytes; along K they lie kCoreMatrixBytes apart (the
// descriptor's leading byte offset), from one group of 8 rows to the next `group_stride` apart
// (its stride byte offset). Byte `byte` of row `row` of such a tile:
constexpr int kCoreMatrixBytes = 128;
XJ_HD int core_matrix_offset(int row, int byte, int group_stride) {
  return (row / 8) * group_stride + (byte / 16) * kCoreMatrixBytes + (row % 8) * 16 + byte % 16;
}

// The group stride of a K-major tile with rows of `row_bytes` bytes, core matrices along K adjacent.
XJ_HD constexpr int k_major_group_stride(int row_bytes) { return (row_bytes / 16) * kCoreMatrixBytes; }

// The 64-bit shared-memory matrix descriptor of wgmma: start address, leading and stride byte
// offsets (each in 16-byte units), no swizzle (bits 62-63 zero), base offset 0.
XJ_HD uint64_t wgmma_descriptor(uint32_t smem_address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3FFFF) >> 4) | (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32);
}

// The descriptor of k-step kc (32 bytes along K: two core matrices) of a K-major tile whose groups
// of 8 rows lie `group_stride` bytes apart, core matrices along K adjacent.
XJ_HD uint64_t k_step_descriptor(uint32_t tile_address, int kc, int group_stride) {
  return wgmma_descriptor(tile_address + kc * 2 * kCoreMatrixBytes, kCoreMatrixBytes, group_stride);
}

// TMA's CU_TENSOR_MAP_SWIZZLE_64B / _128B and wgmma's matching modes store a tile of rows of
// `row_bytes` (64 or 128, one swizzle width) with the 16-byte chunks of each row permuted: the chunk
// bits of the address (4 and up) XORed with its bits 7 and up (2 or 3 of them), on a 1024-byte
// aligned tile. Byte `byte` of row `row` of such a tile:
XJ_HD int swizzled_offset(int row, int byte, int row_bytes) {
  const int linear = row * row_bytes + byte;
  return linear ^ (((linear >> 7) & (row_bytes / 16 - 1)) << 4);
}

// The descriptor of k-step kc of a K-major tile TMA wrote with that swizzle: 8-row groups
// 8 * row_bytes apart (stride byte offset), the leading offset unused (one k-step lies inside a
// row), mode 1 (128-byte) or 2 (64-byte) in bits 62-63; the k-step starts kc * 32 bytes into the
// rows and the hardware swizzles the addresses it forms.
XJ_HD uint64_t swizzled_k_step_descriptor(uint32_t tile_address, int kc, int row_bytes) {
  const uint64_t mode = row_bytes == 128 ? 1 : 2;
  return wgmma_descriptor(tile_address + kc * 32, 16, 8 * row_bytes) | (mode << 62);
}

}  // namespace xjfast
