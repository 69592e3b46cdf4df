// FP8 e4m3 (the "fn" variant: no infinities, 0x7F/0xFF NaN, largest finite 448) conversion with
// round-to-nearest-even and saturation: what cvt.rn.satfinite.e4m3x2.f32 does on the GPU, in
// portable integer code so the host computes the same bytes.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace xjfast {

constexpr float kE4M3Max = 448.0f;

XJ_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

XJ_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

XJ_HD uint8_t float_to_e4m3(float x) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7F;                   // NaN stays NaN
  if (bits_float(mag) >= kE4M3Max) return sign | 0x7E;         // saturate (448), infinities too
  const int exp = static_cast<int>(mag >> 23) - 127;
  if (exp < -6) {  // subnormal e4m3: multiples of 2^-9, rounded to nearest even
    const float scaled = bits_float(mag) * 512.0f;              // exact: a power of two
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1))) ++q;
    return sign | static_cast<uint8_t>(q);                      // q == 8 is 2^-6, the first normal
  }
  // normal: keep 3 mantissa bits, round to nearest even on the 20 dropped ones
  uint32_t m = mag & 0x7FFFFFu;
  uint32_t e = static_cast<uint32_t>(exp + 7);
  uint32_t keep = m >> 20, dropped = m & 0xFFFFFu;
  if (dropped > 0x80000u || (dropped == 0x80000u && (keep & 1))) ++keep;
  if (keep == 8) {
    keep = 0;
    ++e;
  }
  const uint8_t code = static_cast<uint8_t>((e << 3) | keep);
  return sign | (code >= 0x7F ? 0x7E : code);                   // 0x7F would be NaN: saturate
}

XJ_HD float e4m3_to_float(uint8_t v) {
  const uint32_t sign = (v & 0x80u) << 24;
  const uint32_t e = (v >> 3) & 0xF, m = v & 0x7;
  if (e == 0xF && m == 0x7) return bits_float(sign | 0x7FC00000u);
  if (e == 0) return bits_float(sign | float_bits(static_cast<float>(m) * 0.001953125f));  // m * 2^-9
  return bits_float(sign | ((e + 120) << 23) | (m << 20));
}

}  // namespace xjfast
