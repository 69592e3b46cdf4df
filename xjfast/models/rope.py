"""Wan2.1's 3D rotary embedding: head_dim split into temporal, height and width parts, each
rotating channel pairs (2j, 2j+1) by position * theta^(-2j / part)."""
from __future__ import annotations

import torch

from xjfast.ops.rotary import rotate_leading, temporal_rope_dims


def rope_parts(head_dim: int) -> tuple[int, int, int]:
    t = temporal_rope_dims(head_dim)
    return t, (head_dim - t) // 2, (head_dim - t) // 2


def apply_rope_3d(x: torch.Tensor, grid: tuple[int, int, int], frame_offset: int = 0, temporal: bool = True,
                  theta: float = 10000.0) -> torch.Tensor:
    """Rotate x [B, L, H, D] (L = f*h*w tokens, frame-major) by its (frame, row, column) positions.

    temporal=False leaves the temporal channels untouched: keys and queries that go through a
    StreamingKVCache get their temporal rotary from the attention op, by cache slot.
    """
    f, h, w = grid
    d_t, d_h, d_w = rope_parts(x.shape[-1])
    frames = torch.arange(f, device=x.device).repeat_interleave(h * w) + frame_offset
    rows = torch.arange(h, device=x.device).repeat_interleave(w).repeat(f)
    cols = torch.arange(w, device=x.device).repeat(f * h)
    parts = torch.split(x.float(), (d_t, d_h, d_w), dim=-1)
    out = [rotate_leading(parts[0], frames, d_t, theta) if temporal else parts[0],
           rotate_leading(parts[1], rows, d_h, theta), rotate_leading(parts[2], cols, d_w, theta)]
    return torch.cat(out, dim=-1).to(x.dtype)
