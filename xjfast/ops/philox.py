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

from xjfast.errors import canonical_device, is_int

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
    return torch.stack(_rounds(*counter.long().unbind(-1), *key.long().unbind(-1)), dim=-1)


def _rounds(c0, c1, c2, c3, k0, k1):
    """The ten rounds on words that are int64 tensors or Python ints (a key known on the host stays
    an int, so no key tensor is built and copied to the device)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def _check_seed(seed) -> int:
    if not is_int(seed) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"noise_seed: expected an int in [0, 2^64), got {seed!r}")
    return seed


def uniform(words: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 u = (float32(x) + 1) * 2^-32 in (0, 1]."""
    return (words.to(torch.float32) + 1.0) * TWO_POW_M32


def check_frame_index(frame_index, device=None, limit: int = 2 ** 64):
    """An int in [0, limit), or an int64 0-d tensor on `device` (read there: the index of a step
    replayed from a CUDA graph lives in device memory; its range is the caller's to keep)."""
    if isinstance(frame_index, torch.Tensor):
        if frame_index.dtype != torch.int64 or frame_index.dim() != 0:
            raise ValueError(f"frame_index: expected an int or a 0-d int64 tensor, got a tensor of dtype "
                             f"{frame_index.dtype} and shape {tuple(frame_index.shape)}")
        if device is not None and frame_index.device != canonical_device(device):
            raise ValueError(f"frame_index: expected a tensor on {canonical_device(device)}, got one on "
                             f"{frame_index.device}")
    elif not is_int(frame_index) or not 0 <= frame_index < limit:
        exponent = limit.bit_length() - 1
        raise ValueError(f"frame_index: expected an int in [0, 2^{exponent}) or a 0-d int64 tensor, "
                         f"got {frame_index!r}")
    return frame_index


def philox_normal(seed: int, frame_index, numel: int, device=None) -> torch.Tensor:
    """float32 [numel] N(0, 1) noise of latent frame `frame_index` (elements of its flattened latent).

    frame_index: an int, or an int64 0-d tensor on `device` read by the device ops (no host sync),
    giving bit-identical noise."""
    seed = _check_seed(seed)
    check_frame_index(frame_index, device)
    if not is_int(numel) or numel < 0:
        raise ValueError(f"numel: expected an int >= 0, got {numel!r}")
    g = torch.arange(math.ceil(numel / 4), dtype=torch.int64, device=device)
    # the counter's words as the kernels read the index: unsigned (a negative index in a tensor,
    # which no check can see without a sync, is its two's complement there too)
    c2, c3 = frame_index & MASK32, (frame_index >> 32) & MASK32
    x0, x1, x2, x3 = _rounds(g & MASK32, g >> 32, c2, c3, seed & MASK32, seed >> 32)
    u0, u1, u2, u3 = (uniform(x) for x in (x0, x1, x2, x3))
    r0, r2 = (-2.0 * u0.log()).sqrt(), (-2.0 * u2.log()).sqrt()
    t1, t3 = TWO_PI_F32 * u1, TWO_PI_F32 * u3
    gauss = torch.stack((r0 * t1.cos(), r0 * t1.sin(), r2 * t3.cos(), r2 * t3.sin()), dim=-1)
    return gauss.flatten()[:numel]


def latent_noise(seed: int, frame_index, shape, device=None) -> torch.Tensor:
    """float32 noise shaped like a latent block [B, C, F, H, W] for frames frame_index.. +F-1.

    Frame f draws from its own stream, so a frame's noise does not depend on its block.
    frame_index may be an int64 0-d tensor on `device` (see philox_normal)."""
    B, C, F, H, W = shape
    frames = [philox_normal(seed, frame_index + f, B * C * H * W, device).view(B, C, H, W) for f in range(F)]
    return torch.stack(frames, dim=2)
