"""Philox4x32-10 (Salmon et al., SC'11) in plain PyTorch, bit for bit what the kernels compute.

Words are uint32 values held in int64 tensors. One round, with multipliers M0, M1, uses the
round's key (k0, k1) (the given key in round 1):
    (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2          (64-bit products split in halves)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
then k0 += W0, k1 += W1 (mod 2^32); ten rounds. Output words x0..x3 = c0..c3.

The Gaussian mapping is DESIGN.md's: group g = i // 4 of a latent frame f's flattened
[B, C, H, W] elements draws counter (g lo, g hi, f lo, f hi) under key (seed lo, seed hi).
In float32, every operation rounded to nearest even (what kernels must copy):
    u_j = (float32(x_j) + 1.0f) * 2^-32          in (0, 1]: x = 0 gives 2^-32, x >= 2^32 - 128 gives 1
    r_j = sqrtf(-2.0f * logf(u_j))
    t_j = 6.2831855f * u_j                       (float32(2 pi) = 0x40C90FDB)
    elements 4g..4g+3 = r0 * cosf(t1), r0 * sinf(t1), r2 * cosf(t3), r2 * sinf(t3)
float32(x) is cvt.rn.f32.u32 on a GPU; the scale by 2^-32 is exact, so an FMA contraction of
u changes nothing. log/cos/sin may differ by float32 rounding between backends (abs 1e-5), e.g.
CUDA's sincospif(2u), which skips the large-argument reduction.
"""
from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_POW_M32 = 2.0 ** -32
TWO_PI_F32 = 6.2831854820251465  # float32(2 pi): torch multiplies a float32 tensor in float32


def _mulhilo(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m * x for uint32 m and x, without overflowing int64."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    t = m * x_hi                      # < 2^48
    s = (t & 0xFFFF) * 65536 + m * x_lo  # < 2^49
    return (t >> 16) + (s >> 32), s & MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """counter [..., 4] and key [..., 2] (uint32 values in int64) -> four uint32 words [..., 4]."""
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"counter, key: expected shapes [..., 4] and [..., 2], got {tuple(counter.shape)} "
                         f"and {tuple(key.shape)}")
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


def uniform(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 u = (float32(x) + 1) * 2^-32 in (0, 1]."""
    return (words.to(torch.float32) + 1.0) * TWO_POW_M32


def philox_normal(seed: int, frame_index: int, numel: int, device=None) -> torch.Tensor:
    """float32 [numel] N(0, 1) noise of latent frame `frame_index` (elements of its flattened latent)."""
    seed = _check_seed(seed)
    if isinstance(frame_index, bool) or not isinstance(frame_index, int) or not 0 <= frame_index < 2 ** 64:
        raise ValueError(f"frame_index: expected an int in [0, 2^64), got {frame_index!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel: expected an int >= 0, got {numel!r}")
    g = torch.arange(math.ceil(numel / 4), dtype=torch.int64, device=device)
    counter = torch.stack((g & MASK32, g >> 32, torch.full_like(g, frame_index & MASK32),
                           torch.full_like(g, frame_index >> 32)), dim=-1)
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64, device=device).expand(len(g), 2)
    u = uniform(philox4x32_10(counter, key))
    r0, r2 = (-2.0 * u[:, 0].log()).sqrt(), (-2.0 * u[:, 2].log()).sqrt()
    t1, t3 = TWO_PI_F32 * u[:, 1], TWO_PI_F32 * u[:, 3]
    gauss = torch.stack((r0 * t1.cos(), r0 * t1.sin(), r2 * t3.cos(), r2 * t3.sin()), dim=-1)
    return gauss.flatten()[:numel]


def latent_noise(seed: int, frame_index: int, shape, device=None) -> torch.Tensor:
    """float32 noise shaped like a latent block [B, C, F, H, W] for frames frame_index.. +F-1.

    Frame f draws from its own stream, so a frame's noise does not depend on its block."""
    B, C, F, H, W = shape
    frames = [philox_normal(seed, frame_index + f, B * C * H * W, device).view(B, C, H, W) for f in range(F)]
    return torch.stack(frames, dim=2)
