"""Wan2.1's 3D rotary embedding: head_dim split into temporal, height and width parts, each
rotating channel pairs (2j, 2j+1) by position * theta^(-2j / part).

The angles of a pass depend only on its grid, so the model builds one (cos, sin) table per
forward and every layer's q and k reuse it: one elementwise rotation per tensor.
"""
from __future__ import annotations

import torch

from xjfast.ops.rotary import rope_freqs, temporal_rope_dims


def rope_parts(head_dim: int) -> tuple[int, int, int]:
    t = temporal_rope_dims(head_dim)
    return t, (head_dim - t) // 2, (head_dim - t) // 2


def rope_table(grid: tuple[int, int, int], head_dim: int, *, frames=None, temporal: bool = True,
               spatial: bool = True, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) [L, 1, head_dim/2] for the f*h*w tokens (frame-major) of `grid`.

    frames: the temporal position of each of the f frames (default 0..f-1). temporal=False (or
    spatial=False) gives those pairs angle 0: keys and queries that go through a
    StreamingKVCache carry the spatial rotary only and get the temporal one from the attention
    op, by cache slot; rotations of disjoint pairs compose, so spatial then temporal = full.
    """
    f, h, w = grid
    d_t, d_h, d_w = rope_parts(head_dim)
    frames = torch.arange(f, device=device) if frames is None else torch.as_tensor(frames, device=device)
    frames = frames.double().repeat_interleave(h * w)
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w).repeat(f)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(f * h)
    on_t, on_s = float(temporal), float(spatial)
    # angles in fp64, so a large position loses no accuracy before the cast
    angles = torch.cat((frames[:, None] * (rope_freqs(d_t, theta, device) * on_t),
                        rows[:, None] * (rope_freqs(d_h, theta, device) * on_s),
                        cols[:, None] * (rope_freqs(d_w, theta, device) * on_s)), dim=-1)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [B, L, H, D] by a rope_table; computed in fp32, returned in x's dtype."""
    cos, sin = table
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def apply_rope_3d(x: torch.Tensor, grid: tuple[int, int, int], frames=None, temporal: bool = True,
                  theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, L, H, D] (L = f*h*w tokens, frame-major) by its (frame, row, column) positions."""
    return apply_rope(x, rope_table(grid, x.shape[-1], frames=frames, temporal=temporal, theta=theta,
                                    device=x.device))
