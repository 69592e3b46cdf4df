"""kv_cache_commit: every backend writes the pages the reference writes."""
import re
import subprocess
import sys

import pytest
import torch

from xjfast.backends import resolve
from xjfast.errors import BackendUnavailable
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


def assert_units_match(ref, out, store):
    """ref/out: (K values, V values, k_scale, k_mean, v_scale) of units quantized from the same data,
    values [..., tokens, H, D], k_scale [..., H], k_mean and v_scale [..., H, D]."""
    ref, out = [t.float() for t in ref], [t.float() for t in out]
    # An element is e4m3 (or bf16) of the same fp32 value up to its last bits, so it may round to the
    # neighbouring grid point, one step away at most. K is stored minus a mean summed in another
    # order, so K's values may also differ by the difference of the means, and by the float32
    # rounding of K itself (K ~ mean; a kernel may fuse a dequantization's q * scale + mean), in
    # K-scale units.
    ulp, smallest_step = (2.0 ** -3, 2.0 ** -9) if store == E4M3 else (2.0 ** -7, 1e-6)
    mean_shift = (((out[3] - ref[3]).abs() + 2.0 ** -22 * ref[3].abs()) / ref[2][..., None]).unsqueeze(-3)
    for name, r, o, shift in zip(("k", "v", "k_scale", "k_mean", "v_scale"), ref, out, (mean_shift, 0, 0, 0, 0)):
        assert not o.isnan().any(), f"{name}: elements left unwritten"
        assert ((o - r).abs() <= shift + torch.clamp(ulp * (r.abs() + shift), min=smallest_step)).all(), name
        assert ((o - r).norm() / r.norm()) < 1e-2, name


def assert_pages_match(pages, ref, out, store):
    others = [p for p in range(ref[0].shape[0]) if p not in pages.tolist()]
    assert all(o[others].float().isnan().all() for o in out), "a page outside page_ids was written"
    assert_units_match([r[pages] for r in ref], [o[pages] for o in out], store)


