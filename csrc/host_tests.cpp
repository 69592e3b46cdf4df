// Host build of the shared __host__ __device__ code, driven by tests/test_csrc_host.py:
//   philox C0 C1 C2 C3 K0 K1      -> the four Philox words (hex)
//   normal SEED FRAME N           -> the first N Gaussians of a latent frame
//   e4m3                          -> reads floats (one per line) from stdin, prints e4m3 bytes
//   fragments SEED                -> one warp of the attention kernel's S = Q.K^T and O = P.V, its
//                                    operands gathered by mma_fragments.cuh from shared-memory tiles
//                                    laid out as the kernel lays them, multiplied per the PTX ISA's
//                                    fragment layouts, against plain matrix products: "ok" or the
//                                    first mismatch
//   wgmma SEED D                  -> the same for the warpgroup's wgmma (sm_90a) path, head_dim D: Q,
//                                    K and V^T tiles in core-matrix layout, read through the
//                                    kernel's descriptors as the PTX ISA defines them, P from registers
//   wgmma-tma SEED D              -> the same with K and V as TMA writes them for the
//                                    warp-specialized kernel (D-byte swizzle)
//   token-offset B C F H W PT PH PW SM0 SM1 SM2 b c f y x
//                                 -> denoise_step's offset of latent element (b, c, f, y, x) in
//                                    model_out's token layout
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <algorithm>
#include <array>
#include <random>
#include <vector>

#include "denoise_layout.h"
#include "e4m3.cuh"
#include "mma_fragments.cuh"
#include "philox.cuh"

namespace {

using Regs4 = uint32_t[32][4];

// ldmatrix.sync.aligned.m8n8.x4.b16: lane l gives row address addr[l] (row l % 8 of matrix l / 8);
// lane l receives bytes 4(l%4)..4(l%4)+3 of row l / 4 of each matrix m, in register m.
void ldmatrix_x4(const std::vector<uint8_t>& smem, const int (&addr)[32], Regs4& r) {
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) memcpy(&r[lane][m], smem.data() + addr[8 * m + lane / 4] + 4 * (lane % 4), 4);
}

uint8_t byte_of(uint32_t w, int i) { return static_cast<uint8_t>(w >> (8 * i)); }

// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 with A = a[lane][0..3] and B = b[lane][lo],
// b[lane][lo + 1], per the PTX ISA's layouts; products and sums in double (exact for e4m3).
void mma(double (&d)[32][4], const Regs4& a, const Regs4& b, int lo) {
  double A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      A[g][4 * t + i] = xjfast::e4m3_to_float(byte_of(a[lane][0], i));
      A[g + 8][4 * t + i] = xjfast::e4m3_to_float(byte_of(a[lane][1], i));
      A[g][16 + 4 * t + i] = xjfast::e4m3_to_float(byte_of(a[lane][2], i));
      A[g + 8][16 + 4 * t + i] = xjfast::e4m3_to_float(byte_of(a[lane][3], i));
      B[4 * t + i][g] = xjfast::e4m3_to_float(byte_of(b[lane][lo], i));
      B[16 + 4 * t + i][g] = xjfast::e4m3_to_float(byte_of(b[lane][lo + 1], i));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      double sum = 0;
      for (int k = 0; k < 32; ++k) sum += A[g + 8 * (e / 2)][k] * B[k][2 * t + (e & 1)];
      d[lane][e] += sum;
    }
  }
}

int check(const char* what, double got, double want, int row, int col) {
  if (got == want) return 0;
  printf("%s mismatch at row %d, column %d: %.9g != %.9g\n", what, row, col, got, want);
  return 1;
}

