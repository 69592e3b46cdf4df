"""kv_cache_compact: every backend keeps the same tokens, quantized the same way."""
import pytest
import torch

from xjfast.ops.kv_cache_commit import quantize_unit
from xjfast.ops.kv_cache_compact import kv_cache_compact, select_keep

from backends import DEVICE, fast_backends, poisoned
from test_kv_cache_commit import assert_units_match

E4M3 = torch.float8_e4m3fn


def page(B, T, H, D, dtype):
    k = (torch.randn(B, T, H, D, device=DEVICE) * 4).to(dtype)
    v = (torch.randn(B, T, H, D, device=DEVICE) * 4).to(dtype)
    return [k, v, torch.rand(B, H, device=DEVICE) + 0.1, torch.randn(B, H, D, device=DEVICE),
            torch.rand(B, H, D, device=DEVICE) + 0.1]


def run(backend, dtype, B=2, K=12, T=16, H=2, D=64, evictions=3):
    torch.manual_seed(7)
    pages = [page(B, T, H, D, dtype) for _ in range(evictions)]
    masses = [torch.rand(B, T, device=DEVICE) for _ in range(evictions)]
    keep = page(B, K, H, D, dtype)
    keep_mass, count = torch.zeros(B, K, device=DEVICE), 0
    for p, m in zip(pages, masses):
        count = kv_cache_compact(keep, keep_mass, count, p, m, backend=backend)
    return keep, keep_mass, count


def dequantized(keep):
    k, v, ks, km, vs = keep
    return k.float() * ks[:, None, :, None] + km[:, None], v.float() * vs[:, None]


def test_reference_keeps_the_heaviest_candidates_oldest_first():
    mass_keep = torch.tensor([[0.9, 0.1, 0.5]])
    mass_page = torch.tensor([[0.2, 0.95, 0.05, 0.6]])
    top, mass = select_keep(torch.cat([mass_keep, torch.zeros(1, 0)], 1), 3, mass_page)
    assert top.tolist() == [[0, 4, 6]] and torch.allclose(mass, torch.tensor([[0.9, 0.95, 0.6]]))


@pytest.mark.parametrize("backend", fast_backends("kv_cache_compact"))
@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16])
@pytest.mark.parametrize("K,T", [(12, 16), (40, 24), (300, 256)], ids=["one-tile", "chunks", "cluster"])
def test_compact_matches_reference(backend, dtype, K, T):
    """(40, 24): the Triton kernels split each (b, head) into 3 chunks (interpreted: 16-slot tiles),
    and slots are filled from kept tokens that another chunk's slots held; (300, 256): the CUDA
    kernel spreads each (b, head) over a cluster of 3 CTAs, which share their statistics."""
    ref_keep, ref_mass, ref_count = run("reference", dtype, K=K, T=T)
    out_keep, out_mass, out_count = run(backend, dtype, K=K, T=T)
    assert out_count == ref_count == K and torch.equal(out_mass, ref_mass)
    for r, o in zip(dequantized(ref_keep), dequantized(out_keep)):
        assert ((o - r).norm() / r.norm()) < 1e-2


# ---- at the stream's shape, one eviction at a time against the reference ----------------------

