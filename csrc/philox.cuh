// Philox4x32-10 (Salmon et al., SC'11) and DESIGN.md's Gaussian mapping, bit for bit what
// xjfast.ops.philox (the reference) and kernels/denoise_step.py (Triton) compute.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace xjfast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

XJ_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// counter (c0..c3), key (k0, k1) -> four words; ten rounds, the key bumped after each.
XJ_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c0, hi0, lo0);
    mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// u = (float(x) + 1) * 2^-32 in (0, 1]: float(x) rounds to nearest even (cvt.rn.f32.u32).
XJ_HD float philox_uniform(uint32_t x) { return (static_cast<float>(x) + 1.0f) * 2.3283064365386963e-10f; }

// The four Gaussians of group g of latent frame f under `seed`: elements 4g..4g+3 of the frame's
// flattened [B, C, H, W] latent.
XJ_HD void philox_normal4(uint64_t g, uint64_t frame, uint64_t seed, float out[4]) {
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                  static_cast<uint32_t>(frame), static_cast<uint32_t>(frame >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r0 = sqrtf(-2.0f * logf(philox_uniform(w.x[0])));
  const float r2 = sqrtf(-2.0f * logf(philox_uniform(w.x[2])));
  const float u1 = philox_uniform(w.x[1]), u3 = philox_uniform(w.x[3]);
  float s1, c1, s3, c3;
#if defined(__CUDA_ARCH__)
  // sin/cos(2 pi u) as sincospi(2u): no large-argument reduction path, so no local memory
  sincospif(2.0f * u1, &s1, &c1);
  sincospif(2.0f * u3, &s3, &c3);
#else
  const float two_pi = 6.283185307179586f;
  s1 = sinf(two_pi * u1), c1 = cosf(two_pi * u1), s3 = sinf(two_pi * u3), c3 = cosf(two_pi * u3);
#endif
  out[0] = r0 * c1;
  out[1] = r0 * s1;
  out[2] = r2 * c3;
  out[3] = r2 * s3;
}

}  // namespace xjfast
