"""Triton kv_cache_compact: gather the selected tokens (from the keep buffer or the evicted page),
dequantize them and requantize the keep buffer as one unit, in place.

One program per (batch, head). The selection `top` is ascending, so the token written to slot j
comes from candidate top[j] >= j: reading tile t before writing it never reads a slot that an
earlier tile overwrote, and the in-place update is safe without a copy.
"""
import torch
import triton
import triton.language as tl

from .fp8 import store_unit_tile, unit_scales, unit_stats

BLOCK_T = 32


@triton.jit
def _gather(top_ptr, j, live, offs_d, keep_count, keep_k, keep_v, page_k, page_v, h, H, D: tl.constexpr,
            old_ks, old_km, old_vs, new_ks, new_km, new_vs):
    idx = tl.load(top_ptr + j, mask=live, other=0)
    kept = idx < keep_count
    from_keep = (live & kept)[:, None]
    from_page = (live & (idx >= keep_count))[:, None]
    keep_off = (idx * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
    page_off = ((idx - keep_count) * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
    k_keep = tl.load(keep_k + keep_off, mask=from_keep, other=0.0).to(tl.float32) * old_ks + old_km[None, :]
    k_page = tl.load(page_k + page_off, mask=from_page, other=0.0).to(tl.float32) * new_ks + new_km[None, :]
    v_keep = tl.load(keep_v + keep_off, mask=from_keep, other=0.0).to(tl.float32) * old_vs[None, :]
    v_page = tl.load(page_v + page_off, mask=from_page, other=0.0).to(tl.float32) * new_vs[None, :]
    return tl.where(kept[:, None], k_keep, k_page), tl.where(kept[:, None], v_keep, v_page)


@triton.jit
def kv_cache_compact_kernel(
    keep_k, keep_v, keep_ks, keep_km, keep_vs, page_k, page_v, page_ks, page_km, page_vs, top_ptr,
    keep_count, count, K, T, H,
    D: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    row = b * H + h
    keep_k += b.to(tl.int64) * K * H * D
    keep_v += b.to(tl.int64) * K * H * D
    page_k += b.to(tl.int64) * T * H * D
    page_v += b.to(tl.int64) * T * H * D
    top_ptr += b.to(tl.int64) * count
    old = (tl.load(keep_ks + row), tl.load(keep_km + row * D + offs_d), tl.load(keep_vs + row * D + offs_d))
    new = (tl.load(page_ks + row), tl.load(page_km + row * D + offs_d), tl.load(page_vs + row * D + offs_d))

    k_sum = tl.zeros([D], dtype=tl.float32)
    k_max = tl.full([D], float("-inf"), dtype=tl.float32)
    k_min = tl.full([D], float("inf"), dtype=tl.float32)
    v_amax = tl.zeros([D], dtype=tl.float32)
    for t0 in range(0, count, BLOCK_T):
        j = t0 + offs_t
        live = j < count
        k, v = _gather(top_ptr, j, live, offs_d, keep_count, keep_k, keep_v, page_k, page_v, h, H, D,
                       old[0], old[1], old[2], new[0], new[1], new[2])
        k_sum, k_max, k_min, v_amax = unit_stats(k, v, live[:, None], k_sum, k_max, k_min, v_amax)
    mean, k_scale, v_scale = unit_scales(k_sum, k_max, k_min, v_amax, count, FP8)
    for t0 in range(0, count, BLOCK_T):
        j = t0 + offs_t
        live = j < count
        k, v = _gather(top_ptr, j, live, offs_d, keep_count, keep_k, keep_v, page_k, page_v, h, H, D,
                       old[0], old[1], old[2], new[0], new[1], new[2])
        out = (j * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
        store_unit_tile(keep_k + out, keep_v + out, k, v, live[:, None], mean, k_scale, v_scale, FP8, INTERPRET)
    tl.store(keep_ks + row, k_scale)
    tl.store(keep_km + row * D + offs_d, mean)
    tl.store(keep_vs + row * D + offs_d, v_scale)


def kv_cache_compact(keep, keep_count, page, top, *, interpret=False):
    """Launch on validated tensors (see xjfast.ops.kv_cache_compact)."""
    B, K, H, D = keep[0].shape
    T = page[0].shape[1]
    top = top.contiguous()
    kv_cache_compact_kernel[(B * H,)](
        *keep, *page, top, keep_count, top.shape[1], K, T, H,
        D=D, BLOCK_T=BLOCK_T, FP8=keep[0].dtype == torch.float8_e4m3fn, INTERPRET=interpret, num_warps=4,
    )