def committed_unit(B, T, H, D, dtype, store):
    """A page as the cache holds it: random K (with a per-channel bias, so the mean matters) and V,
    quantized by the reference commit."""
    k = torch.randn(B, T, H, D, device=DEVICE) + 4 * torch.randn(1, 1, H, D, device=DEVICE)
    v = torch.randn(B, T, H, D, device=DEVICE) * (torch.rand(1, 1, H, D, device=DEVICE) * 10 + 0.1)
    return list(quantize_unit(k.to(dtype), v.to(dtype), store))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("kv_cache_compact"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("store,K", [(E4M3, 512), (torch.bfloat16, 512), (torch.bfloat16, 2600)],
                         ids=["e4m3-512", "bf16-512", "bf16-2600"])
@pytest.mark.parametrize("D", [64, 128])
def test_compact_stream_shape(backend, dtype, store, K, D):
    """512 slots: the CUDA kernel's 8-CTA clusters, rows staged in shared memory; 2600 bf16 slots
    at head_dim 128 do not fit there, and one CTA per (b, head) compacts in place."""
    B, T, H = 1, 1560, 12
    torch.manual_seed(D)
    # the keep buffer and its scales start poisoned: the first eviction fills them from the page alone
    keep = [poisoned((B, K, H, D), store), poisoned((B, K, H, D), store), poisoned((B, H), torch.float32),
            poisoned((B, H, D), torch.float32), poisoned((B, H, D), torch.float32)]
    keep_mass, count = torch.zeros(B, K, device=DEVICE), 0
    for _ in range(3):  # then the candidates come from both the buffer and the page
        page, mass = committed_unit(B, T, H, D, dtype, store), torch.rand(B, T, device=DEVICE)
        ref_keep, ref_mass = [t.clone() for t in keep], keep_mass.clone()
        out_keep, out_mass = [t.clone() for t in keep], keep_mass.clone()
        ref_count = kv_cache_compact(ref_keep, ref_mass, count, page, mass, backend="reference")
        out_count = kv_cache_compact(out_keep, out_mass, count, page, mass, backend=backend)
        assert out_count == ref_count == min(K, count + T) and torch.equal(out_mass, ref_mass)
        # the slots past the count are not the op's to write: they stay poisoned in both
        assert all(o[:, ref_count:].float().isnan().all() for o in out_keep[:2])
        assert_units_match([t[:, :ref_count] for t in ref_keep[:2]] + ref_keep[2:],
                           [t[:, :ref_count] for t in out_keep[:2]] + out_keep[2:], store)
        keep, keep_mass, count = ref_keep, ref_mass, ref_count  # go on from the reference's state


def test_nothing_to_keep_leaves_the_buffer_as_it_is():
    keep = page(1, 4, 2, 64, E4M3)
    before = [t.clone() for t in keep]
    empty = page(1, 0, 2, 64, E4M3)
    assert kv_cache_compact(keep, torch.zeros(1, 4, device=DEVICE), 0, empty, torch.zeros(1, 0, device=DEVICE)) == 0
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(keep, before))


def test_bad_arguments_name_them():
    keep, p = page(1, 4, 2, 64, E4M3), page(1, 8, 2, 64, E4M3)
    mass, page_mass = torch.zeros(1, 4, device=DEVICE), torch.rand(1, 8, device=DEVICE)
    with pytest.raises(TypeError, match=r"page.k: expected dtype torch.float8_e4m3fn, got torch.bfloat16"):
        kv_cache_compact(keep, mass, 0, [p[0].to(torch.bfloat16)] + p[1:], page_mass)
    with pytest.raises(ValueError, match=r"page.k: expected shape \[1, T, 2, 64\] like the keep buffer"):
        kv_cache_compact(keep, mass, 0, [p[0][:, :, :1]] + p[1:], page_mass)
    with pytest.raises(ValueError, match=r"keep.k_mean: expected shape \[1, 2, 64\]"):
        kv_cache_compact(keep[:3] + [keep[3][:, :1]] + keep[4:], mass, 0, p, page_mass)
    with pytest.raises(ValueError, match=r"page.v_scale: expected a contiguous tensor"):
        kv_cache_compact(keep, mass, 0, p[:4] + [p[4].transpose(1, 2).contiguous().transpose(1, 2)], page_mass)
    with pytest.raises(ValueError, match=r"keep: expected 5 tensors"):
        kv_cache_compact(keep[:4], mass, 0, p, page_mass)
    with pytest.raises(ValueError, match=r"keep_count: expected an int in \[0, 4\], got 5"):
        kv_cache_compact(keep, mass, 5, p, page_mass)
    with pytest.raises(ValueError, match=r"keep_count: expected an int in \[0, 4\], got 1.5"):
        kv_cache_compact(keep, mass, 1.5, p, page_mass)
    with pytest.raises(ValueError, match=r"page: expected 5 tensors \(k, v, k_scale, k_mean, v_scale\), got 5"):
        kv_cache_compact(keep, mass, 0, 5, page_mass)
    with pytest.raises(TypeError, match=r"keep_mass: expected dtype torch.float32, got torch.int64"):
        kv_cache_compact(keep, mass.long(), 0, p, page_mass)
    with pytest.raises(ValueError, match=r"page_mass: expected a tensor on"):
        kv_cache_compact(keep, mass, 0, p, page_mass.to("meta"))
    empty = page(1, 4, 2, 0, E4M3)
    with pytest.raises(ValueError, match=r"keep.k: expected \[B, K, H, D\] with B, H and D >= 1, got \(1, 4, 2, 0\)"):
        kv_cache_compact(empty, mass, 0, page(1, 8, 2, 0, E4M3), page_mass)
    with pytest.raises(ValueError, match="backend: expected one of"):
        kv_cache_compact(page(1, 0, 2, 64, E4M3), mass[:, :0], 0, p, page_mass, backend="gpu")


