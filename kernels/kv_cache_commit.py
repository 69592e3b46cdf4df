"""Triton kv_cache_commit: bf16/fp16 K/V frames -> e4m3 pages + K scale/mean + V scales.

A unit (frame, batch, head) is split into chunks of whole tiles, so that one frame of 12 heads
fills the GPU (a program per unit would leave ~90% of an H100's SMs idle). Two launches:
- stats: one program per chunk reads its K and V once and writes the chunk's per-channel sum, max
  and min of K and max |V|;
- quantize: one program per chunk combines the unit's partial statistics in chunk order (every
  program of a unit computes the same bits; the first also stores them), then re-reads its chunk
  (from L2: it was just read) and writes the e4m3 values. The amax of K minus its mean is
  max(max - mean, mean - min) per channel, with no second statistics pass.
The same kernels quantize the keys of an attention pass into a workspace.
"""
import functools

import torch
import triton
import triton.language as tl

from .fp8 import combine_stats, store_stats, store_unit_tile, unit_scales, unit_stats
from .launch import launch

BLOCK_T = 64            # tokens per tile
WARPS = 8               # a [64, 128] tile of K and of V in fp32: 64 values a thread at 8 warps
PROGRAMS_PER_SM = 2     # the chunking aims at this many programs per SM
INTERPRET_BLOCK_T = 16  # under the interpreter: small tiles, and "SMs" enough that
INTERPRET_SMS = 8       # the tests' small frames split into several chunks


@triton.jit
def _load_tile(k_src, v_src, t, T, stride_kl, stride_vl, offs_d):
    live = (t < T)[:, None]
    t = t[:, None].to(tl.int64)  # a unit may be a whole attention pass: T * stride past 2^31 elements
    k = tl.load(k_src + t * stride_kl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
    v = tl.load(v_src + t * stride_vl + offs_d[None, :], mask=live, other=0.0).to(tl.float32)
    return k, v, live


@triton.jit
def _unit_sources(k_ptr, v_ptr, frame, b, h, T, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh):
    k_src = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + (frame * T).to(tl.int64) * stride_kl
    v_src = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + (frame * T).to(tl.int64) * stride_vl
    return k_src, v_src


@triton.jit
def kv_cache_commit_stats_kernel(
    k_ptr, v_ptr, stats_ptr,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    H, T, chunk,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """stats[unit, chunk] = (sum K, max K, min K, max |V|) [4, D] over the chunk's tokens."""
    frame = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    c = tl.program_id(2)
    k_src, v_src = _unit_sources(k_ptr, v_ptr, frame, b, h, T, stride_kb, stride_kl, stride_kh,
                                 stride_vb, stride_vl, stride_vh)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    k_sum = tl.zeros([D], dtype=tl.float32)
    k_max = tl.full([D], float("-inf"), dtype=tl.float32)
    k_min = tl.full([D], float("inf"), dtype=tl.float32)
    v_amax = tl.zeros([D], dtype=tl.float32)
    for t0 in range(c * chunk, tl.minimum(c * chunk + chunk, T), BLOCK_T):
        k, v, live = _load_tile(k_src, v_src, t0 + offs_t, T, stride_kl, stride_vl, offs_d)
        k_sum, k_max, k_min, v_amax = unit_stats(k, v, live, k_sum, k_max, k_min, v_amax)
    out = stats_ptr + ((tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + c) * 4 * D
    store_stats(out, offs_d, D, k_sum, k_max, k_min, v_amax)


# P (pages in the storage, as many as a pass has frames when the attention quantizes its own keys)
# is only a bound, and page ids and K scales are read and written as scalars: specializing them
# would compile the kernel again for each class of value, for no better code
@triton.jit(do_not_specialize=["P"], do_not_specialize_on_alignment=["page_ids_ptr", "ks_ptr"])
def kv_cache_commit_kernel(
    k_ptr, v_ptr, stats_ptr, page_ids_ptr, kp_ptr, vp_ptr, ks_ptr, km_ptr, vs_ptr,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    P, B, H, T, chunk,
    D: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The unit's scales from its chunks' statistics, then this chunk's tokens into the page."""
    frame = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    c = tl.program_id(2)
    chunks = tl.num_programs(2)
    page = tl.load(page_ids_ptr + frame).to(tl.int64)
    valid = (page >= 0) & (page < P)  # an id outside the storage writes nothing (as the CUDA kernel)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)

    k_sum, k_max, k_min, v_amax = combine_stats(
        stats_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * chunks * 4 * D, chunks, offs_d, D)
    mean, k_scale, v_scale = unit_scales(k_sum, k_max, k_min, v_amax, T, FP8)
    # page storage is contiguous [P, B, T, H, D]; scales [P, B, H] and [P, B, H, D]
    row = (page * B + b) * H + h
    if (c == 0) & valid:
        tl.store(ks_ptr + row, k_scale)
        tl.store(km_ptr + row * D + offs_d, mean)
        tl.store(vs_ptr + row * D + offs_d, v_scale)

    k_src, v_src = _unit_sources(k_ptr, v_ptr, frame, b, h, T, stride_kb, stride_kl, stride_kh,
                                 stride_vb, stride_vl, stride_vh)
    dst = (page * B + b) * T * H * D + h * D
    for t0 in range(c * chunk, tl.minimum(c * chunk + chunk, T), BLOCK_T):
        t = t0 + offs_t
        k, v, _ = _load_tile(k_src, v_src, t, T, stride_kl, stride_vl, offs_d)
        out = dst + t[:, None].to(tl.int64) * (H * D) + offs_d[None, :]
        written = (t < tl.where(valid, T, 0))[:, None]
        store_unit_tile(kp_ptr + out, vp_ptr + out, k, v, written, mean, k_scale, v_scale, FP8, INTERPRET)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunking(units: int, T: int, block_t: int, programs: int) -> tuple[int, int]:
    """(tokens per chunk, chunks per unit): whole tiles per chunk, and about `programs` programs
    in all (never fewer than one chunk per unit, nor more chunks than tiles)."""
    tiles = triton.cdiv(T, block_t)
    wanted = max(1, min(tiles, triton.cdiv(programs, units)))
    chunk_tiles = triton.cdiv(tiles, wanted)
    return chunk_tiles * block_t, triton.cdiv(tiles, chunk_tiles)


def kv_cache_commit(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids, *, interpret=False):
    """Launch on validated tensors (see xjfast.ops.kv_cache_commit)."""
    P, B, T, H, D = k_pages.shape
    n = page_ids.numel()
    block_t = INTERPRET_BLOCK_T if interpret else BLOCK_T
    sms = INTERPRET_SMS if interpret else sm_count(k.device)
    chunk, chunks = chunking(n * B * H, T, block_t, PROGRAMS_PER_SM * sms)
    stats = torch.empty(n * B * H * chunks * 4 * D, device=k.device, dtype=torch.float32)
    grid = (n, B * H, chunks)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    launch(kv_cache_commit_stats_kernel, grid, k, v, stats, *strides, H, T, chunk, D=D, BLOCK_T=block_t, num_warps=WARPS)
    launch(
        kv_cache_commit_kernel, grid,
        k, v, stats, page_ids, k_pages, v_pages, k_scale, k_mean, v_scale, *strides, P, B, H, T, chunk,
        D=D, BLOCK_T=block_t, FP8=k_pages.dtype == torch.float8_e4m3fn, INTERPRET=interpret, num_warps=WARPS,
    )
