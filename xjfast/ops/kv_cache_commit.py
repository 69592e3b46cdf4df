"""kv_cache_commit: quantize whole frames of K/V into pages of a paged cache, in one pass.

Each page gets: K minus its per-(b, head, channel) mean, in e4m3 with one fp32 scale per
(b, head); V in e4m3 with one fp32 scale per (b, head, channel); and the mean itself. With a
bf16/fp32 storage the values are stored unquantized (K still centred) with unit scales.
The attention op uses the same quantization for the keys of its own pass.
"""
from __future__ import annotations

import torch

from xjfast.backends import heads_grid_reason, register, resolve, triton_interpreted
from xjfast.errors import check_tensor
from xjfast.ops.fp8 import E4M3, scale_from_amax, to_e4m3

STORAGE = (E4M3, torch.bfloat16, torch.float32)
INPUTS = (torch.bfloat16, torch.float16, torch.float32)


def quantize_unit(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
    """[B, n, H, D] K/V -> (K values, V values, K scale [B, H], K mean [B, H, D], V scale [B, H, D])."""
    k, v = k.float(), v.float()
    mean = k.mean(dim=1)
    centered = k - mean[:, None]
    if dtype != E4M3:
        ones = torch.ones(k.shape[0], k.shape[2], device=k.device)
        return centered.to(dtype), v.to(dtype), ones, mean, torch.ones_like(mean)
    k_scale = scale_from_amax(centered.abs().amax(dim=(1, 3)))
    v_scale = scale_from_amax(v.abs().amax(dim=1))
    return to_e4m3(centered, k_scale[:, None, :, None]), to_e4m3(v, v_scale[:, None]), k_scale, mean, v_scale


def kv_cache_commit(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids, *, backend="auto"):
    """Write frame i of k/v [B, n*T, H, D] into page `page_ids[i]` of one layer's storage.

    k_pages/v_pages [P, B, T, H, D] (e4m3, bf16 or fp32), k_scale [P, B, H], k_mean and
    v_scale [P, B, H, D] fp32; page_ids: n distinct page indices (int32 tensor on k's device).
    The reference checks the ids; the kernels cannot without a device sync, and write nothing
    for an id outside [0, P).
    """
    check_tensor("k", k, dtypes=INPUTS, ndim=4, unit_last_stride=True)
    check_tensor("v", v, dtypes=(k.dtype,), ndim=4, device=k.device, unit_last_stride=True)
    check_tensor("k_pages", k_pages, dtypes=STORAGE, ndim=5, device=k.device, nonempty=True)
    check_tensor("v_pages", v_pages, dtypes=(k_pages.dtype,), ndim=5, device=k.device)
    P, B, T, H, D = k_pages.shape
    for name, t, shape in (("v_pages", v_pages, (P, B, T, H, D)), ("k_scale", k_scale, (P, B, H)),
                           ("k_mean", k_mean, (P, B, H, D)), ("v_scale", v_scale, (P, B, H, D))):
        check_tensor(name, t, dtypes=(torch.float32,) if name != "v_pages" else None, device=k.device)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} to match k_pages, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (cache storage), got strides {t.stride()}")
    if not k_pages.is_contiguous():
        raise ValueError(f"k_pages: expected a contiguous tensor (cache storage), got strides {k_pages.stride()}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D) or k.shape[1] % T or k.shape[1] == 0:
        raise ValueError(f"k, v: expected shape [{B}, n*{T}, {H}, {D}] (whole pages), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    n = k.shape[1] // T
    check_tensor("page_ids", page_ids, dtypes=(torch.int32, torch.int64), ndim=1, device=k.device)
    if page_ids.numel() != n:
        raise ValueError(f"page_ids: expected {n} page indices (one per frame of k), got {page_ids.numel()}")
    # the kernels read the ids with stride 1
    args = (k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids.contiguous())
    resolve("kv_cache_commit", backend, k.device, args).fn(*args)


@register("kv_cache_commit", "reference")
def kv_cache_commit_reference(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids):
    P, T = k_pages.shape[0], k_pages.shape[2]
    ids = page_ids.tolist()
    if not all(0 <= page < P for page in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"page_ids: expected distinct page indices in [0, {P}), got {ids}")
    for i, page in enumerate(ids):
        frame = slice(i * T, (i + 1) * T)
        kq, vq, ks, km, vs = quantize_unit(k[:, frame], v[:, frame], k_pages.dtype)
        k_pages[page], v_pages[page], k_scale[page], k_mean[page], v_scale[page] = kq, vq, ks, km, vs


def triton_head_dim_reason(head_dim: int) -> str | None:
    """The Triton cache kernels hold a row of head_dim channels in one block (tl.arange)."""
    if head_dim & (head_dim - 1):
        return f"the Triton kernel takes a power-of-two head_dim, got {head_dim}"
    return None


def _triton_supports(k, *_) -> str | None:
    B, _, H, D = k.shape
    return triton_head_dim_reason(D) or heads_grid_reason("Triton", B, H)


@register("kv_cache_commit", "triton", min_capability=(8, 9), supports=_triton_supports)
def kv_cache_commit_triton(*args):
    from xjfast.kernels.kv_cache_commit import kv_cache_commit as launch
    launch(*args, interpret=triton_interpreted())


CUDA_MAX_CLUSTER, CUDA_MIN_CHUNK = 8, 128  # csrc/kv_cache_commit.cu: a unit takes one CTA per 128 tokens, up to 8


def _cuda_supports(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids) -> str | None:
    """What the CUDA entry point would refuse with a ValueError, so that auto goes elsewhere."""
    from xjfast.ops._cuda import aligned_16, shared_memory_reason
    if k.shape[-1] not in (64, 128):
        return f"the CUDA kernel takes head_dim 64 or 128, got {k.shape[-1]}"
    if reason := shared_memory_reason(k.device):
        return reason
    for name, t in (("k", k), ("v", v)):
        if not aligned_16(t, unit_dims=False):
            return (f"{name}: the CUDA kernel reads 16-byte vectors, so the address and the (b, token, head) strides "
                    f"must be multiples of 16 bytes (backend='triton' reads any), got strides {t.stride()}")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if t.data_ptr() % 16:  # contiguous (checked): rows of D elements, 16-byte multiples
            return (f"{name}: the CUDA kernel stores 16-byte vectors, so the storage must start 16-byte aligned "
                    f"(backend='triton' writes any), got address {t.data_ptr():#x}")
    _, B, T, H, _ = k_pages.shape
    units, cluster = k.shape[1] // T * B * H, min(CUDA_MAX_CLUSTER, -(-T // CUDA_MIN_CHUNK))
    if units * cluster > 2**31 - 1:  # k and v may be expanded: no memory need stand behind them
        return (f"the CUDA kernel launches {cluster} CTAs per (frame, batch, head) on one grid axis of at most 2^31 - 1, "
                f"got {units} units")
    return None


# Thread-block clusters (one frame's head spread over up to 8 SMs) need compute capability 9.0.
@register("kv_cache_commit", "cuda", min_capability=(9, 0), supports=_cuda_supports)
def kv_cache_commit_cuda(k, v, k_pages, v_pages, k_scale, k_mean, v_scale, page_ids):
    """csrc/kv_cache_commit.cu. k/v and the pages are read and written 16 bytes at a time (what
    _cuda_supports checks; the bindings raise ValueError for a direct call that breaks it).
    A page id outside [0, P) is skipped by the kernel (the op cannot read device ids without a sync)."""
    from xjfast.ops._cuda import DTYPE_CODES, extension, stream_handle
    P, B, T, H, D = k_pages.shape
    # int32 for the kernel, an int64 id it cannot hold made -1 (skipped, as any id outside [0, P),
    # rather than truncated onto a page); held until the launch: its memory must outlive the enqueue
    ids = page_ids if page_ids.dtype == torch.int32 else \
        torch.where((page_ids >= 0) & (page_ids < P), page_ids, -1).to(torch.int32)
    extension().kv_cache_commit(
        k.data_ptr(), v.data_ptr(), list(k.stride()[:3]), list(v.stride()[:3]), ids.data_ptr(),
        k_pages.data_ptr(), v_pages.data_ptr(), k_scale.data_ptr(), k_mean.data_ptr(), v_scale.data_ptr(),
        DTYPE_CODES[k.dtype], DTYPE_CODES[k_pages.dtype], [page_ids.numel(), B, T, H, D, P], stream_handle(k.device))