@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("store", [E4M3, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_commit_matches_reference(backend, store, strided):
    assert_pages_match(*commit_both(backend, 2, 24, 2, 64, 2, torch.bfloat16, store, strided), store)


# The CUDA kernel spreads a frame over a cluster of CTAs (one per 128 tokens, at most 8), which
# combine their statistics through distributed shared memory: 2 CTAs, 6, and 8 whose fp32 rows do
# not fit in shared memory (the re-reading path).
@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("B, T, H, D, frames, dtype", [(2, 200, 2, 64, 2, torch.bfloat16),
                                                       (1, 650, 1, 128, 1, torch.float32),
                                                       (1, 1560, 1, 128, 1, torch.float32)],
                         ids=["2-ctas", "6-ctas", "8-ctas-rereading"])
def test_commit_spreads_a_frame_over_a_cluster(backend, B, T, H, D, frames, dtype):
    torch.manual_seed(T)
    assert_pages_match(*commit_both(backend, B, T, H, D, frames, dtype, E4M3), E4M3)


# The stream's shape (Wan2.1-1.3B: 12 heads, 1560 tokens per latent frame): the CUDA kernel spreads a
# frame over a cluster of 8 CTAs (195 tokens each, a partial last tile); fp32 input does not fit in
# shared memory and takes the re-reading path; 200 tokens: a cluster of 2 with 100 each.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("store", [E4M3, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_commit_stream_shape(backend, dtype, store, D):
    torch.manual_seed(D)
    assert_pages_match(*commit_both(backend, 1, 1560, 12, D, 3, dtype, store), store)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
@pytest.mark.parametrize("T, frames, strided", [(200, 2, False), (1560, 1, True), (40, 5, True)])
def test_commit_other_frames(backend, T, frames, strided):
    torch.manual_seed(T)
    assert_pages_match(*commit_both(backend, 2, T, 12, 128, frames, torch.bfloat16, E4M3, strided), E4M3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in fast_backends("kv_cache_commit") if b.values[0] == "cuda"])
def test_cuda_commit_passes_misaligned_input_to_triton(backend):
    """A k the CUDA kernel's 16-byte loads cannot read: backend='cuda' says why, auto commits it
    with another backend, as the reference does."""
    B, T, H, D = 1, 16, 2, 64
    ids = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    buffer = torch.randn(B, T, H, D + 1, device=DEVICE, dtype=torch.bfloat16)
    k = buffer[..., 1:]  # unit last stride, but the rows start 2 bytes past a 16-byte boundary
    with pytest.raises(BackendUnavailable, match=r"k: the CUDA kernel reads 16-byte vectors"):
        kv_cache_commit(k, k, *storage(2, B, T, H, D, E4M3), ids, backend=backend)
    auto, ref = storage(2, B, T, H, D, E4M3), storage(2, B, T, H, D, E4M3)
    assert resolve("kv_cache_commit", "auto", DEVICE, (k, k, *auto, ids)).backend == "triton"
    kv_cache_commit(k, k, *auto, ids)
    kv_cache_commit(k, k, *ref, ids, backend="reference")
    assert_pages_match(ids.long(), ref, auto, E4M3)


# A token stride of 2^27 elements: row 16 of a unit lies 2^31 elements past row 0, as in an unmasked
# attention pass (one unit of all its tokens) of 147600 tokens from a fused QKV projection of 40 x 128
# heads (15360 elements a token). Only the unit's rows of the 4 GB buffer are touched.
WIDE_ROWS = """
import sys, torch
from xjfast.ops.kv_cache_commit import kv_cache_commit
device, backend = sys.argv[1:]
T, D, stride = 17, 64, 2 ** 27
k = torch.empty((T - 1) * stride + D, dtype=torch.bfloat16, device=device)
k = k.as_strided((1, T, 1, D), (T * stride, stride, D, 1)).copy_(torch.randn(1, T, 1, D))
v = torch.randn(1, T, 1, D, device=device).bfloat16()
out = [[torch.zeros((1, 1, T, 1, D), device=device).to(torch.float8_e4m3fn) for _ in range(2)] +
       [torch.zeros(s, device=device) for s in ((1, 1, 1), (1, 1, 1, D), (1, 1, 1, D))] for _ in range(2)]
ids = torch.zeros(1, dtype=torch.int32, device=device)
kv_cache_commit(k.contiguous(), v, *out[0], ids, backend="reference")
kv_cache_commit(k, v, *out[1], ids, backend=backend)
assert all(torch.equal(a.float(), b.float()) for a, b in zip(*out)), "pages differ"
"""


@pytest.mark.parametrize("backend", [b for b in fast_backends("kv_cache_commit") if b.values[0] == "triton"])
def test_commit_reads_rows_2_31_elements_apart(backend):
    """Row offsets past int32 (they wrapped and read outside k: a crash, hence a child process)."""
    run = subprocess.run([sys.executable, "-c", WIDE_ROWS, str(DEVICE), backend], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("ids", [[0, 2], [0, -1], [1, 1]])
def test_reference_rejects_page_ids_outside_the_storage_or_repeated(ids):
    B, T, H, D = 1, 8, 2, 64
    k = torch.randn(B, 2 * T, H, D)
    with pytest.raises(ValueError, match=re.escape(f"page_ids: expected distinct page indices in [0, 2), got {ids}")):
        kv_cache_commit(k, k, *storage(2, B, T, H, D, E4M3), torch.tensor(ids, dtype=torch.int32), backend="reference")


@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
def test_kernels_write_nothing_for_a_page_id_outside_the_storage(backend):
    """The kernels read the ids on the device (no sync to check them): a frame whose id is out of
    range is skipped, the others are written."""
    B, T, H, D = 1, 16, 2, 64
    k, v = torch.randn(B, 3 * T, H, D, device=DEVICE).bfloat16(), torch.randn(B, 3 * T, H, D, device=DEVICE).bfloat16()
    ids = torch.tensor([1, 3, -1], dtype=torch.int32, device=DEVICE)
    ref, out = storage(3, B, T, H, D, E4M3), storage(3, B, T, H, D, E4M3)
    kv_cache_commit(k[:, :T], v[:, :T], *ref, ids[:1], backend="reference")
    kv_cache_commit(k, v, *out, ids, backend=backend)
    assert_pages_match(ids[:1].long(), ref, out, E4M3)


@pytest.mark.parametrize("backend", fast_backends("kv_cache_commit"))
def test_page_ids_as_a_strided_view_or_int64_write_the_pages_they_name(backend):
    """The kernels read int32 ids one after another: a strided view is read as the values it holds,
    and an int64 id beyond int32 is out of range (skipped), not truncated onto a page (2^32 + 1 -> 1)."""
    B, T, H, D = 1, 16, 2, 64
    k, v = torch.randn(B, 2 * T, H, D, device=DEVICE).bfloat16(), torch.randn(B, 2 * T, H, D, device=DEVICE).bfloat16()
    every_other = torch.tensor([2, 1, 0, 3], dtype=torch.int32, device=DEVICE)[::2]  # [2, 0], stride 2
    ref, out = storage(4, B, T, H, D, E4M3), storage(4, B, T, H, D, E4M3)
    kv_cache_commit(k, v, *ref, every_other.clone(), backend="reference")
    kv_cache_commit(k, v, *out, every_other, backend=backend)
    assert_pages_match(every_other.long(), ref, out, E4M3)
    wide = torch.tensor([3, 2 ** 32 + 1], dtype=torch.int64, device=DEVICE)
    ref, out = storage(4, B, T, H, D, E4M3), storage(4, B, T, H, D, E4M3)
    kv_cache_commit(k[:, :T], v[:, :T], *ref, wide[:1], backend="reference")
    kv_cache_commit(k, v, *out, wide, backend=backend)
    assert_pages_match(wide[:1], ref, out, E4M3)


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
    with pytest.raises(ValueError, match="k_pages: expected a tensor with no empty dimension"):
        kv_cache_commit(k[:, :0], k[:, :0], *storage(2, B, 0, H, D, E4M3), ids)


@pytest.mark.parametrize("op", ["kv_cache_commit", "kv_cache_compact"])
def test_triton_cache_kernels_pass_a_head_dim_that_is_no_power_of_two_to_others(op):
    """A row of head_dim channels is one Triton block: head_dim 96 goes to the reference (auto), or
    raises with the reason (backend='triton'), rather than fail to compile."""
    from xjfast.backends import implementations
    supports = implementations(op)["triton"].supports
    for D, reason in ((64, None), (96, "the Triton kernel takes a power-of-two head_dim, got 96")):
        st = storage(2, 1, 8, 2, D, E4M3)
        k = torch.randn(1, 8, 2, D)
        args = (k, k, *st, None) if op == "kv_cache_commit" else (st, 0, st, None)
        assert supports(*args) == reason


def test_triton_commit_refuses_more_batch_x_heads_than_a_grid_axis_holds():
    from xjfast.backends import implementations
    supports = implementations("kv_cache_commit")["triton"].supports
    k = torch.empty(1, 8, 1, 64).expand(4096, 8, 16, 64)  # no memory behind the batch
    assert supports(k) == "the Triton kernel puts batch x heads (4096 x 16) on a grid axis of at most 65535 programs, " \
                          "got 65536"
    assert supports(k[:4095]) is None


def test_cuda_commit_passes_to_others_what_its_entry_point_refuses():
    """Pages not 16-byte aligned, or more (frame, batch, head) units than one launch holds: the
    bindings raise ValueError (see below), so auto must go elsewhere, with the reason."""
    from xjfast.backends import implementations
    from xjfast.ops.fp8 import E4M3
    supports = implementations("kv_cache_commit")["cuda"].supports
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    st = storage(2, 1, 64, 2, 64, E4M3)
    raw = torch.empty(st[0].numel() + 8, dtype=torch.uint8)[8:].view(E4M3).view(st[0].shape)  # contiguous, 8 bytes off
    assert supports(k, k, *st, None) is None
    assert supports(k, k, raw, *st[1:], None).startswith("k_pages: the CUDA kernel stores 16-byte vectors")
    assert supports(k, k, st[0], raw, *st[2:], None).startswith("v_pages: the CUDA kernel stores 16-byte vectors")
    # n = 2^24 frames of 1024 tokens (8 CTAs each) x 4 x 4: k and v expanded, no memory behind them
    n, B, T, H = 1 << 24, 4, 1024, 4
    st = storage(1, B, T, H, 64, E4M3)
    k = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16).expand(B, n * T, H, 64)
    assert supports(k, k, *st, None) == ("the CUDA kernel launches 8 CTAs per (frame, batch, head) on one grid axis of "
                                         "at most 2^31 - 1, got 268435456 units")
    assert supports(k[:, :(n - 1) * T], k[:, :(n - 1) * T], *st, None) is None


@pytest.mark.parametrize("op", ["kv_cache_commit", "kv_cache_compact", "temporal_attention"])
def test_cuda_cache_kernels_pass_a_gpu_with_too_little_shared_memory_to_others(monkeypatch, op):
    """Both set aside 160 KiB of shared memory for staged rows: a GPU that gives a block less
    (sm_120: 99 KiB) would fail in cudaFuncSetAttribute, so auto goes elsewhere, with the reason
    (the CUDA attention too: it quantizes its pass with the commit kernel)."""
    import types

    from xjfast.backends import implementations
    from xjfast.ops import _cuda
    props = {"optin": 227 << 10}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=props["optin"]))
    assert _cuda.shared_memory_reason(torch.device("cuda:0")) is None
    assert _cuda.shared_memory_reason(torch.device("cpu")) is None
    props["optin"] = 99 << 10
    reason = ("the CUDA kernel sets aside 182 KiB of shared memory per block, this GPU allows 99 KiB "
              "(backend='triton' runs it)")
    assert _cuda.shared_memory_reason(torch.device("cuda:0")) == reason
    monkeypatch.setattr(_cuda, "shared_memory_reason", lambda device, r=reason: r)  # the hooks ask it of their GPU
    st = storage(2, 1, 64, 2, 64, torch.float8_e4m3fn)
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    if op == "temporal_attention":
        from xjfast.ops.temporal_attention import _validate
        args, reason = (k, k, k, _validate(k, k, k, None, None, None, None, None, "fp8", "auto"), None), \
            f"it quantizes the pass with the CUDA commit kernel: {reason}"
    else:
        args = (k, k, *st, None) if op == "kv_cache_commit" else (st, 0, st, None)
    assert implementations(op)["cuda"].supports(*args) == reason


