"""Triton kv_cache_compact: gather the selected tokens (from the keep buffer or the evicted page),
dequantize them and requantize the keep buffer as one unit, in place.

A unit (batch, head) of `count` slots is split into chunks of whole tiles, like the commit's, so
that a 512-token buffer of 12 heads fills the GPU (a program per unit would keep 12 SMs busy).
Two launches:
- stats: one program per chunk gathers its slots' candidates, folds their statistics and writes
  the chunk's partial sum, max and min of K and max |V|; it copies the raw rows that come from
  the keep buffer to a scratch buffer at their new slot, and the first chunk also copies the
  buffer's old scales. Nothing of the keep buffer is written.
- quantize: one program per chunk combines the unit's partials in chunk order (every program of
  a unit computes the same bits; the first also stores them), gathers its candidates again (kept
  ones from the scratch copy, the page's from the page) and writes its slots.
Every read of the keep buffer happens in the first launch and every write in the second, so the
in-place update is safe whatever chunk reads which slot.
"""
import torch
import triton
import triton.language as tl

from .fp8 import combine_stats, store_stats, store_unit_tile, unit_scales, unit_stats
from .kv_cache_commit import INTERPRET_BLOCK_T, INTERPRET_SMS, PROGRAMS_PER_SM, WARPS, chunking, sm_count
from .launch import launch

BLOCK_T = 16  # slots per tile: at 8 warps ~120 registers (32 or 64 took 240-255: four gathered tiles in flight)


