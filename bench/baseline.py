"""What a Self-Forcing-style engine runs instead of xjfast: a bf16 KV cache and torch SDPA.

`sdpa_temporal_attention` has temporal_attention's signature and semantics for a bf16 cache in
bf16 precision, built the way such code builds it: rotate the cached keys by slot, concatenate
them with the pass's keys, and call scaled_dot_product_attention (flash when there is no mask
inside the pass, the memory-efficient kernel with an explicit boolean mask otherwise).
"""
from __future__ import annotations

import torch

from xjfast.cache import KEEP
from xjfast.ops.rotary import rotate_leading
from xjfast.ops.temporal_attention import block_mask


def cached_keys_values(view, dtype):
    """Dequantized cached K (rotated by slot) and V, [B, n, H, D], slot order."""
    keys, values = [], []
    for unit in view.units:
        if unit.page == KEEP:
            k, v, ks, km, vs = (view.keep_k[:, :unit.tokens], view.keep_v[:, :unit.tokens], view.keep_k_scale,
                                view.keep_k_mean, view.keep_v_scale)
        else:
            p = unit.page
            k, v, ks, km, vs = view.k_pages[p], view.v_pages[p], view.k_scale[p], view.k_mean[p], view.v_scale[p]
        k = k.float() * ks[:, None, :, None] + km[:, None]
        pos = torch.full((k.shape[1],), unit.position, device=k.device)
        keys.append(rotate_leading(k, pos, view.rope_dims, view.rope_theta).to(dtype))
        values.append((v.float() * vs[:, None]).to(dtype))
    return keys, values


def sdpa_temporal_attention(q, k, v, *, block_tokens=None, private_blocks=None, scale=None, kv_cache=None,
                            layer=None, precision="bf16", return_lse=False, backend="auto", frame_slots=None,
                            frame_lags=None):
    if frame_lags is not None and any(frame_lags):
        raise ValueError("frame_lags: the baseline engine runs no drafted passes")
    B, L, H, D = q.shape
    keys, values = [], []
    if kv_cache is not None:
        view = kv_cache.view(layer)
        keys, values = cached_keys_values(view, q.dtype)
        frames = torch.arange(L, device=q.device) // kv_cache.frame_tokens
        slots = torch.tensor(frame_slots, device=q.device)[frames] if frame_slots is not None else frames
        pos = view.num_slots + slots
        q = rotate_leading(q, pos, view.rope_dims, view.rope_theta).to(q.dtype)
        k = rotate_leading(k, pos, view.rope_dims, view.rope_theta).to(k.dtype)
    n_cached = sum(t.shape[1] for t in keys)
    kk, vv = torch.cat(keys + [k], 1).transpose(1, 2), torch.cat(values + [v], 1).transpose(1, 2)
    mask = None
    if block_tokens is not None and block_tokens < L:
        mask = torch.ones(L, n_cached + L, dtype=torch.bool, device=q.device)
        mask[:, n_cached:] = block_mask(L, block_tokens, private_blocks, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