// One warp, 16 query rows, one 64-key tile, head_dim 128, shared-memory strides as the kernel's.
int fragments(uint32_t seed) {
  constexpr int D = 128, N = 64, kRow = D + 16, kVtRow = N + 16;
  std::mt19937 rng(seed);
  auto code = [&] { uint8_t c = static_cast<uint8_t>(rng()); return (c & 0x7F) == 0x7F ? uint8_t(0x7E) : c; };
  std::vector<uint8_t> s_q(16 * kRow), s_k(N * kRow), s_v(N * kRow), s_vt(D * kVtRow);
  for (int r = 0; r < 16; ++r) for (int c = 0; c < D; ++c) s_q[r * kRow + c] = code();
  for (int n = 0; n < N; ++n) for (int c = 0; c < D; ++c) s_k[n * kRow + c] = code(), s_v[n * kRow + c] = code();
  auto dec = [](uint8_t c) { return static_cast<double>(xjfast::e4m3_to_float(c)); };

  // S = Q.K^T, as query_key_scores gathers it
  static double s[N / 8][32][4] = {};
  for (int kc = 0; kc < D / 32; ++kc) {
    Regs4 qa, b;
    int addr[32];
    for (int l = 0; l < 32; ++l) addr[l] = xjfast::a_fragment_row(l) * kRow + kc * 32 + xjfast::a_fragment_byte(l);
    ldmatrix_x4(s_q, addr, qa);
    for (int p = 0; p < N / 16; ++p) {
      for (int l = 0; l < 32; ++l) addr[l] = (p * 16 + xjfast::b_fragment_row(l)) * kRow + kc * 32 + xjfast::b_fragment_byte(l);
      ldmatrix_x4(s_k, addr, b);
      mma(s[2 * p], qa, b, 0);
      mma(s[2 * p + 1], qa, b, 2);
    }
  }
  int bad = 0;
  for (int j = 0; j < N / 8; ++j)
    for (int l = 0; l < 32 && !bad; ++l)
      for (int e = 0; e < 4 && !bad; ++e) {
        const int row = l / 4 + 8 * (e / 2), key = 8 * j + 2 * (l % 4) + (e & 1);
        double want = 0;
        for (int c = 0; c < D; ++c) want += dec(s_q[row * kRow + c]) * dec(s_k[key * kRow + c]);
        bad |= check("S = Q.K^T", s[j][l][e], want, row, key);
      }

  // O = e4m3(P * 448) . V, P held in the S accumulators' layout, V transposed as the kernel does
  float p[32][N / 8][4];
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (auto& lane : p) for (auto& tile : lane) for (float& x : tile) x = unit(rng);
  for (int item = 0; item < N / 4 * (D / 4); ++item) {
    int pos, c, key[4];
    xjfast::transpose_item(item, D, pos, c, key);
    uint32_t w[4], out[4];
    for (int i = 0; i < 4; ++i) memcpy(&w[i], &s_v[key[i] * kRow + c], 4);
    xjfast::transpose_4x4_bytes(w, out);
    for (int j = 0; j < 4; ++j) memcpy(&s_vt[(c + j) * kVtRow + pos], &out[j], 4);
  }
  static double o[D / 8][32][4] = {};
  for (int kc = 0; kc < N / 32; ++kc) {
    Regs4 a, b;
    for (int l = 0; l < 32; ++l) xjfast::p_fragment(p[l] + 4 * kc, 448.f, a[l]);
    for (int dp = 0; dp < D / 16; ++dp) {
      int addr[32];
      for (int l = 0; l < 32; ++l) addr[l] = (dp * 16 + xjfast::b_fragment_row(l)) * kVtRow + kc * 32 + xjfast::b_fragment_byte(l);
      ldmatrix_x4(s_vt, addr, b);
      mma(o[2 * dp], a, b, 0);
      mma(o[2 * dp + 1], a, b, 2);
    }
  }
  double P[16][N];  // e4m3(P * 448) by row and key, from where each lane holds it
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e)
        P[l / 4 + 8 * (e / 2)][8 * j + 2 * (l % 4) + (e & 1)] = dec(xjfast::float_to_e4m3(p[l][j][e] * 448.f));
  for (int dn = 0; dn < D / 8 && !bad; ++dn)
    for (int l = 0; l < 32 && !bad; ++l)
      for (int e = 0; e < 4 && !bad; ++e) {
        const int row = l / 4 + 8 * (e / 2), ch = 8 * dn + 2 * (l % 4) + (e & 1);
        double want = 0;
        for (int key = 0; key < N; ++key) want += P[row][key] * dec(s_v[key * kRow + ch]);
        bad |= check("O = P.V", o[dn][l][e], want, row, ch);
      }
  if (!bad) printf("ok\n");
  return bad;
}

