"""Rotary position embedding on adjacent channel pairs (Wan2.1's convention).

Wan2.1 splits head_dim D into a temporal part of D - 4*(D//6) leading channels and two spatial
parts of 2*(D//6) each; each part rotates pairs (2j, 2j+1) by pos * theta^(-2j/d).
"""
from __future__ import annotations

import torch


def temporal_rope_dims(head_dim: int) -> int:
    """Number of leading channels of a head that carry the temporal rotary (Wan2.1's split)."""
    return head_dim - 4 * (head_dim // 6)


def rope_freqs(dims: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """fp64 angular frequencies of the `dims // 2` pairs of one rotary part."""
    return 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)


def rotate_leading(x: torch.Tensor, positions: torch.Tensor, dims: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate the first `dims` channels of x [..., L, H, D] by positions [L] (float, may be negative).

    Returns fp32 (fp64 for fp64 input). Angles are formed in fp64 so a large position difference
    loses no accuracy.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if dims == 0:
        return x.to(dtype)
    angles = positions.double()[:, None] * rope_freqs(dims, theta, x.device)[None, :]  # [L, dims/2]
    cos = angles.cos().to(dtype)[:, None, :]  # broadcast over heads
    sin = angles.sin().to(dtype)[:, None, :]
    x = x.to(dtype)
    pairs = x[..., :dims].unflatten(-1, (dims // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., dims:]), dim=-1)


def rope_table(dims: int, theta: float, head_dim: int, max_delta: int, device) -> torch.Tensor:
    """[2 * max_delta + 1, 2, head_dim / 2] fp32: cos and sin of delta * freq per channel pair, for
    delta in [-max_delta, max_delta] (cos 1, sin 0 past the `dims` rotated channels). The kernels
    rotate a query tile by a slot difference with a gather from it: far fewer registers and
    instructions than computing cos/sin of the tile. Built once per geometry (see constants)."""
    from xjfast.ops.constants import device_constant

    def build():
        delta = torch.arange(-max_delta, max_delta + 1, dtype=torch.float64)[:, None]
        pair = torch.arange(head_dim // 2)
        angle = delta * (theta ** (-2.0 * pair.double() / dims))[None, :] if dims else delta * 0.0 * pair
        rotated = pair < dims // 2
        cos = torch.where(rotated, angle.cos(), torch.ones_like(angle))
        sin = torch.where(rotated, angle.sin(), torch.zeros_like(angle))
        return torch.stack((cos, sin), dim=1).float().contiguous()

    return device_constant(("rope", dims, float(theta), head_dim, max_delta), device, build)
