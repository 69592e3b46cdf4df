"""Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch, bit for bit what the kernels compute.

Words are uint32 values held in int64 tensors. One round, with multipliers M0, M1:
    (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2          (64-bit products split in halves)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
then the key is bumped by the Weyl constants W0, W1; ten rounds.

The Gaussian mapping is DESIGN.md's: group g = i // 4 of a latent frame f's flattened
[B, C, H, W] elements draws counter (g lo, g hi, f lo, f hi) under key (seed lo, seed hi);
u_j = (float32(x_j) + 1) * 2^-32 in (0, 1] (uint32 -> float32 rounds to nearest even, as the
GPU's cvt.rn.f32.u32); elements 4g..4g+3 are r0 cos(2 pi u1), r0 sin(2 pi u1), r2 cos(2 pi u3),
r2 sin(2 pi u3) with r_j = sqrt(-2 ln u_j), all in float32.
"""
from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_POW_M32 = 2.0 ** -32


def _mulhilo(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m * x for uint32 m and x, without overflowing int64."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    t = m * x_hi                      # < 2^48
    s = (t & 0xFFFF) * 65536 + m * x_lo  # < 2^49
    return (t >> 16) + (s >> 32), s & MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """counter [..., 4] and key [..., 2] (uint32 values in int64) -> four uint32 words [..., 4]."""
    c0, c1, c2, c3 = counter.long().unbind(-1)
    k0, k1 = key.long().unbind(-1)
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"noise_seed: expected an int in [0, 2^64), got {seed!r}")
    return seed


def philox_normal(seed: int, frame_index: int, numel: int, device=None) -> torch.Tensor:
    """float32 [numel] N(0, 1) noise of latent frame `frame_index` (elements of its flattened latent)."""
    seed = _check_seed(seed)
    if isinstance(frame_index, bool) or not isinstance(frame_index, int) or not 0 <= frame_index < 2 ** 64:
        raise ValueError(f"frame_index: expected an int in [0, 2^64), got {frame_index!r}")
    g = torch.arange(math.ceil(numel / 4), dtype=torch.int64, device=device)
    counter = torch.stack((g & MASK32, g >> 32, torch.full_like(g, frame_index & MASK32),
                           torch.full_like(g, frame_index >> 32)), dim=-1)
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64, device=device).expand(len(g), 2)
    u = (philox4x32_10(counter, key).to(torch.float32) + 1.0) * TWO_POW_M32
    r0, r2 = (-2.0 * u[:, 0].log()).sqrt(), (-2.0 * u[:, 2].log()).sqrt()
    t1, t3 = (2 * math.pi) * u[:, 1], (2 * math.pi) * u[:, 3]
    gauss = torch.stack((r0 * t1.cos(), r0 * t1.sin(), r2 * t3.cos(), r2 * t3.sin()), dim=-1)
    return gauss.flatten()[:numel]


def latent_noise(seed: int, frame_index: int, shape, device=None) -> torch.Tensor:
    """float32 noise shaped like a latent block [B, C, F, H, W] for frames frame_index.. +F-1.

    Frame f draws from its own stream, so a frame's noise does not depend on its block."""
    B, C, F, H, W = shape
    frames = [philox_normal(seed, frame_index + f, B * C * H * W, device).view(B, C, H, W) for f in range(F)]
    return torch.stack(frames, dim=2)