# The CUDA entry point checks its arguments before touching the GPU, so these run anywhere _C is built.
def compact_args(**changes):
    fake = 1 << 20  # an aligned address that is never dereferenced: every case raises first
    args = dict(keep=[fake] * 5, page=[fake] * 5, top=fake, storage_dtype=3, sizes=[1, 512, 1560, 12, 128],
                keep_count=512, count=512, stream=0)
    return {**args, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(keep=[0] + [1 << 20] * 4), "keep.k is a null pointer"),
    (dict(page=[1 << 20] * 4 + [0]), "page.v_scale is a null pointer"),
    (dict(top=0), "top is a null pointer"),
    (dict(page=[(1 << 20) + 8] + [1 << 20] * 4), "page.k: the CUDA kernel moves 16-byte vectors"),
    (dict(keep=[1 << 20] * 3 + [(1 << 20) + 2, 1 << 20]), "keep.k_mean: expected a 4-byte aligned address"),
    (dict(top=(1 << 20) + 4), "top: expected a 8-byte aligned address"),
    (dict(sizes=[1, 512, 1560, 12, 80]), "head_dim must be 64 or 128, got 80"),
    (dict(sizes=[1, 512, 1560, 12]), r"sizes are \(B, K, T, H, D\)"),
    (dict(keep=[1 << 20] * 4), "keep and page are 5 pointers each"),
    (dict(sizes=[0, 512, 1560, 12, 128]), "expected B, K, H >= 1 and T >= 0"),
    (dict(sizes=[65536, 512, 1560, 65536, 128]), "units are more than one launch can hold"),
    (dict(keep_count=513), r"keep_count must be in \[0, K = 512\], got 513"),
    (dict(count=513), r"count must be in \[1, min\(K, keep_count \+ T\)\]"),
    (dict(count=0), r"count must be in \[1, min\(K, keep_count \+ T\)\]"),
    (dict(keep_count=0, sizes=[1, 512, 100, 12, 128]), r"count must be in \[1, min\(K, keep_count \+ T\)\]"),
    (dict(storage_dtype=2), "storage dtype must be e4m3, bfloat16 or float32"),
])
def test_cuda_entry_point_rejects_bad_arguments_before_launching(changes, message):
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    with pytest.raises(ValueError, match=message):
        C.kv_cache_compact(**compact_args(**changes))


def test_cuda_entry_point_reaches_the_launch_with_good_arguments():
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    if torch.cuda.is_available():
        pytest.skip("checks how far a well-formed call gets where there is no GPU")
    # past every argument check, the launch first asks the GPU whether it has clusters
    with pytest.raises(C.CudaError, match=r"cudaGetDevice\(&device\) failed"):
        C.kv_cache_compact(**compact_args())


def test_cuda_backend_passes_storage_it_cannot_read_16_bytes_at_a_time_to_others():
    """The CUDA compaction moves 16-byte vectors: contiguous storage that starts off a 16-byte
    boundary is not for it (auto takes Triton), with the reason naming the tensor."""
    from xjfast.ops.kv_cache_compact import _cuda_supports
    B, K, T, H, D = 1, 8, 16, 2, 64
    keep, evicted = page(B, K, H, D, E4M3), page(B, T, H, D, E4M3)
    assert _cuda_supports(keep, 0, evicted, None) is None
    shifted = torch.empty(B * K * H * D + 8, dtype=E4M3, device=DEVICE)[8:].view(B, K, H, D)
    reason = _cuda_supports([keep[0], shifted] + keep[2:], 0, evicted, None)
    assert reason.startswith("keep.v: the CUDA kernel moves 16-byte vectors") and "triton" in reason
    assert "head_dim 64 or 128" in _cuda_supports(page(B, K, H, 32, E4M3), 0, page(B, T, H, 32, E4M3), None)
