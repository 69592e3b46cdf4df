// Where denoise_step's kernel finds an element of model_out: the latent layout, or the model
// head's tokens (Wan2.1's unpatchify order). Host/device code: tests/test_csrc_host.py checks it.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace xjfast {

struct DenoiseGeometry {
  int B, C, F, H, W;     // latent shape of x_t and the outputs (outputs contiguous)
  int pt, ph, pw;        // patch size (token layout only)
  int64_t sx[5];         // x_t strides, elements
  int64_t sm[5];         // model_out strides: 5 (latent layout) or the first 3 (tokens)
};

// Element (b, c, f, y, x)'s offset in model_out, token or latent layout. The channel index is
// int64 throughout: pt * ph alone may pass 2^31 (F <= 65535 frames, H any).
template <bool kTokens>
XJ_HD int64_t model_out_offset(const DenoiseGeometry& g, int b, int c, int f, int y, int x) {
  if (kTokens) {
    const int64_t token = (static_cast<int64_t>(f / g.pt) * (g.H / g.ph) + y / g.ph) * (g.W / g.pw) + x / g.pw;
    const int64_t channel = ((static_cast<int64_t>(f % g.pt) * g.ph + y % g.ph) * g.pw + x % g.pw) * g.C + c;
    return b * g.sm[0] + token * g.sm[1] + channel * g.sm[2];
  }
  return b * g.sm[0] + c * g.sm[1] + f * g.sm[2] + y * g.sm[3] + x * g.sm[4];
}

}  // namespace xjfast