// The address bits the 32/64/128-byte swizzle modes of TMA and wgmma XOR: chunk bits 4.. with bits
// 7.. (1, 2 or 3 of them), as CUDA's programming guide draws the patterns.
uint32_t swizzle_address(uint32_t address, uint32_t width) {
  return address ^ (((address >> 7) & (width / 16 - 1)) << 4);
}

// A wgmma operand in shared memory, as the PTX ISA reads a K-major descriptor (canonical layouts;
// one k-step of 32 bytes). No swizzle: element (row, k) at start + (row / 8) * stride +
// (k / 16) * leading + (row % 8) * 16 + k % 16. Swizzle of width W (mode 1: 128, 2: 64, 3: 32
// bytes): rows of W bytes, at start + (row / 8) * stride + (row % 8) * W + k, that address swizzled.
uint8_t descriptor_element(const std::vector<uint8_t>& smem, uint64_t desc, int row, int k) {
  const uint32_t start = (desc & 0x3FFF) << 4, leading = ((desc >> 16) & 0x3FFF) << 4;
  const uint32_t stride = ((desc >> 32) & 0x3FFF) << 4;
  const int mode = static_cast<int>(desc >> 62);
  if (mode == 0) return smem[start + (row / 8) * stride + (k / 16) * leading + (row % 8) * 16 + k % 16];
  const uint32_t width = 256u >> mode;
  return smem[swizzle_address(start + (row / 8) * stride + (row % 8) * width + k, width)];
}

// wgmma m64nNk32 e4m3 over the warpgroup's 128 threads: acc[thread][n-tile][4] += A . B^T, with A
// (64 x 32) from a descriptor or, when `a_regs` is given, from each warp's registers (rows
// 16w..16w+15, the mma.sync A layout), and B (N x 32) from a descriptor.
void wgmma(std::vector<double>& acc, int n_tiles, const std::vector<uint8_t>& smem, uint64_t a_desc,
           const std::vector<std::array<uint32_t, 4>>* a_regs, uint64_t b_desc) {
  std::vector<double> A(64 * 32), B(n_tiles * 8 * 32);
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < 32; ++k) {
      uint8_t code;
      if (a_regs) {
        const int w = m / 16, r = m % 16, t = (k % 16) / 4;
        code = byte_of((*a_regs)[32 * w + 4 * (r % 8) + t][(r / 8) + 2 * (k / 16)], k % 4);
      } else {
        code = descriptor_element(smem, a_desc, m, k);
      }
      A[m * 32 + k] = xjfast::e4m3_to_float(code);
    }
  for (int n = 0; n < n_tiles * 8; ++n)
    for (int k = 0; k < 32; ++k) B[n * 32 + k] = xjfast::e4m3_to_float(descriptor_element(smem, b_desc, n, k));
  for (int thread = 0; thread < 128; ++thread) {
    const int w = thread / 32, g = (thread % 32) / 4, t = thread % 4;
    for (int j = 0; j < n_tiles; ++j)
      for (int e = 0; e < 4; ++e) {
        const int m = 16 * w + g + 8 * (e / 2), n = 8 * j + 2 * t + (e & 1);
        double sum = 0;
        for (int k = 0; k < 32; ++k) sum += A[m * 32 + k] * B[n * 32 + k];
        acc[(thread * n_tiles + j) * 4 + e] += sum;
      }
  }
}

