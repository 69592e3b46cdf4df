"""Triton kv_cache_commit: bf16/fp16 K/V frames -> e4m3 pages + K scale/mean + V scales.

One program per (frame, batch, head). Pass 1 reads the frame's K and V once for the per-channel
sum, max and min of K and max |V|; the amax of K minus its mean is then max(max - mean,
mean - min) per channel, with no second statistics pass. Pass 2 re-reads (from L2) and writes
the e4m3 values. The same kernel quantizes the keys of an attention pass into a workspace.
"""
import torch
import triton
import triton.language as tl

from .fp8 import store_unit_tile, unit_scales, unit_stats

BLOCK_T = 64


@triton.jit
def kv_cache_commit_kernel(
    k_ptr, v_ptr, page_ids_ptr, kp_ptr, vp_ptr, ks_ptr, km_ptr, vs_ptr,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    B, H, T,
    D: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    frame = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    page = tl.load(page_ids_ptr + frame).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    k_src = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + (frame * T).to(tl.int64) * stride_kl
    v_src = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + (frame * T).to(tl.int64) * stride_vl
    # page storage is contiguous [P, B, T, H, D]; scales [P, B, H] and [P, B, H, D]
    row = (page * B + b) * H + h
    dst = (page * B + b) * T * H * D + h * D

    k_sum = tl.zeros([D], dtype=tl.float32)
    k_max = tl.full([D], float("-inf"), dtype=tl.float32)
    k_min = tl.full([D], float("inf"), dtype=tl.float32)
    v_amax = tl.zeros([D], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        live = (t < T)[:, None]
        k = tl.load(k_src + t[:, None] * stride_kl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_src + t[:, None] * stride_vl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
        k_sum, k_max, k_min, v_amax = unit_stats(k, v, live, k_sum, k_max, k_min, v_amax)
    mean, k_scale, v_scale = unit_scales(k_sum, k_max, k_min, v_amax, T, FP8)
    tl.store(ks_ptr + row, k_scale)
    tl.store(km_ptr + row * D + offs_d, mean)
    tl.store(vs_ptr + row * D + offs_d, v_scale)

    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        live = (t < T)[:, None]
        k = tl.load(k_src + t[:, None] * stride_kl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_src + t[:, None] * stride_vl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
        out = dst + t[:, None].to(tl.int64) * (H * D) + offs_d[None, :]
        store_unit_tile(kp_ptr + out, vp_ptr + out, k, v, live, mean, k_scale, v_scale, FP8, INTERPRET)


def kv_cache_commit(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids, *, interpret=False):
    """Launch on validated tensors (see xjfast.ops.kv_cache_commit)."""
    P, B, T, H, D = k_pages.shape
    n = page_ids.numel()
    grid = (n, B * H)
    kv_cache_commit_kernel[grid](
        k, v, page_ids, k_pages, v_pages, k_scale, k_mean, v_scale,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        B, H, T, D=D, BLOCK_T=BLOCK_T, FP8=k_pages.dtype == torch.float8_e4m3fn, INTERPRET=interpret,
        num_warps=4,
    )
