"""kv_cache_commit: every backend writes the pages the reference writes."""
import pytest
import torch

from xjfast.ops.kv_cache_commit import kv_cache_commit

from backends import DEVICE, fast_backends, poisoned

E4M3 = torch.float8_e4m3fn


def storage(P, B, T, H, D, dtype):
    return [poisoned((P, B, T, H, D), dtype), poisoned((P, B, T, H, D), dtype), poisoned((P, B, H), torch.float32),
            poisoned((P, B, H, D), torch.float32), poisoned((P, B, H, D), torch.float32)]


def commit_both(backend, B, T, H, D, frames, dtype, store, strided=False):
    k = torch.randn(B, frames * T, H, D, device=DEVICE) + 4 * torch.randn(1, 1, H, D, device=DEVICE)
    v = torch.randn(B, frames * T, H, D, device=DEVICE) * torch.rand(1, 1, H, D, device=DEVICE) * 10
    k, v = k.to(dtype), v.to(dtype)
    if strided:  # a view with a unit last stride but padded heads, as a fused qkv projection gives
        k = torch.cat([k, k], dim=2)[:, :, :H]
    pages = torch.randperm(frames + 1, device=DEVICE)[:frames].to(torch.int32)
    ref, out = storage(frames + 1, B, T, H, D, store), storage(frames + 1, B, T, H, D, store)
    kv_cache_commit(k, v, *ref, pages, backend="reference")
    kv_cache_commit(k, v, *out, pages, backend=backend)
    return pages.long(), ref, out


@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("store", [E4M3, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_commit_matches_reference(backend, store, strided):
    pages, ref, out = commit_both(backend, 2, 24, 2, 64, 2, torch.bfloat16, store, strided)
    for name, r, o in zip(("k_pages", "v_pages", "k_scale", "k_mean", "v_scale"), ref, out):
        r, o = r[pages].float(), o[pages].float()
        assert not o.isnan().any(), f"{name}: elements left unwritten"
        # values: e4m3 (or bf16) of the same fp32 input, whose last bits may differ (a mean summed in
        # another order): a value may round to the neighbouring grid point, one step away at most
        ulp, smallest_step = (2.0 ** -3, 2.0 ** -9) if store == E4M3 else (2.0 ** -7, 1e-6)
        assert ((o - r).abs() <= torch.clamp(ulp * r.abs(), min=smallest_step)).all(), name
        assert ((o - r).norm() / r.norm()) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_commit_stream_shape(backend, dtype, D):
    pages, ref, out = commit_both(backend, 1, 1560, 12, D, 3, dtype, E4M3)
    for r, o in zip(ref, out):
        r, o = r[pages].float(), o[pages].float()
        assert not o.isnan().any() and ((o - r).norm() / r.norm()) < 1e-2


def test_bad_arguments_name_them():
    B, T, H, D = 1, 8, 2, 64
    st = storage(2, B, T, H, D, E4M3)
    k = torch.randn(B, T, H, D, device=DEVICE)
    ids = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="k, v: expected shape"):
        kv_cache_commit(k[:, :5], k[:, :5], *st, ids)
    with pytest.raises(ValueError, match="page_ids: expected 1 page indices"):
        kv_cache_commit(k, k, *st, ids.repeat(2))
    with pytest.raises(TypeError, match="k_pages: expected dtype"):
        kv_cache_commit(k, k, st[0].to(torch.int8), *st[1:], ids)
    with pytest.raises(ValueError, match="k_mean: expected shape"):
        kv_cache_commit(k, k, *st[:3], st[3][:, :, :1], st[4], ids)
