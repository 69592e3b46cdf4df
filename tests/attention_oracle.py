"""Float64 attention written independently of xjfast, the yardstick for every backend."""
from __future__ import annotations

import torch


def rotate_complex(x: torch.Tensor, positions: torch.Tensor, dims: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan-style rotary (complex multiply on adjacent pairs) of the first `dims` channels, fp64."""
    x = x.double()
    freqs = 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    angle = positions.double()[:, None] * freqs[None]
    rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [L, 1, dims/2]
    lead = torch.view_as_complex(x[..., :dims].reshape(*x.shape[:-1], dims // 2, 2).contiguous())
    lead = torch.view_as_real(lead * rot).flatten(-2)
    return torch.cat((lead, x[..., dims:]), dim=-1)


def exact_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float64; q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk]."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("blhd,bnhd->bhln", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhln,bnhd->blhd", torch.softmax(s, dim=-1), v), lse


def explicit_block_mask(L: int, block: int, private=None) -> torch.Tensor:
    """DESIGN.md's rule spelled out element by element."""
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            bi, bj = i // block, j // block
            mask[i, j] = bj <= bi and (bj == bi or not (private and private[bj]))
    return mask


def rel_l2(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def cosine(out, ref) -> float:
    return torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0).item()
