"""Triton denoise_step: the sampler step in one pass, with Philox4x32-10 noise drawn in-kernel.

Each program handles BLOCK elements of one latent frame's flattened [B, C, H, W] (in groups of
4, one Philox call per group, as DESIGN.md fixes the mapping), reads x_t and the model output
(latent layout, or the head's patchified token layout, un-patchified through index math), and
writes x0 and, with a next sigma, x_next = (1 - sigma_next) * x0 + sigma_next * eps.
"""
import torch
import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
BLOCK = 1024  # elements per program: 256 Philox groups


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: ten rounds of (hi, lo) = m * c with Weyl-bumped keys."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(PHILOX_M0, c0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(PHILOX_M1, c2)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3