# The CUDA entry point checks its arguments before touching the GPU, so these run anywhere _C is built.
def commit_args(**changes):
    fake = 1 << 20  # an aligned address that is never dereferenced: every case raises first
    args = dict(k=fake, v=fake, k_strides=[1560 * 12 * 128, 12 * 128, 128], v_strides=[1560 * 12 * 128, 12 * 128, 128],
                page_ids=fake, k_pages=fake, v_pages=fake, k_scale=fake, k_mean=fake, v_scale=fake, input_dtype=1,
                storage_dtype=3, sizes=[1, 1, 1560, 12, 128, 4], stream=0)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, message", [
    (dict(k=0), ValueError, "k is a null pointer"),
    (dict(v_scale=0), ValueError, "v_scale is a null pointer"),
    (dict(page_ids=0), ValueError, "page_ids is a null pointer"),
    (dict(sizes=[1, 1, 1560, 12, 96, 4]), ValueError, "head_dim must be 64 or 128, got 96"),
    (dict(sizes=[1, 1, 0, 12, 128, 4]), ValueError, r"sizes \(n, B, T, H, P\) must be positive"),
    (dict(sizes=[1, 1, 1560, 12, 128]), ValueError, r"sizes are \(n, B, T, H, D, P\)"),
    (dict(input_dtype=3), ValueError, "input dtype must be float32, bfloat16 or float16"),
    (dict(storage_dtype=2), ValueError, "storage dtype must be e4m3, bfloat16 or float32"),
    (dict(k=(1 << 20) + 2), ValueError, "k: the CUDA kernel reads 16-byte vectors"),
    (dict(v_strides=[1560 * 12 * 128, 12 * 128, 129]), ValueError, "v: the CUDA kernel reads 16-byte vectors"),
    (dict(k_pages=(1 << 20) + 8), ValueError, "k_pages: the storage must be 16-byte aligned"),
    (dict(k_mean=(1 << 20) + 2), ValueError, "k_mean: expected a 4-byte aligned address"),
    (dict(sizes=[4, 65536, 1560, 65536, 128, 4]), ValueError, "more than one launch can hold"),
    (dict(k_strides=[0, 0, 0, 0]), ValueError, "k: too many strides"),
    (dict(v_strides=[1560 * 12 * 128, -12 * 128, 128]), ValueError, "v: strides must be non-negative, got -1536"),
])
def test_cuda_entry_point_rejects_bad_arguments_before_launching(changes, error, message):
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    with pytest.raises(error, match=message):
        C.kv_cache_commit(**commit_args(**changes))


def test_cuda_entry_point_ignores_the_stride_of_a_dimension_of_one():
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    if torch.cuda.is_available():
        pytest.skip("checks how far a well-formed call gets where there is no GPU")
    # B == 1: its stride may be anything; the call gets past the argument checks to the device query
    with pytest.raises(C.CudaError, match="cudaGetDevice"):
        C.kv_cache_commit(**commit_args(k_strides=[3, 12 * 128, 128]))