// One CTA's S = Q.K^T (64 x 64) and O = e4m3(448 P).V (64 x D) as a wgmma kernel computes them:
// Q always in core matrices; K and V either as WgmmaCore loads them (K in core matrices, V
// row-major padded) or, `tma`, as the TMA of the warp-specialized kernel writes them (rows of D
// bytes with the D-byte swizzle, the tiles 1024-byte aligned), read back through
// swizzled_k_step_descriptor and swizzled_offset. V^T in core matrices either way.
int wgmma_tiles(uint32_t seed, int D, bool tma) {
  constexpr int N = 64;
  const int kVRow = tma ? D : D + 16;
  const int row_group = xjfast::k_major_group_stride(D), vt_group = xjfast::k_major_group_stride(N);
  std::mt19937 rng(seed);
  auto code = [&] { uint8_t c = static_cast<uint8_t>(rng()); return (c & 0x7F) == 0x7F ? uint8_t(0x7E) : c; };
  auto dec = [](uint8_t c) { return static_cast<double>(xjfast::e4m3_to_float(c)); };
  // one shared-memory space: Q (core matrices), K, V, V^T (core matrices)
  const int q0 = 0, k0 = 64 * D + 1024, v0 = k0 + N * D + 1024, vt0 = v0 + N * kVRow;
  std::vector<uint8_t> smem(vt0 + D * N);
  std::vector<uint8_t> q(64 * D), k(N * D), v(N * D);
  for (auto* m : {&q, &k, &v}) for (auto& x : *m) x = code();
  for (int r = 0; r < 64; ++r) for (int c = 0; c < D; ++c) smem[q0 + xjfast::core_matrix_offset(r, c, row_group)] = q[r * D + c];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < D; ++c) {
      if (tma) {  // the box [N rows][D bytes] at its linear address, then the address swizzled
        smem[swizzle_address(k0 + r * D + c, D)] = k[r * D + c];
        smem[swizzle_address(v0 + r * D + c, D)] = v[r * D + c];
      } else {
        smem[k0 + xjfast::core_matrix_offset(r, c, row_group)] = k[r * D + c];
        smem[v0 + r * kVRow + c] = v[r * D + c];
      }
    }
  auto v_offset = [&](int r, int c) { return tma ? xjfast::swizzled_offset(r, c, D) : r * kVRow + c; };

  std::vector<double> s(128 * (N / 8) * 4, 0.0);
  for (int kc = 0; kc < D / 32; ++kc)
    wgmma(s, N / 8, smem, xjfast::k_step_descriptor(q0, kc, row_group), nullptr,
          tma ? xjfast::swizzled_k_step_descriptor(k0, kc, D) : xjfast::k_step_descriptor(k0, kc, row_group));
  int bad = 0;
  for (int thread = 0; thread < 128 && !bad; ++thread)
    for (int j = 0; j < N / 8 && !bad; ++j)
      for (int e = 0; e < 4 && !bad; ++e) {
        const int row = 16 * (thread / 32) + (thread % 32) / 4 + 8 * (e / 2), key = 8 * j + 2 * (thread % 4) + (e & 1);
        double want = 0;
        for (int c = 0; c < D; ++c) want += dec(q[row * D + c]) * dec(k[key * D + c]);
        bad |= check("wgmma S = Q.K^T", s[(thread * (N / 8) + j) * 4 + e], want, row, key);
      }

  for (int item = 0; item < N / 4 * (D / 4); ++item) {  // transpose_value_tile with WgmmaCore::vt_offset
    int pos, c, key[4];
    xjfast::transpose_item(item, D, pos, c, key);
    uint32_t w[4], out[4];
    for (int i = 0; i < 4; ++i) memcpy(&w[i], &smem[v0 + v_offset(key[i], c)], 4);
    xjfast::transpose_4x4_bytes(w, out);
    for (int j = 0; j < 4; ++j) memcpy(&smem[vt0 + xjfast::core_matrix_offset(c + j, pos, vt_group)], &out[j], 4);
  }
  std::vector<std::array<float, 4>> p(128 * (N / 8));  // P in the S accumulator layout
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (auto& tile : p) for (float& x : tile) x = unit(rng);
  std::vector<double> o(128 * (D / 8) * 4, 0.0);
  for (int kc = 0; kc < N / 32; ++kc) {
    std::vector<std::array<uint32_t, 4>> a(128);
    for (int thread = 0; thread < 128; ++thread) {
      float tiles[4][4];
      for (int j = 0; j < 4; ++j) for (int e = 0; e < 4; ++e) tiles[j][e] = p[thread * (N / 8) + 4 * kc + j][e];
      uint32_t regs[4];
      xjfast::p_fragment(tiles, 448.f, regs);
      for (int r = 0; r < 4; ++r) a[thread][r] = regs[r];
    }
    wgmma(o, D / 8, smem, 0, &a, xjfast::k_step_descriptor(vt0, kc, vt_group));
  }
  std::vector<double> P(64 * N);
  for (int thread = 0; thread < 128; ++thread)
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e)
        P[(16 * (thread / 32) + (thread % 32) / 4 + 8 * (e / 2)) * N + 8 * j + 2 * (thread % 4) + (e & 1)] =
            dec(xjfast::float_to_e4m3(p[thread * (N / 8) + j][e] * 448.f));
  for (int thread = 0; thread < 128 && !bad; ++thread)
    for (int dn = 0; dn < D / 8 && !bad; ++dn)
      for (int e = 0; e < 4 && !bad; ++e) {
        const int row = 16 * (thread / 32) + (thread % 32) / 4 + 8 * (e / 2), ch = 8 * dn + 2 * (thread % 4) + (e & 1);
        double want = 0;
        for (int key = 0; key < N; ++key) want += P[row * N + key] * dec(v[key * D + ch]);
        bad |= check("wgmma O = P.V", o[(thread * (D / 8) + dn) * 4 + e], want, row, ch);
      }
  if (!bad) printf("ok\n");
  return bad;
}