@triton.jit
def _unit(keep_k, keep_v, page_k, page_v, page_ks, page_km, page_vs, scratch_k, scratch_v, top_ptr, count, K, T,
          H, D: tl.constexpr):
    """This program's unit (b * H + h) and head h, its pointers moved to batch element b (keep
    [B, K, H, D], page [B, T, H, D], scratch [B, count, H, D], top [B, count]), and the page's
    scales (k_scale, k_mean [D], v_scale [D])."""
    unit = tl.program_id(0)
    b = (unit // H).to(tl.int64)
    offs_d = tl.arange(0, D)
    return (unit, unit % H, keep_k + b * K * H * D, keep_v + b * K * H * D, page_k + b * T * H * D,
            page_v + b * T * H * D, scratch_k + b * count * H * D, scratch_v + b * count * H * D, top_ptr + b * count,
            tl.load(page_ks + unit), tl.load(page_km + unit * D + offs_d), tl.load(page_vs + unit * D + offs_d))


@triton.jit
def _candidates(top_ptr, j, count, keep_count, H, h, D: tl.constexpr, offs_d):
    """For slots j: which candidate each takes, whether it comes from the keep buffer or from the
    page, and the candidate's row offset in its source ([tokens, H, D] storage)."""
    live = j < count
    idx = tl.load(top_ptr + j, mask=live, other=0)
    from_keep = (live & (idx < keep_count))[:, None]
    from_page = (live & (idx >= keep_count))[:, None]
    keep_off = (idx * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
    page_off = ((idx - keep_count) * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
    return live, from_keep, from_page, keep_off, page_off


@triton.jit
def _dequantize(k_keep, v_keep, k_page, v_page, from_keep, old_ks, old_km, old_vs, new_ks, new_km, new_vs):
    """The candidates' K, V in fp32: each source dequantized with its own scales and mean."""
    k = tl.where(from_keep, k_keep.to(tl.float32) * old_ks + old_km[None, :],
                 k_page.to(tl.float32) * new_ks + new_km[None, :])
    v = tl.where(from_keep, v_keep.to(tl.float32) * old_vs[None, :], v_page.to(tl.float32) * new_vs[None, :])
    return k, v


# keep_count and count grow as the keep buffer fills, and the scale rows read as scalars start
# 16-byte aligned or not with the layer and page: not specialized, so no compile mid-stream
@triton.jit(do_not_specialize=["keep_count", "count"], do_not_specialize_on_alignment=["keep_ks", "page_ks"])
def kv_cache_compact_stats_kernel(
    keep_k, keep_v, keep_ks, keep_km, keep_vs, page_k, page_v, page_ks, page_km, page_vs, top_ptr,
    scratch_k, scratch_v, stats_ptr, old_ptr,
    keep_count, count, K, T, H, chunk,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """stats[unit, chunk] = (sum K, max K, min K, max |V|) [4, D] over the chunk's candidates;
    scratch[b, j, h] = keep[b, top[j], h] for the chunk's slots j filled from the keep buffer;
    old[unit] = the keep buffer's (k_scale, k_mean [D], v_scale [D]) (first chunk)."""
    unit, h, keep_k, keep_v, page_k, page_v, scratch_k, scratch_v, top_ptr, new_ks, new_km, new_vs = _unit(
        keep_k, keep_v, page_k, page_v, page_ks, page_km, page_vs, scratch_k, scratch_v, top_ptr, count, K, T, H, D)
    c = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    old_ks, old_km, old_vs = tl.load(keep_ks + unit), tl.load(keep_km + unit * D + offs_d), tl.load(keep_vs + unit * D + offs_d)
    if c == 0:
        old = old_ptr + unit * (2 * D + 1)
        tl.store(old + offs_d, old_km)
        tl.store(old + D + offs_d, old_vs)
        tl.store(old + 2 * D, old_ks)

    k_sum = tl.zeros([D], dtype=tl.float32)
    k_max = tl.full([D], float("-inf"), dtype=tl.float32)
    k_min = tl.full([D], float("inf"), dtype=tl.float32)
    v_amax = tl.zeros([D], dtype=tl.float32)
    for t0 in range(c * chunk, tl.minimum(c * chunk + chunk, count), BLOCK_T):
        j = t0 + offs_t
        live, from_keep, from_page, keep_off, page_off = _candidates(top_ptr, j, count, keep_count, H, h, D, offs_d)
        k_keep = tl.load(keep_k + keep_off, mask=from_keep, other=0.0)
        v_keep = tl.load(keep_v + keep_off, mask=from_keep, other=0.0)
        out = (j * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
        tl.store(scratch_k + out, k_keep, mask=from_keep)
        tl.store(scratch_v + out, v_keep, mask=from_keep)
        k, v = _dequantize(k_keep, v_keep, tl.load(page_k + page_off, mask=from_page, other=0.0),
                           tl.load(page_v + page_off, mask=from_page, other=0.0), from_keep,
                           old_ks, old_km, old_vs, new_ks, new_km, new_vs)
        k_sum, k_max, k_min, v_amax = unit_stats(k, v, live[:, None], k_sum, k_max, k_min, v_amax)
    store_stats(stats_ptr + (unit * tl.num_programs(1) + c) * 4 * D, offs_d, D, k_sum, k_max, k_min, v_amax)


@triton.jit(do_not_specialize=["keep_count", "count"], do_not_specialize_on_alignment=["keep_ks", "page_ks"])
def kv_cache_compact_kernel(
    keep_k, keep_v, keep_ks, keep_km, keep_vs, page_k, page_v, page_ks, page_km, page_vs, top_ptr,
    scratch_k, scratch_v, stats_ptr, old_ptr,
    keep_count, count, K, T, H, chunk,
    D: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The unit's new scales from its chunks' statistics, then this chunk's slots of the buffer."""
    unit, h, keep_k, keep_v, page_k, page_v, scratch_k, scratch_v, top_ptr, new_ks, new_km, new_vs = _unit(
        keep_k, keep_v, page_k, page_v, page_ks, page_km, page_vs, scratch_k, scratch_v, top_ptr, count, K, T, H, D)
    c = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    old = old_ptr + unit * (2 * D + 1)
    old_km, old_vs, old_ks = tl.load(old + offs_d), tl.load(old + D + offs_d), tl.load(old + 2 * D)

    k_sum, k_max, k_min, v_amax = combine_stats(stats_ptr + unit * tl.num_programs(1) * 4 * D,
                                                tl.num_programs(1), offs_d, D)
    mean, k_scale, v_scale = unit_scales(k_sum, k_max, k_min, v_amax, count, FP8)
    if c == 0:  # every program read the old scales from the stats launch's copy
        tl.store(keep_ks + unit, k_scale)
        tl.store(keep_km + unit * D + offs_d, mean)
        tl.store(keep_vs + unit * D + offs_d, v_scale)
    for t0 in range(c * chunk, tl.minimum(c * chunk + chunk, count), BLOCK_T):
        j = t0 + offs_t
        live, from_keep, from_page, _, page_off = _candidates(top_ptr, j, count, keep_count, H, h, D, offs_d)
        out = (j * H + h)[:, None].to(tl.int64) * D + offs_d[None, :]
        k, v = _dequantize(tl.load(scratch_k + out, mask=from_keep, other=0.0),
                           tl.load(scratch_v + out, mask=from_keep, other=0.0),
                           tl.load(page_k + page_off, mask=from_page, other=0.0),
                           tl.load(page_v + page_off, mask=from_page, other=0.0), from_keep,
                           old_ks, old_km, old_vs, new_ks, new_km, new_vs)
        store_unit_tile(keep_k + out, keep_v + out, k, v, live[:, None], mean, k_scale, v_scale, FP8, INTERPRET)


def kv_cache_compact(keep, keep_count, page, top, *, interpret=False):
    """Launch on validated tensors (see xjfast.ops.kv_cache_compact)."""
    B, K, H, D = keep[0].shape
    T = page[0].shape[1]
    top = top.contiguous()
    count = top.shape[1]
    block_t = INTERPRET_BLOCK_T if interpret else BLOCK_T
    sms = INTERPRET_SMS if interpret else sm_count(keep[0].device)
    chunk, chunks = chunking(B * H, count, block_t, PROGRAMS_PER_SM * sms)
    scratch = torch.empty((2, B, count, H, D), device=keep[0].device, dtype=keep[0].dtype)
    stats = torch.empty(B * H * chunks * 4 * D, device=keep[0].device, dtype=torch.float32)
    old = torch.empty(B * H * (2 * D + 1), device=keep[0].device, dtype=torch.float32)
    args = (*keep, *page, top, scratch[0], scratch[1], stats, old, keep_count, count, K, T, H, chunk)
    grid = (B * H, chunks)
    launch(kv_cache_compact_stats_kernel, grid, *args, D=D, BLOCK_T=block_t, num_warps=WARPS)
    launch(kv_cache_compact_kernel, grid, *args, D=D, BLOCK_T=block_t, FP8=keep[0].dtype == torch.float8_e4m3fn,
           INTERPRET=interpret, num_warps=WARPS)
