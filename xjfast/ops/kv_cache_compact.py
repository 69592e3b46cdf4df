"""kv_cache_compact: merge an evicted page's highest-attention tokens into the keep buffer.

Candidates are the tokens already kept (with the mass they had when kept) and the tokens of the
evicted page (with the mass the attention op accumulated for them). The `keep_tokens` heaviest
per batch element are kept, in candidate order (older first), and the buffer is requantized as
one unit (one K mean and scale per head, one V scale per channel), like a page.
"""
from __future__ import annotations

import torch

from xjfast.backends import check_backend, register, resolve, triton_interpreted
from xjfast.errors import check_tensor, is_int
from xjfast.ops.kv_cache_commit import STORAGE, quantize_unit, triton_head_dim_reason


def select_keep(keep_mass: torch.Tensor, keep_count: int, page_mass: torch.Tensor):
    """Candidate indices [B, count] (ascending; < keep_count: kept tokens, else page tokens) and masses."""
    mass = torch.cat((keep_mass[:, :keep_count], page_mass), dim=1)
    count = min(keep_mass.shape[1], mass.shape[1])
    top = mass.topk(count, dim=1).indices.sort(dim=1).values
    return top, mass.gather(1, top)


def kv_cache_compact(keep, keep_mass, keep_count: int, page, page_mass, *, backend="auto") -> int:
    """Merge one evicted page into the keep buffer in place; returns the new number of kept tokens.

    keep = (k [B, K, H, D], v, k_scale [B, H], k_mean [B, H, D], v_scale [B, H, D]), keep_mass [B, K];
    page = (k [B, T, H, D], v, k_scale, k_mean, v_scale) of the evicted page, page_mass [B, T].
    """
    check_backend(backend)
    names = ("k", "v", "k_scale", "k_mean", "v_scale")
    for prefix, group in (("keep", keep), ("page", page)):
        if not isinstance(group, (tuple, list)) or len(group) != 5:
            raise ValueError(f"{prefix}: expected 5 tensors ({', '.join(names)}), got {group!r:.80}")
    check_tensor("keep.k", keep[0], dtypes=STORAGE, ndim=4)
    B, K, H, D = keep[0].shape
    if not B * H * D:
        raise ValueError(f"keep.k: expected [B, K, H, D] with B, H and D >= 1, got {tuple(keep[0].shape)}")
    T = page[0].shape[1] if isinstance(page[0], torch.Tensor) and page[0].dim() == 4 else None
    for prefix, group, tokens in (("keep", keep, K), ("page", page, T)):
        for name, t in zip(names, group):
            # one storage dtype throughout: a cache stores every unit alike
            check_tensor(f"{prefix}.{name}", t, dtypes=(keep[0].dtype,) if name in "kv" else (torch.float32,),
                         device=keep[0].device)
            shape = {"k": (B, tokens, H, D), "v": (B, tokens, H, D), "k_scale": (B, H)}.get(name, (B, H, D))
            if tuple(t.shape) != shape:
                like_keep = prefix == "page" and name in "kv"
                expected = f"[{B}, T, {H}, {D}] like the keep buffer" if like_keep else str(list(shape))
                raise ValueError(f"{prefix}.{name}: expected shape {expected}, got {tuple(t.shape)}")
            if not t.is_contiguous():  # cache storage; the kernels index it as such
                raise ValueError(f"{prefix}.{name}: expected a contiguous tensor (cache storage), got strides {t.stride()}")
    for name, mass in (("keep_mass", keep_mass), ("page_mass", page_mass)):
        check_tensor(name, mass, dtypes=(torch.float32,), device=keep[0].device)
    if keep_mass.shape != (B, K) or page_mass.shape != page[0].shape[:2]:
        raise ValueError(f"keep_mass/page_mass: expected shapes {(B, K)} and {tuple(page[0].shape[:2])}, "
                         f"got {tuple(keep_mass.shape)} and {tuple(page_mass.shape)}")
    if not is_int(keep_count) or not 0 <= keep_count <= K:
        raise ValueError(f"keep_count: expected an int in [0, {K}], got {keep_count}")
    top, mass = select_keep(keep_mass, keep_count, page_mass)
    if top.shape[1] == 0:  # nothing to keep (no slots, or no candidates): the buffer stays as it is
        return 0
    args = (keep, keep_count, page, top)
    resolve("kv_cache_compact", backend, keep[0].device, args).fn(*args)
    keep_mass[:, :top.shape[1]] = mass
    return top.shape[1]


def _dequantize(k, v, k_scale, k_mean, v_scale):
    return k.float() * k_scale[:, None, :, None] + k_mean[:, None], v.float() * v_scale[:, None]


@register("kv_cache_compact", "reference")
def kv_cache_compact_reference(keep, keep_count, page, top):
    k_old, v_old = _dequantize(keep[0][:, :keep_count], keep[1][:, :keep_count], *keep[2:])
    k_new, v_new = _dequantize(*page)
    H, D = k_old.shape[2:]
    gather = top[:, :, None, None].expand(-1, -1, H, D)
    k = torch.cat((k_old, k_new), 1).gather(1, gather)
    v = torch.cat((v_old, v_new), 1).gather(1, gather)
    kq, vq, ks, km, vs = quantize_unit(k, v, keep[0].dtype)
    count = top.shape[1]
    keep[0][:, :count], keep[1][:, :count] = kq, vq
    keep[2].copy_(ks), keep[3].copy_(km), keep[4].copy_(vs)


@register("kv_cache_compact", "triton", min_capability=(8, 9),
          supports=lambda keep, *_: triton_head_dim_reason(keep[0].shape[-1]))
def kv_cache_compact_triton(*args):
    from xjfast.kernels.kv_cache_compact import kv_cache_compact as launch
    launch(*args, interpret=triton_interpreted())


def _cuda_supports(keep, keep_count, page, top) -> str | None:
    from xjfast.ops._cuda import shared_memory_reason
    D = keep[0].shape[-1]
    if D not in (64, 128):
        return f"the CUDA kernel takes head_dim 64 or 128, got {D}"
    if reason := shared_memory_reason(keep[0].device):
        return reason
    for name, t in (("keep.k", keep[0]), ("keep.v", keep[1]), ("page.k", page[0]), ("page.v", page[1])):
        if t.data_ptr() % 16:  # contiguous (checked): rows of D bytes or more, 16-byte multiples
            return (f"{name}: the CUDA kernel moves 16-byte vectors, so the storage must start 16-byte aligned "
                    f"(backend='triton' reads any), got address {t.data_ptr():#x}")
    return None


@register("kv_cache_compact", "cuda", min_capability=(9, 0), supports=_cuda_supports)
def kv_cache_compact_cuda(keep, keep_count, page, top):
    """csrc/kv_cache_compact.cu: a thread-block cluster per (b, head) (clusters: compute capability
    9.0), rows moved 16 bytes at a time (the storage must be 16-byte aligned: a ValueError otherwise)."""
    from xjfast.ops._cuda import DTYPE_CODES, extension, stream_handle
    B, K, H, D = keep[0].shape
    top = top.contiguous()
    extension().kv_cache_compact([t.data_ptr() for t in keep], [t.data_ptr() for t in page], top.data_ptr(),
                                 DTYPE_CODES[keep[0].dtype], [B, K, page[0].shape[1], H, D], keep_count,
                                 top.shape[1], stream_handle(keep[0].device))