// The V-tile transpose as a warp runs it (transpose_item, write_rotation): per load and per store
// instruction, the most distinct 4-byte words that fall in one of the 32 shared-memory banks (1:
// no conflict), worst over the tile; a warp's items are 32 consecutive ones, 32-aligned, however
// many warps transpose (kernels pass a multiple of 32 threads, warp-aligned). Layouts of the three
// CUDA attention paths: V rows of D + 16 bytes (mma, wgmma) or as TMA writes them (ws: D-byte
// swizzle); V^T rows of 80 bytes (MmaCore::kVtRow) or core matrices (WgmmaCore, ws). Also checks
// that the items cover every (position group, channel group) once.
int bank_conflicts(int D) {
  constexpr int N = 64;
  const int vt_group = xjfast::k_major_group_stride(N);
  struct Path { const char* name; bool swizzled_v, core_matrix_vt; };
  const Path paths[] = {{"mma", false, false}, {"wgmma", false, true}, {"ws", true, true}};
  auto degree = [](const int (&addr)[32], int lanes) {
    int worst = 0;
    for (int bank = 0; bank < 32; ++bank) {
      int words[32], n = 0;
      for (int l = 0; l < lanes; ++l) {
        const int word = addr[l] / 4;
        if (word % 32 != bank) continue;
        bool seen = false;
        for (int i = 0; i < n; ++i) seen |= words[i] == word;
        if (!seen) words[n++] = word;
      }
      worst = n > worst ? n : worst;
    }
    return worst;
  };
  for (const Path& path : paths) {
    int load = 0, store = 0;
    std::vector<int> covered(N / 4 * (D / 4), 0);
    for (int base = 0; base < N / 4 * (D / 4); base += 32) {  // a warp's items: 32 consecutive, aligned
      int p[32], c[32], key[32][4], lanes = 0;
      for (int l = 0; l < 32 && base + l < N / 4 * (D / 4); ++l, ++lanes) {
        xjfast::transpose_item(base + l, D, p[l], c[l], key[l]);
        covered[(p[l] / 4) * (D / 4) + c[l] / 4] += 1;
      }
      for (int i = 0; i < 4; ++i) {
        int addr[32];
        for (int l = 0; l < lanes; ++l)
          addr[l] = path.swizzled_v ? xjfast::swizzled_offset(key[l][i], c[l], D) : key[l][i] * (D + 16) + c[l];
        const int d = degree(addr, lanes);
        load = d > load ? d : load;
      }
      for (int j = 0; j < 4; ++j) {
        int addr[32];
        for (int l = 0; l < lanes; ++l) {
          const int ch = c[l] + ((j + xjfast::write_rotation(c[l])) & 3);
          addr[l] = path.core_matrix_vt ? xjfast::core_matrix_offset(ch, p[l], vt_group) : ch * (N + 16) + p[l];
        }
        const int d = degree(addr, lanes);
        store = d > store ? d : store;
      }
    }
    for (int n : covered)
      if (n != 1) {
        printf("%s: an item is covered %d times\n", path.name, n);
        return 1;
      }
    printf("%s %d %d\n", path.name, load, store);
  }
  // The query tile's 16-byte stores into core matrices (WgmmaCore, ws: prepare_query_tile takes
  // its items in query_item's order), per quarter warp, and the 4-byte stores of the per-item
  // partial sums, segment-major, per warp; the items cover the tile once.
  constexpr int kRows = 64, kThreads = 128;  // the query tile, a group of 4 warps
  const int segs = D / 16, row_group = xjfast::k_major_group_stride(D);
  int q_store = 0, partial = 0;
  std::vector<int> covered(kRows * segs, 0);
  for (int base = 0; base < kRows * segs; base += 32) {
    int row[32], seg[32], part[32];
    for (int l = 0; l < 32; ++l) {
      xjfast::query_item(base + l, kThreads, segs, row[l], seg[l]);
      part[l] = 4 * (seg[l] * kRows + row[l]);
      covered[seg[l] * kRows + row[l]] += 1;
    }
    partial = std::max(partial, degree(part, 32));
    for (int quarter = 0; quarter < 4; ++quarter) {
      int words[32], n = 0;  // each 16-byte store as its four words
      for (int l = 8 * quarter; l < 8 * quarter + 8; ++l)
        for (int w = 0; w < 4; ++w) words[n++] = xjfast::core_matrix_offset(row[l], seg[l] * 16, row_group) + 4 * w;
      q_store = std::max(q_store, degree(words, 32));
    }
  }
  for (int n : covered)
    if (n != 1) {
      printf("query: an item is covered %d times\n", n);
      return 1;
    }
  printf("query %d %d\n", q_store, partial);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 8 && !strcmp(argv[1], "philox")) {
    uint32_t v[6];
    for (int i = 0; i < 6; ++i) v[i] = static_cast<uint32_t>(strtoul(argv[2 + i], nullptr, 0));
    const xjfast::Philox4 w = xjfast::philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5]);
    printf("%08x %08x %08x %08x\n", w.x[0], w.x[1], w.x[2], w.x[3]);
    return 0;
  }
  if (argc == 5 && !strcmp(argv[1], "normal")) {
    const uint64_t seed = strtoull(argv[2], nullptr, 0), frame = strtoull(argv[3], nullptr, 0);
    const long n = strtol(argv[4], nullptr, 0);
    for (long g = 0; 4 * g < n; ++g) {
      float out[4];
      xjfast::philox_normal4(static_cast<uint64_t>(g), frame, seed, out);
      for (int j = 0; j < 4 && 4 * g + j < n; ++j) printf("%.9g\n", out[j]);
    }
    return 0;
  }
  if (argc == 2 && !strcmp(argv[1], "e4m3")) {
    float x;
    while (scanf("%f", &x) == 1) {
      const uint8_t b = xjfast::float_to_e4m3(x);
      printf("%u %.9g\n", b, xjfast::e4m3_to_float(b));
    }
    return 0;
  }
  if (argc == 4 && (!strcmp(argv[1], "wgmma") || !strcmp(argv[1], "wgmma-tma")))
    return wgmma_tiles(static_cast<uint32_t>(strtoul(argv[2], nullptr, 0)), atoi(argv[3]), argv[1][5] == '-');
  if (argc == 3 && !strcmp(argv[1], "fragments")) return fragments(static_cast<uint32_t>(strtoul(argv[2], nullptr, 0)));
  if (argc == 3 && !strcmp(argv[1], "banks")) return bank_conflicts(atoi(argv[2]));
  if (argc == 18 && !strcmp(argv[1], "token-offset")) {
    long long v[16];
    for (int i = 0; i < 16; ++i) v[i] = strtoll(argv[2 + i], nullptr, 0);
    xjfast::DenoiseGeometry g{};
    g.B = int(v[0]), g.C = int(v[1]), g.F = int(v[2]), g.H = int(v[3]), g.W = int(v[4]);
    g.pt = int(v[5]), g.ph = int(v[6]), g.pw = int(v[7]);
    g.sm[0] = v[8], g.sm[1] = v[9], g.sm[2] = v[10];
    printf("%" PRId64 "\n", xjfast::model_out_offset<true>(g, int(v[11]), int(v[12]), int(v[13]), int(v[14]), int(v[15])));
    return 0;
  }
  fprintf(stderr, "usage: host_tests philox C0 C1 C2 C3 K0 K1 | normal SEED FRAME N | e4m3 < floats | fragments SEED | "
                  "wgmma SEED D | wgmma-tma SEED D | banks D | token-offset B C F H W PT PH PW SM0 SM1 SM2 b c f y x\n");
  return 2;
}
