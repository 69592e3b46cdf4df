"""temporal_attention against a float64 oracle, within DESIGN.md's bounds, on every backend here."""
import re
import subprocess
import sys

import pytest
import torch

import xjfast
from xjfast import BackendUnavailable, StreamingKVCache, temporal_attention
from xjfast.ops.temporal_attention import block_mask, mass_values, output_buffers

from attention_oracle import cosine, exact_attention, explicit_block_mask, rel_l2, rotate_complex

FP8_REL_L2, FP8_COS = 7e-2, 0.997


def qkv(B=1, L=256, H=2, D=64, dtype=torch.float32, k_bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    if k_bias:  # a per-channel offset on K, as real models have: what K smoothing is for
        k = k + 3 * torch.randn(1, 1, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_within_design_bounds_of_exact(D, dtype):
    q, k, v = qkv(L=384, D=D, dtype=dtype)
    out, lse = temporal_attention(q, k, v, block_tokens=128, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, explicit_block_mask(384, 128))
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_l2(out, ref) <= FP8_REL_L2 and cosine(out, ref) >= FP8_COS
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 384)
    assert (lse.double() - ref_lse).abs().max() < 0.1  # FP8 scores: worst of 160 seeds was 0.048


def test_bf16_precision_as_flashattention_holds_itself():
    q, k, v = qkv(L=256, dtype=torch.bfloat16)
    mask = explicit_block_mask(256, 64)
    ref, _ = exact_attention(q, k, v, mask)
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    out = temporal_attention(q, k, v, block_tokens=64, precision="bf16")
    bound = 2 * (torch_bf16.double() - ref).abs().max() + 1e-5
    assert (out.double() - ref).abs().max() <= bound


def test_planted_sink_keeps_small_weights(monkeypatch):
    """A sink frame whose first key dominates every row (score ~7 above the rest): scaled P keeps
    the small non-sink weights; plain e4m3 P (scale 1) flushes them below 2^-9 and loses them."""
    T = 64
    sink_dir = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)
    frames = [qkv(L=T, k_bias=False)[1:] for _ in range(3)]
    frames[0][0][:, 0] = 28.0 * sink_dir
    frames[0][1][:, 0] = 0.0  # the sink carries no value: the output is made of the small weights
    cache = StreamingKVCache(1, 1, 2, 64, T, sink_frames=1, window_frames=2, rope_dims=0)
    for fk, fv in frames:
        cache.commit(0, fk, fv)
    q, k, v = qkv(L=T, k_bias=False)
    q = q - (q * sink_dir).sum(-1, keepdim=True) * sink_dir + 2.0 * sink_dir
    ref, _ = exact_attention(q, torch.cat([f[0] for f in frames] + [k], 1), torch.cat([f[1] for f in frames] + [v], 1))
    out = temporal_attention(q, k, v, kv_cache=cache, layer=0)
    # The row normalizer is dominated by the sink's score, whose FP8 rounding error moves the
    # output's magnitude (inherent to FP8 QK); its direction must stay.
    # (over 60 draws: cosine >= 0.992, rel L2 <= 0.141; plain P's error >= 1.76x, cosine lower by >= 0.017)
    assert cosine(out, ref) >= 0.985 and rel_l2(out, ref) <= 0.2
    monkeypatch.setattr("xjfast.ops.temporal_attention.P_SCALE", 1.0)
    plain = temporal_attention(q, k, v, kv_cache=cache, layer=0)
    assert rel_l2(plain, ref) > 1.4 * rel_l2(out, ref) and cosine(plain, ref) < cosine(out, ref) - 0.008


@pytest.mark.parametrize("private", [None, (False, True, False, True), (True, False, False, False)])
def test_block_causal_and_private_masks_equal_explicit_mask(private):
    q, k, v = qkv(L=256)
    out = temporal_attention(q, k, v, block_tokens=64, private_blocks=private, precision="bf16")
    mask = explicit_block_mask(256, 64, private)
    assert torch.equal(block_mask(256, 64, private), mask)
    ref, _ = exact_attention(q, k, v, mask)
    assert (out.double() - ref).abs().max() < 1e-5


def test_no_mask_is_full_attention():
    q, k, v = qkv(L=128)
    ref, _ = exact_attention(q, k, v)
    assert (temporal_attention(q, k, v, precision="bf16").double() - ref).abs().max() < 1e-5


def test_custom_scale():
    q, k, v = qkv(L=128)
    ref, _ = exact_attention(q, k, v, scale=0.05)
    assert (temporal_attention(q, k, v, scale=0.05, precision="bf16").double() - ref).abs().max() < 1e-5


# ---- through the cache ------------------------------------------------------------------------

T, H, D = 32, 2, 64


def stream(cache, frames_k, frames_v):
    for fk, fv in zip(frames_k, frames_v):
        cache.commit(0, fk, fv)


def test_attention_through_cache_equals_kept_frames_with_slot_positions():
    """Cache of sink 1 + window 2 after 5 frames holds frames 0, 3, 4 at slots 0, 1, 2; a 2-frame
    pass takes slots 3, 4. Attention through the cache equals exact attention over those frames
    with the temporal rotary applied at those positions."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, storage="fp32")
    ks, vs = zip(*[qkv(L=T, H=H, D=D)[1:] for _ in range(5)])
    stream(cache, ks, vs)
    assert cache.cached_frames(0) == [0, 3, 4]
    q, k, v = qkv(L=2 * T, H=H, D=D)
    out = temporal_attention(q, k, v, block_tokens=T, kv_cache=cache, layer=0, precision="bf16")

    dims = cache.rope_dims
    keys = torch.cat([ks[0], ks[3], ks[4], k], dim=1)
    values = torch.cat([vs[0], vs[3], vs[4], v], dim=1)
    k_pos = torch.arange(5).repeat_interleave(T)
    q_pos = torch.tensor([3, 4]).repeat_interleave(T)
    mask = torch.ones(2 * T, 5 * T, dtype=torch.bool)
    mask[:, 3 * T:] = explicit_block_mask(2 * T, T)
    ref, _ = exact_attention(rotate_complex(q, q_pos, dims), rotate_complex(keys, k_pos, dims), values, mask)
    assert (out.double() - ref).abs().max() < 2e-5


def test_frame_slots_give_draft_and_noisy_blocks_one_slot():
    """A speculative pass [clean | noisy | clean draft | noisy] at slots (0, 1, 1, 2) after the
    cache, noisy blocks private: exact attention with those positions and that mask."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=4, storage="fp32")
    ks, vs = zip(*[qkv(L=T, H=H, D=D)[1:] for _ in range(2)])
    stream(cache, ks, vs)
    q, k, v = qkv(L=4 * T, H=H, D=D)
    private, slots = (False, True, False, True), (0, 1, 1, 2)
    out = temporal_attention(q, k, v, block_tokens=T, private_blocks=private, kv_cache=cache, layer=0,
                             precision="bf16", frame_slots=slots)
    dims = cache.rope_dims
    pass_pos = (2 + torch.tensor(slots)).repeat_interleave(T)
    keys = torch.cat([rotate_complex(ks[0], torch.zeros(T), dims), rotate_complex(ks[1], torch.ones(T), dims),
                      rotate_complex(k, pass_pos, dims)], 1)
    mask = torch.ones(4 * T, 6 * T, dtype=torch.bool)
    mask[:, 2 * T:] = explicit_block_mask(4 * T, T, private)
    ref, _ = exact_attention(rotate_complex(q, pass_pos, dims), keys, torch.cat(vs + (v,), 1), mask)
    assert (out.double() - ref).abs().max() < 2e-5
    assert torch.equal(out, temporal_attention(q, k, v, block_tokens=T, private_blocks=torch.tensor(private),
                                               kv_cache=cache, layer=0, precision="bf16",
                                               frame_slots=torch.tensor(slots)))
    import numpy as np
    for same in (list(np.array(slots)), list(torch.tensor(slots)), np.array(slots)):  # numpy / 0-d tensor ints
        assert torch.equal(out, temporal_attention(q, k, v, block_tokens=T, private_blocks=list(np.array(private)),
                                                   kv_cache=cache, layer=0, precision="bf16", frame_slots=same))
    for bad in ((0, 1), (0, 1, 1.9, 2), (0, 1, 1, True), (0, 1, 1, 1 << 16), ("a", "b", "c", "d")):
        with pytest.raises(ValueError, match=r"frame_slots: expected 4 ints in \[0, 65536\)"):
            temporal_attention(q, k, v, kv_cache=cache, layer=0, frame_slots=bad)
    with pytest.raises(ValueError, match="frame_slots: needs kv_cache"):
        temporal_attention(q, k, v, frame_slots=(0, 1, 1, 2))


def test_frame_lags_show_each_frame_the_cache_a_later_pass_would_see():
    """Sink 1 + window 3, full (frames 0, 2, 3, 4 at slots 0-3); a 2-frame pass at slots 4, 5 whose
    second frame lags by 1: it does not see the oldest window frame (2), and sees the sink at the
    distance a stream that had committed one more frame would give it."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=3, storage="fp32")
    ks, vs = zip(*[qkv(L=T, H=H, D=D)[1:] for _ in range(5)])
    stream(cache, ks, vs)
    q, k, v = qkv(L=2 * T, H=H, D=D)
    out = temporal_attention(q, k, v, block_tokens=T, kv_cache=cache, layer=0, precision="bf16", frame_lags=(0, 1))
    dims = cache.rope_dims
    for f, (cached, positions) in enumerate((((0, 2, 3, 4), (0, 1, 2, 3)), ((0, 3, 4), (1, 2, 3)))):
        keys = torch.cat([ks[i] for i in cached] + [k[:, :(f + 1) * T]], 1)
        values = torch.cat([vs[i] for i in cached] + [v[:, :(f + 1) * T]], 1)
        k_pos = torch.tensor(list(positions) + [4] + [5] * f).repeat_interleave(T)
        rows = slice(f * T, (f + 1) * T)
        ref, _ = exact_attention(rotate_complex(q[:, rows], torch.full((T,), 4 + f), dims),
                                 rotate_complex(keys, k_pos, dims), values)
        assert (out[:, rows].double() - ref).abs().max() < 2e-5
    lagged = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=3, storage="fp32")
    stream(lagged, ks[:2], vs[:2])  # window not full: a lag may hide no more than it holds
    with pytest.raises(ValueError, match=r"frame_lags: expected 2 ints in \[0, 1\]"):
        temporal_attention(q, k, v, kv_cache=lagged, layer=0, frame_lags=(0, 2))
    with pytest.raises(ValueError, match="frame_lags: needs kv_cache"):
        temporal_attention(q, k, v, frame_lags=(0, 1))


def test_fp8_cache_within_design_bounds():
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=3)
    ks, vs = zip(*[qkv(L=T, H=H, D=D)[1:] for _ in range(4)])
    stream(cache, ks, vs)
    q, k, v = qkv(L=T, H=H, D=D)
    out = temporal_attention(q, k, v, kv_cache=cache, layer=0)
    dims = cache.rope_dims
    pos = torch.arange(5).repeat_interleave(T)
    keys, values = torch.cat(ks + (k,), 1), torch.cat(vs + (v,), 1)
    ref, _ = exact_attention(rotate_complex(q, pos[-T:], dims), rotate_complex(keys, pos, dims), values)
    assert rel_l2(out, ref) <= FP8_REL_L2 and cosine(out, ref) >= FP8_COS


def test_bf16_tensors_on_bf16_cache():
    """bf16 q/k/v over a bf16-stored cache: a bf16 answer, exact attention over the cached frames
    and the pass (temporal rotary at their slots) up to bf16 rounding (worst of 30 draws: 2.3e-3)."""
    cache = StreamingKVCache(1, 1, H, D, T, storage="bf16")
    ks, vs = zip(*[qkv(L=T, H=H, D=D, dtype=torch.bfloat16)[1:] for _ in range(3)])
    stream(cache, ks, vs)
    q, k, v = qkv(L=T, H=H, D=D, dtype=torch.bfloat16)
    out = temporal_attention(q, k, v, kv_cache=cache, layer=0, precision="bf16")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    dims = cache.rope_dims
    pos = torch.arange(4).repeat_interleave(T)
    keys, values = torch.cat(ks + (k,), 1), torch.cat(vs + (v,), 1)
    ref, _ = exact_attention(rotate_complex(q, pos[-T:], dims), rotate_complex(keys, pos, dims), values)
    assert rel_l2(out, ref) <= 1e-2


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, words", [
    (lambda q, k, v: (q.to(torch.int32), k, v), TypeError, "q: expected dtype"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "k: expected dtype"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-d"),
    (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), ValueError, "head_dim"),
    (lambda q, k, v: (q, k[:, :64], v), ValueError, "k: expected shape"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v: expected a tensor on cpu"),
    (lambda q, k, v: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v), ValueError, "k: the last dimension"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError,
     r"q: expected a tensor with no empty dimension, got shape \(1, 0, 2, 64\)"),
])
def test_bad_tensors_name_the_argument(change, error, words):
    q, k, v = change(*qkv(L=128))
    with pytest.raises(error, match=words):
        temporal_attention(q, k, v)


@pytest.mark.parametrize("kwargs, words", [
    (dict(block_tokens=48), "block_tokens: expected a positive int dividing Lq=128"),
    (dict(block_tokens=0), "block_tokens"),
    (dict(private_blocks=[True]), "private_blocks: needs block_tokens"),
    (dict(block_tokens=64, private_blocks=[True]), "private_blocks: expected 2 entries"),
    (dict(scale=-1.0), "scale: expected a positive finite float"),
    (dict(scale=True), "scale: expected a positive finite float, got True"),
    (dict(block_tokens=64, private_blocks="ab"), "private_blocks: expected a sequence of bools"),
    (dict(block_tokens=64, private_blocks=[0.5, 1]), "private_blocks: expected a sequence of bools"),
    # a mapping iterates over its keys (here block 0 would be read as not private), a set in no order
    (dict(block_tokens=64, private_blocks={0: True, 1: False}), "private_blocks: expected a sequence of bools"),
    (dict(block_tokens=64, private_blocks={True, False}), "private_blocks: expected a sequence of bools"),
    (dict(precision="fp4"), "precision: expected one of"),
    (dict(backend="tpu"), "backend: expected one of"),
    (dict(layer=0), "layer: given without kv_cache"),
])
def test_bad_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        temporal_attention(*qkv(L=128), **kwargs)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_return_lse_takes_a_bool_only(flag):
    """return_lse="no" is truthy: it would return a tuple where the caller expects a tensor."""
    with pytest.raises(TypeError, match=f"return_lse: expected True or False, got {flag!r}"):
        temporal_attention(*qkv(L=64), return_lse=flag)


@pytest.mark.parametrize("name, make, words", [
    ("out", lambda q: torch.empty(1, 64, 2, 32, dtype=q.dtype), r"out: expected .*shape \[1, 64, 2, 64\]"),
    ("out", lambda q: torch.empty(q.shape, dtype=torch.float32), "out: expected a torch.bfloat16 tensor"),
    ("out", lambda q: torch.empty(1, 64, 64, 2, dtype=q.dtype).transpose(2, 3), "unit last stride"),
    ("lse", lambda q: torch.empty(1, 2, 64, dtype=torch.float16), "lse: expected a contiguous torch.float32"),
    ("lse", lambda q: torch.empty(1, 64, 2).transpose(1, 2), "lse: expected a contiguous"),
])
def test_fast_launchers_check_the_buffers_they_write(name, make, words):
    """The Triton and CUDA launchers write a caller's out/lse through raw pointers: a buffer of the
    wrong shape, dtype or layout is refused before any kernel writes past it."""
    q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=words):
        output_buffers(q, **{name: make(q)})
    out, lse = output_buffers(q, None, None)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (1, 2, 64), torch.float32)


def test_a_numpy_scale_is_a_scale():
    import numpy as np
    q, k, v = qkv(L=64)
    assert torch.equal(temporal_attention(q, k, v, scale=np.float32(0.125)), temporal_attention(q, k, v, scale=0.125))


def test_cache_of_wrong_geometry():
    q, k, v = qkv(L=2 * T, H=H, D=D)
    with pytest.raises(ValueError, match="kv_cache: expected a cache of"):
        temporal_attention(q, k, v, kv_cache=StreamingKVCache(1, 1, 4, D, T), layer=0)
    with pytest.raises(ValueError, match="whole frames"):
        temporal_attention(q[:, :48], k[:, :48], v[:, :48], kv_cache=StreamingKVCache(1, 1, H, D, T), layer=0)
    with pytest.raises(ValueError, match="layer: expected an int in"):
        temporal_attention(q, k, v, kv_cache=StreamingKVCache(1, 1, H, D, T), layer=3)
    with pytest.raises(ValueError, match="layer: expected the layer index"):
        temporal_attention(q, k, v, kv_cache=StreamingKVCache(1, 1, H, D, T))
    with pytest.raises(TypeError, match="kv_cache: expected a StreamingKVCache"):
        temporal_attention(q, k, v, kv_cache={}, layer=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is present")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would run Triton on the CPU
    with pytest.raises(BackendUnavailable, match=f"backend '{backend}' is unavailable: .+|no {backend} implementation"):
        temporal_attention(*qkv(L=128), backend=backend)


def test_public_names():
    assert xjfast.temporal_attention is temporal_attention and xjfast.StreamingKVCache is StreamingKVCache


# ---- fast backends against the reference that simulates the same quantization ---------------

from backends import DEVICE, fast_backends, poisoned  # noqa: E402
from xjfast.backends import implementations, resolve  # noqa: E402
from xjfast.ops.temporal_attention import _validate  # noqa: E402

SIM_REL_L2 = 1e-2  # DESIGN.md: against the reference that simulates the same quantization


def filled_cache(frames, H, D, T, device=DEVICE, batch=1, **kwargs):
    torch.manual_seed(11)  # two caches filled alike: one per backend
    cache = StreamingKVCache(1, batch, H, D, T, device=device, **kwargs)
    for _ in range(frames):
        k, v = torch.randn(batch, T, H, D, device=device) + 2, torch.randn(batch, T, H, D, device=device)
        cache.commit(0, k.bfloat16(), v.bfloat16())
    return cache


def kv_tile(backend, q, plan, view):
    """The online-softmax step of `backend`'s kernel: the reference simulates P's rounding with it."""
    if backend == "cuda":
        from xjfast.ops.temporal_attention import CUDA_KV_TILE
        return CUDA_KV_TILE
    from xjfast.backends import triton_interpreted
    from xjfast.kernels.temporal_attention import launch_config
    return launch_config(q, plan, view, triton_interpreted())[1]


def kv_splits(backend, q, plan, view):
    """How many ways `backend`'s kernel splits the key units here (each split its own softmax)."""
    if backend == "cuda":
        return 1
    from xjfast.backends import triton_interpreted
    from xjfast.kernels.temporal_attention import split_plan
    return split_plan(q, plan, view, triton_interpreted())[0]


def plan_of(q, k, v, kv_cache=None, backend="auto", **kwargs):
    plan = _validate(q, k, v, kwargs.get("block_tokens"), kwargs.get("private_blocks"), None, kv_cache,
                     0 if kv_cache is not None else None, kwargs.get("precision", "fp8"), backend,
                     kwargs.get("frame_slots"), kwargs.get("frame_lags"))
    return plan, kv_cache.view(0) if kv_cache is not None else None


def run_backend(backend, q, k, v, kv_cache=None, simulate="triton", core=None, **kwargs):
    """The backend's launch with poisoned outputs, through the op's own validation; the reference
    simulates the P rounding (steps and splits) of backend `simulate`; `core`: the CUDA kernel's
    tensor-core path."""
    plan, view = plan_of(q, k, v, kv_cache, backend, **kwargs)
    if backend == "reference":
        return resolve("temporal_attention", backend, q.device).fn(
            q, k, v, plan, view, kv_tile=kv_tile(simulate, q, plan, view), kv_splits=kv_splits(simulate, q, plan, view))
    B, L, H, D = q.shape
    out, lse = poisoned(q.shape, q.dtype), poisoned((B, H, L), torch.float32)
    if backend == "triton":
        from xjfast.backends import triton_interpreted
        from xjfast.kernels.temporal_attention import temporal_attention as launch
        return launch(q, k, v, plan, view, interpret=triton_interpreted(), out=out, lse=lse)
    from xjfast.ops.temporal_attention import temporal_attention_cuda
    return temporal_attention_cuda(q, k, v, plan, view, out=out, lse=lse, core=core)


def uncovered(backend, q, k, v, kv_cache=None, **kwargs):
    """Why `backend` does not take these arguments (its `supports` hook), or None."""
    impl = implementations("temporal_attention")[backend]
    return impl.supports(q, k, v, *plan_of(q, k, v, kv_cache, backend, **kwargs)) if impl.supports else None


CASES = {
    "full": dict(L=128, D=64, kwargs={}),
    "block-causal-private": dict(L=128, D=64, kwargs=dict(block_tokens=32, private_blocks=(False, True, False, True))),
    "bf16-precision": dict(L=128, D=64, kwargs=dict(block_tokens=64, precision="bf16")),
    "head-dim-128-fp16": dict(L=96, D=128, dtype=torch.float16, kwargs=dict(block_tokens=32)),
    "cache": dict(L=64, D=64, cache=dict(frames=4, sink_frames=1, window_frames=2), kwargs=dict(block_tokens=32)),
    "cache-bf16-precision": dict(L=64, D=64, cache=dict(frames=3), kwargs=dict(block_tokens=64, precision="bf16")),
    "cache-keep-tokens": dict(L=64, D=64, cache=dict(frames=5, sink_frames=1, window_frames=2, keep_tokens=8),
                              kwargs=dict(block_tokens=32)),
    "cache-rotary-past-half": dict(L=64, D=64, cache=dict(frames=3, rope_dims=48), kwargs=dict(block_tokens=32)),
    "speculative-pass": dict(L=128, D=64, cache=dict(frames=3), kwargs=dict(
        block_tokens=32, private_blocks=(False, True, False, True), frame_slots=(0, 1, 1, 2))),
    # a full cache with a keep buffer: the later frames hide the oldest window page (and its mass)
    "speculative-pass-lagged": dict(L=128, D=64, cache=dict(frames=5, sink_frames=1, window_frames=2, keep_tokens=8),
                                    kwargs=dict(block_tokens=32, private_blocks=(False, True, False, True),
                                                frame_slots=(0, 1, 1, 2), frame_lags=(0, 0, 1, 1))),
    # two streams in a batch, fp32 queries, D=128, no sinks (the keep buffer first), no rotary, and
    # 96 query rows: a partial query tile (half of the CUDA ws kernel's second warpgroup idle)
    "cache-batch-fp32-ragged": dict(B=2, L=96, D=128, dtype=torch.float32,
                                    cache=dict(frames=4, sink_frames=0, window_frames=3, keep_tokens=8, rope_dims=0),
                                    kwargs=dict(block_tokens=32)),
}


def case_inputs(spec):
    """q, k, v of a CASES entry and two caches filled alike (None without one): one per run."""
    H, T, B = 2, 32, spec.get("B", 1)
    q, k, v = (t.to(DEVICE) for t in qkv(B=B, L=spec["L"], H=H, D=spec["D"], dtype=spec.get("dtype", torch.bfloat16)))
    caches = [filled_cache(H=H, D=spec["D"], T=T, batch=B, **spec["cache"]) if "cache" in spec else None
              for _ in range(2)]
    return q, k, v, caches


@pytest.mark.parametrize("case", [name for name, spec in CASES.items() if spec["L"] > 64])  # over one Q tile
def test_reference_attends_in_row_chunks_as_in_one(case, monkeypatch):
    """The reference bounds its memory by attending whole Q tiles of rows at a time (the stream
    shape's scores alone are 5.4 GB): chunks of one Q tile give what one chunk does, masks, frame
    lags, rotary and the attention mass included."""
    from xjfast.ops import temporal_attention as ta
    spec = CASES[case]
    q, k, v, caches = case_inputs(spec)
    whole, whole_lse = run_backend("reference", q, k, v, caches[0], **spec["kwargs"])
    monkeypatch.setattr(ta, "REFERENCE_SCORE_BYTES", 1)  # one Q tile per chunk
    chunked, chunked_lse = run_backend("reference", q, k, v, caches[1], **spec["kwargs"])
    assert q.shape[1] > ta.Q_TILE == 64  # more than one chunk
    assert rel_l2(chunked, whole.double()) <= 1e-3 and (chunked_lse - whole_lse).abs().max() <= 1e-5
    if caches[0] is not None and caches[0].mass is not None:
        assert torch.allclose(mass_values(caches[0].mass), mass_values(caches[1].mass), rtol=1e-5, atol=1e-7)


def check_against_simulating_reference(backend, q, k, v, caches, kwargs):
    """`backend` (poisoned outputs) against the reference simulating its P rounding, on caches[0]
    and caches[1] respectively: output, LSE and the attention mass."""
    out, lse = run_backend(backend, q, k, v, caches[0], **kwargs)
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate=backend, **kwargs)
    assert not out.isnan().any() and not lse.isnan().any(), "outputs left unwritten"
    assert rel_l2(out, ref.double()) <= SIM_REL_L2
    assert (lse - ref_lse).abs().max() < 5e-3  # an fp8 rounding of q may flip where fp32 sums differ
    if caches[0] is not None and caches[0].mass is not None:  # the attention-mass companion kernel
        assert torch.allclose(mass_values(caches[0].mass), mass_values(caches[1].mass), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
@pytest.mark.parametrize("case", list(CASES))
def test_fast_backend_matches_simulating_reference(backend, case):
    spec = CASES[case]
    q, k, v, caches = case_inputs(spec)
    reason = uncovered(backend, q, k, v, caches[0], **spec["kwargs"])
    if reason is not None:  # a partial backend: an explicit request says why, auto passes over it
        with pytest.raises(BackendUnavailable, match=re.escape(reason)):
            temporal_attention(q, k, v, kv_cache=caches[0], layer=0 if caches[0] else None, backend=backend,
                               **spec["kwargs"])
        assert resolve("temporal_attention", "auto", q.device, (q, k, v, *plan_of(q, k, v, caches[0], **spec["kwargs"]))
                       ).backend != backend
        return
    check_against_simulating_reference(backend, q, k, v, caches, spec["kwargs"])
    if caches[0] is not None and caches[0].mass is not None:
        assert caches[0].mass.sum() > 0


@pytest.mark.parametrize("backend", ["reference", *fast_backends("temporal_attention")])
def test_attention_mass_does_not_depend_on_the_order_of_the_heads(backend):
    """keep_tokens keeps the tokens with the most attention mass summed over the heads, which a
    GPU's atomics add in any order: the mass is summed in fixed point, so that two runs keep the
    same tokens. Reordering the heads (of q, k, v and the cached frames alike) reorders the
    additions, and must give the same bits."""
    H, D, T = 4, 64, 32
    q, k, v = qkv(L=64, H=H, D=D, dtype=torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(6)
    frames = [(torch.randn(1, T, H, D, generator=g) + 2, torch.randn(1, T, H, D, generator=g)) for _ in range(3)]
    masses = []
    for order in (list(range(H)), [2, 0, 3, 1]):
        cache = StreamingKVCache(1, 1, H, D, T, device=DEVICE, sink_frames=1, window_frames=2, keep_tokens=8)
        for fk, fv in frames:  # full: the next commit evicts the oldest window page, which is weighed
            cache.commit(0, fk[:, :, order].to(DEVICE).bfloat16(), fv[:, :, order].to(DEVICE).bfloat16())
        run_backend(backend, *(t[:, :, order].to(DEVICE) for t in (q, k, v)), cache, block_tokens=32)
        masses.append(cache.mass.clone())
    assert masses[0].dtype == torch.int64 and (masses[0] > 0).any()
    assert torch.equal(masses[0], masses[1])


@pytest.mark.parametrize("backend", [p for p in fast_backends("temporal_attention") if p.id == "triton"])
@pytest.mark.parametrize("case, splits", [("cache-keep-tokens", 2), ("cache-keep-tokens", 3),
                                           ("speculative-pass", 4), ("head-dim-128-fp16", 3),
                                           ("block-causal-private", 2)])
def test_triton_split_key_units_merge_to_the_reference(monkeypatch, backend, case, splits):
    """The key units split between programs (as a GPU does where the query tiles alone leave it
    idle for part of a wave), each split's softmax merged by the combine kernel: the reference
    simulating those splits, the attention mass and the LSE agree, and no split is left empty."""
    from xjfast.kernels.temporal_attention import split_plan
    monkeypatch.setenv("XJFAST_TRITON_ATTENTION_SPLITS", str(splits))
    spec = CASES[case]
    q, k, v, caches = case_inputs(spec)
    plan, view = plan_of(q, k, v, caches[0], backend, **spec["kwargs"])
    ran, per_split = split_plan(q, plan, view, True)
    units = (len(view.units) if view is not None else 0) + spec["L"] // (plan.frame_tokens or plan.block_tokens)
    assert ran == splits and (ran - 1) * per_split < units <= ran * per_split, (ran, per_split, units)
    check_against_simulating_reference(backend, q, k, v, caches, spec["kwargs"])


@pytest.mark.parametrize("backend", [p for p in fast_backends("temporal_attention") if p.id == "triton"])
@pytest.mark.parametrize("case", ["cache-keep-tokens", "head-dim-128-fp16", "bf16-precision"])
@pytest.mark.parametrize("hopper, block_n", [(True, 32), (False, 64), (False, 32)])
def test_triton_paths_and_tiles_of_each_target(monkeypatch, backend, case, hopper, block_n):
    """The interpreter runs the kernel's Hopper paths (hopper_paths(None)) with 64-key tiles; the
    paths sm_100 compiles (V loaded as plain rows, its scales held across the key loop) and the
    32-key tiles of 16-bit launches and of some candidates run here too (on a GPU, a 16-bit launch
    at 4 warps takes 32-key tiles whatever the configuration: precision_config)."""
    from xjfast.backends import triton_interpreted
    import xjfast.kernels.temporal_attention as kernel
    monkeypatch.setattr(kernel, "hopper_paths", lambda capability: hopper)
    monkeypatch.setenv(kernel.CONFIG_ENV, f"64,{block_n},4,1")
    spec = CASES[case]
    q, k, v, caches = case_inputs(spec)
    plan, view = plan_of(q, k, v, caches[0], backend, **spec["kwargs"])
    all_fp8 = plan.precision == "fp8" and (view is None or view.storage == "fp8")
    expected = block_n if triton_interpreted() else kernel.precision_config((64, block_n, 4, 1), all_fp8)[1]
    assert kv_tile(backend, q, plan, view) == expected
    check_against_simulating_reference(backend, q, k, v, caches, spec["kwargs"])


@pytest.mark.parametrize("backend, kernel", [("triton", "Triton"), ("cuda", "CUDA")])
def test_fast_backends_refuse_more_batch_x_heads_than_a_grid_axis_holds(backend, kernel):
    """Both kernels put batch x heads on the grid's second axis, which a GPU limits to 65535 (the
    interpreter does not): beyond it the backend says why, so auto and sdpa go elsewhere, instead
    of a launch that fails on the GPU (or the bindings' ValueError)."""
    from xjfast.backends import implementations
    supports = implementations("temporal_attention")[backend].supports
    q = torch.empty(1, 64, 1, 64, dtype=torch.bfloat16).expand(4096, 64, 16, 64)  # no memory behind the batch
    assert supports(q, q, q, *plan_of(q, q, q)) == \
        f"the {kernel} kernel puts batch x heads (4096 x 16) on a grid axis of at most 65535 programs, got 65536"
    assert supports(q[:4095], q[:4095], q[:4095], *plan_of(q[:4095], q[:4095], q[:4095])) is None


def test_key_unit_splits_fill_the_waves():
    """kv_splits at the stream shape on an H100 (132 SMs, two 4-warp programs each): 25 query
    tiles x 12 heads (one query frame) would run 1.14 waves of work in two; splitting fills them."""
    from xjfast.kernels.temporal_attention import MAX_SPLITS, kv_splits
    slots = 132 * 2

    def waves_used(programs, n):
        return programs * n / slots / -(-programs * n // slots)
    n = kv_splits(300, 22, slots)
    assert n > 1 and waves_used(300, n) >= 0.85, n
    assert kv_splits(2 * slots, 22, slots) == 1  # whole waves already
    assert kv_splits(300, 2, slots) <= 2  # never more splits than units
    assert kv_splits(10, 40, slots) == MAX_SPLITS  # a small grid: as many as allowed


# precision="bf16" reads the pass's K/V in place, and without a mask the whole pass is one unit: tokens
# 2^27 elements apart put row 16 2^31 elements past row 0 (as 147600 tokens of a fused QKV projection of
# 40 x 128 heads, 15360 elements a token). Only those rows of the 4 GB buffers are touched.
WIDE_ROWS = """
import sys, torch, xjfast
device, backend = sys.argv[1:]
T, D, stride = 17, 64, 2 ** 27
def wide():
    t = torch.empty((T - 1) * stride + D, dtype=torch.bfloat16, device=device)
    return t.as_strided((1, T, 1, D), (T * stride, stride, D, 1)).copy_(torch.randn(1, T, 1, D))
q, k, v = torch.randn(1, T, 1, D, device=device).bfloat16(), wide(), wide()
ref = xjfast.temporal_attention(q, k.contiguous(), v.contiguous(), precision="bf16", backend="reference")
out = xjfast.temporal_attention(q, k, v, precision="bf16", backend=backend)
assert (out.float() - ref.float()).abs().max() <= 2 ** -6, "outputs differ"
"""


@pytest.mark.parametrize("backend", [p for p in fast_backends("temporal_attention") if p.id == "triton"])
def test_triton_reads_pass_rows_2_31_elements_apart(backend):
    """Row offsets past int32 (they wrapped and read outside k: a crash, hence a child process)."""
    run = subprocess.run([sys.executable, "-c", WIDE_ROWS, str(DEVICE), backend], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_forced_splits_are_checked(monkeypatch):
    pytest.importorskip("triton")
    from xjfast.kernels.temporal_attention import split_plan
    q, k, v = qkv(L=64, H=2, D=64)
    plan, view = plan_of(q, k, v, block_tokens=32)
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("XJFAST_TRITON_ATTENTION_SPLITS", bad)
        with pytest.raises(ValueError, match=f"XJFAST_TRITON_ATTENTION_SPLITS: expected a positive integer, got '{bad}'"):
            split_plan(q, plan, view, True)
    monkeypatch.setenv("XJFAST_TRITON_ATTENTION_SPLITS", "9")
    assert split_plan(q, plan, view, True) == (2, 1)  # two units: two splits of one


@pytest.mark.gpu
@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("cached, query_frames", [(3, 1), (21, 2)])
def test_fast_backend_stream_shape(backend, dtype, D, cached, query_frames):
    """Wan2.1-1.3B's stream shape: 12 heads, 1560-token frames, up to 21 cached frames."""
    H, T = 12, 1560
    q, k, v = (t.to(DEVICE) for t in qkv(L=query_frames * T, H=H, D=D, dtype=dtype))
    caches = [filled_cache(cached, H, D, T, sink_frames=1, window_frames=cached - 1) for _ in range(2)]
    out, lse = run_backend(backend, q, k, v, caches[0], block_tokens=T)
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate=backend, block_tokens=T)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_l2(out, ref.double()) <= SIM_REL_L2 and (lse - ref_lse).abs().max() < 1e-2


def where_it_differs(out, ref) -> str:
    """For a kernel that disagrees: how much, and where, by the positions a tensor-core layout
    mistake shows in (query row mod 16 within a warp's tile, channel mod 8 within an n-tile),
    plus NaN rows (unwritten outputs)."""
    err = (out.double() - ref.double()).abs()  # [B, L, H, D]
    by_row = err.mean(dim=(0, 2, 3))
    by_row16 = [f"{by_row[r::16].mean():.3g}" for r in range(16)]
    by_ch8 = [f"{err.mean(dim=(0, 1, 2))[c::8].mean():.3g}" for c in range(8)]
    worst = [int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), err.shape)]
    return (f"rel L2 {rel_l2(out, ref.double()):.3g}; worst [b, l, h, d] = {worst}; NaN rows "
            f"{int(out.isnan().any(dim=(0, 2, 3)).sum())}; mean |err| by row % 16 {by_row16}; "
            f"by channel % 8 {by_ch8}")


def test_a_forced_hopper_path_is_refused_on_other_gpus_with_the_reason(monkeypatch):
    """XJFAST_CUDA_ATTENTION_CORE=wgmma or ws on a GPU other than sm_90, or with an xjfast._C that
    holds no sm_90a SASS: the CUDA backend says it cannot run (auto goes to Triton) before a launch
    that the extension would refuse."""
    from xjfast import _ext
    from xjfast.ops import temporal_attention as ta
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90a", "100a"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.delenv("XJFAST_CUDA_ATTENTION_CORE", raising=False)
    assert ta.forced_core_reason(gpu) is None
    for core in ("auto", "mma"):
        monkeypatch.setenv("XJFAST_CUDA_ATTENTION_CORE", core)
        assert ta.forced_core_reason(gpu) is None
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_CORE", "ws")
    assert ta.forced_core_reason(gpu) == ("XJFAST_CUDA_ATTENTION_CORE=ws runs on sm_90 only, with xjfast._C built for "
                                          "sm_90a; this GPU (sm_100) runs mma")
    assert ta.forced_core_reason(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ta.forced_core_reason(gpu) is None and ta.cuda_paths(gpu) == ["wgmma", "ws", "mma"]
    # a plain sm_90 build runs on an H100, but its wgmma kernels would trap: mma.sync only
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90"])
    assert ta.cuda_paths(gpu) == ["mma"] and "sm_90 only, with xjfast._C built for sm_90a" in ta.forced_core_reason(gpu)
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90a", "100a"])
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_CORE", "tma")
    with pytest.raises(ValueError, match="XJFAST_CUDA_ATTENTION_CORE"):
        ta.forced_core_reason(gpu)


def cuda_cores():
    """The CUDA kernel's paths this GPU runs (mma.sync everywhere; on sm_90 also wgmma and the
    warp-specialized TMA kernel ws; without a GPU, all three in xjfast._C's CPU build, an sm_90
    with sm_90a code); one that XJFAST_CUDA_ATTENTION_SKIP leaves out (gpu_check.sh: its first
    launch hung or failed) is reported skipped."""
    from xjfast.ops.temporal_attention import CUDA_CORES, cuda_paths, skipped_cuda_paths
    if not torch.cuda.is_available():
        return [core for core in CUDA_CORES if core != "auto"]
    skipped = skipped_cuda_paths()
    reason = "XJFAST_CUDA_ATTENTION_SKIP: its first launch hung or failed (gpu-check.log)"
    return [pytest.param(p, marks=pytest.mark.skip(reason=reason)) if p in skipped else p
            for p in cuda_paths(torch.device("cuda"))]


@pytest.mark.gpu(simt=True)
@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_input_comes_out_as_nan_not_as_a_finite_answer(backend, where):
    """One NaN in q, k or v (a diverged model) cannot be caught per call without a host sync per
    layer, so no kernel may turn it into a plausible finite answer: NaN comes out in some of the
    rows where the reference has it (the FP8 scales may confine it to fewer), and only there; the
    other head stays finite. GPU only: the interpreter decodes e4m3's NaN (0x7F) as 480."""
    q, k, v = (t.to(DEVICE) for t in qkv(L=256, H=2, D=128, dtype=torch.bfloat16))
    dict(q=q, k=k, v=v)[where][0, 5, 0, 3] = float("nan")
    out = temporal_attention(q, k, v, block_tokens=128, backend=backend)
    ref = temporal_attention(q, k, v, block_tokens=128, backend="reference")
    nan_rows, ref_rows = out[0, :, 0].isnan().any(-1), ref[0, :, 0].isnan().any(-1)
    assert nan_rows.any() and not (nan_rows & ~ref_rows).any(), (nan_rows.nonzero().flatten().tolist(),
                                                                 ref_rows.nonzero().flatten().tolist())
    assert out[0, :, 1].isfinite().all()


@pytest.mark.parametrize("backend, precision", [
    pytest.param(b.values[0], p, id=f"{b.values[0]}-{p}",
                 marks=[*b.marks, *([pytest.mark.gpu(simt=True)] if p == "fp8" else [])])
    for b in fast_backends("temporal_attention") for p in ("bf16", "fp8") if (b.values[0], p) != ("cuda", "bf16")])
def test_a_nan_key_reaches_only_the_rows_that_may_see_it(backend, precision):
    """Block-causal masking hides a later block's keys from the rows before it, NaN ones included:
    a query tile that straddles two blocks (100-token blocks, 64- or 128-row tiles) must not give
    its earlier block's rows a NaN from the later block's keys (a mask that only adds -inf lets a
    NaN score through: -inf + NaN is NaN). fp8 on a GPU only: the interpreter decodes e4m3's NaN
    (0x7F) as 480."""
    q, k, v = (t.to(DEVICE) for t in qkv(L=300, H=2, D=64, dtype=torch.bfloat16))
    k[0, 150, 0, 3] = float("nan")  # block 1
    out = temporal_attention(q, k, v, block_tokens=100, precision=precision, backend=backend)
    ref = temporal_attention(q, k, v, block_tokens=100, precision=precision, backend="reference")
    nan_rows, ref_rows = out[0, :, 0].isnan().any(-1), ref[0, :, 0].isnan().any(-1)
    assert not ref_rows[:100].any() and ref_rows[100:].all()
    assert nan_rows.any() and not (nan_rows & ~ref_rows).any(), nan_rows.nonzero().flatten().tolist()
    assert out[0, :, 1].isfinite().all()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN rows
@pytest.mark.parametrize("backend, precision", [
    pytest.param(b.values[0], p, id=f"{b.values[0]}-{p}",
                 marks=[*b.marks, *([pytest.mark.gpu(simt=True)] if p == "fp8" else [])])
    for b in fast_backends("temporal_attention") for p in ("bf16", "fp8") if (b.values[0], p) != ("cuda", "bf16")])
def test_a_nan_key_in_a_page_hidden_by_a_lag_stays_hidden(backend, precision):
    """frame_lags hide the oldest window page from a speculative pass's later frame, NaN keys
    included: with 100-token frames a query tile holds rows of both frames, and the lagged frame's
    rows stay finite, as the reference's. In FP8 the reference's commit gives the page a NaN K
    scale too, which the hidden rows must not take either. fp8 on a GPU (or the CUDA kernels' CPU
    build) only: the interpreter decodes e4m3's NaN (0x7F) as 480."""
    T, dims = 100, 64
    cache = StreamingKVCache(1, 1, 2, dims, T, sink_frames=1, window_frames=3, storage=precision, device=DEVICE,
                             backend="reference")
    for f in range(5):  # the window holds frames 2, 3, 4: frame 2 is hidden from a lag of 1
        k, v = (t.to(DEVICE) for t in qkv(L=T, H=2, D=dims, dtype=torch.bfloat16)[1:])
        if f == 2:
            k[0, 7, 0, 3] = float("nan")
        cache.commit(0, k, v)
    q, k, v = (t.to(DEVICE) for t in qkv(L=2 * T, H=2, D=dims, dtype=torch.bfloat16))
    kwargs = dict(block_tokens=T, kv_cache=cache, layer=0, precision=precision, frame_lags=(0, 1))
    out = temporal_attention(q, k, v, backend=backend, **kwargs)
    ref = temporal_attention(q, k, v, backend="reference", **kwargs)
    nan_rows, ref_rows = out[0, :, 0].isnan().any(-1), ref[0, :, 0].isnan().any(-1)
    assert ref_rows[:T].all() and not ref_rows[T:].any()
    assert torch.equal(nan_rows, ref_rows) and out[0, :, 1].isfinite().all()


@pytest.mark.gpu(simt=True)
@pytest.mark.parametrize("backend", [b for b in fast_backends("temporal_attention") if b.values[0] == "cuda"])
@pytest.mark.parametrize("core", cuda_cores())
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_cores_match_simulating_reference(backend, core, case):
    """Each tensor-core path of the CUDA kernel on every masking / cache / keep-buffer case."""
    spec = CASES[case]
    q, k, v, caches = case_inputs(spec)
    if uncovered(backend, q, k, v, caches[0], **spec["kwargs"]) is not None:
        pytest.skip("a case the CUDA kernel does not cover (tested above: it says so)")
    out, lse = run_backend(backend, q, k, v, caches[0], core=core, **spec["kwargs"])
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate=backend, **spec["kwargs"])
    assert not out.isnan().any() and not lse.isnan().any(), where_it_differs(out, ref)
    assert rel_l2(out, ref.double()) <= SIM_REL_L2, where_it_differs(out, ref)
    assert (lse - ref_lse).abs().max() < 5e-3
    if caches[0] is not None and caches[0].mass is not None:
        assert torch.allclose(mass_values(caches[0].mass), mass_values(caches[1].mass), rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("core", cuda_cores())
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_cores_at_the_stream_shape(core, D):
    """Wan2.1-1.3B's stream shape (12 heads, 1560-token frames, 12 cached, 2 query frames) per core."""
    from xjfast.backends import backend_unavailable_reason
    reason = backend_unavailable_reason("cuda", DEVICE)
    if reason is not None:
        pytest.skip(reason)
    H, T = 12, 1560
    q, k, v = (t.to(DEVICE) for t in qkv(L=2 * T, H=H, D=D, dtype=torch.bfloat16))
    caches = [filled_cache(12, H, D, T, sink_frames=1, window_frames=11) for _ in range(2)]
    out, lse = run_backend("cuda", q, k, v, caches[0], core=core, block_tokens=T)
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate="cuda", block_tokens=T)
    assert not out.isnan().any() and not lse.isnan().any(), where_it_differs(out, ref)
    assert rel_l2(out, ref.double()) <= SIM_REL_L2, where_it_differs(out, ref)
    assert (lse - ref_lse).abs().max() < 1e-2


@pytest.mark.gpu(simt=True)
@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
def test_fast_backend_within_design_bounds_of_exact(backend):
    q, k, v = (t.to(DEVICE) for t in qkv(L=1024, H=4, D=128, dtype=torch.bfloat16))
    out = temporal_attention(q, k, v, block_tokens=256, backend=backend)
    ref, _ = exact_attention(q.cpu(), k.cpu(), v.cpu(), explicit_block_mask(1024, 256))
    assert rel_l2(out.cpu(), ref) <= FP8_REL_L2 and cosine(out.cpu(), ref) >= FP8_COS


@pytest.mark.gpu(simt=True)
@pytest.mark.parametrize("backend", fast_backends("temporal_attention"))
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_fast_backend_on_fp32_inputs_within_design_bounds_of_exact(backend, precision):
    """fp32 q/k/v (the op takes them): the 16-bit-key dots compile to TF32 on the GPU, finer than
    bf16, so the bf16 bound still holds; FP8 quantizes them as it does 16-bit inputs."""
    q, k, v = (t.to(DEVICE) for t in qkv(L=1024, H=4, D=128, dtype=torch.float32))
    if uncovered(backend, q, k, v, block_tokens=256, precision=precision) is not None:
        pytest.skip(f"{backend} does not take fp32 {precision} (it says so)")
    out = temporal_attention(q, k, v, block_tokens=256, precision=precision, backend=backend)
    ref, _ = exact_attention(q.cpu(), k.cpu(), v.cpu(), explicit_block_mask(1024, 256))
    assert out.dtype == torch.float32 and out.isfinite().all()
    if precision == "fp8":
        assert rel_l2(out.cpu(), ref) <= FP8_REL_L2 and cosine(out.cpu(), ref) >= FP8_COS
    else:
        mask = explicit_block_mask(1024, 256).to(DEVICE)
        bf16 = torch.nn.functional.scaled_dot_product_attention(
            *(t.bfloat16().transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2).cpu()
        assert (out.cpu().double() - ref).abs().max() <= 2 * (bf16.double() - ref).abs().max() + 1e-5


# ---- the CUDA kernel's host-side contract (xjfast._C imports without a GPU) ---------------------

def test_cuda_kernel_step_is_the_one_the_reference_simulates():
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    from xjfast.ops.temporal_attention import CUDA_KV_TILE
    assert C.attention_block_n == CUDA_KV_TILE


def cuda_call(**change):
    """Arguments of a valid-looking xjfast._C.temporal_attention call (fake pointers), changed."""
    fake = 1 << 20  # 16-byte aligned; never dereferenced: validation fails before any launch
    args = dict(q=fake, q_strides=[2 * 64 * 128, 2 * 128, 128], out=fake, out_strides=[2 * 64 * 128, 2 * 128, 128],
                lse=fake, dtype=1, sizes=[1, 2, 64, 128], cache=[0] * 5, cache_tokens=1, cache_pages=0, page_table=0,
                n_pages=0, n_sinks=0, keep=[0] * 5, keep_capacity=1, keep_count=0, pass_units=[fake] * 5, unit_tokens=64,
                n_units=1, private_blocks=fake, block_tokens=64, causal=True, frame_slots=fake, frame_lags=0, first_slot=0,
                sm_scale_log2=0.1, rope=0, rope_center=0, rope_dims=0, core=0, stream=0)
    args.update(change)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(q=0), "q and frame_slots must not be null"),
    (dict(sizes=[1, 2, 64, 96]), "head_dim must be 64 or 128, got 96"),
    (dict(q=(1 << 20) + 2), "q must be 16-byte aligned"),
    (dict(q_strides=[2 * 64 * 128, 2 * 128 + 1, 128]), "q must be 16-byte aligned"),
    (dict(pass_units=[0] * 5), "pass units: null pointer"),
    (dict(n_units=2), "the pass units must cover Lq exactly"),
    (dict(n_pages=3), "page_table must not be null"),
    (dict(n_pages=3, page_table=1 << 20, cache=[1 << 20] * 5, cache_pages=2),
     "the page table lists 3 pages, the cache holds 2"),
    (dict(keep_count=5), "keep buffer: null pointer"),
    (dict(block_tokens=48), "a block-causal mask needs block_tokens dividing Lq"),
    (dict(rope_dims=44), "a temporal rotary needs its cos/sin table"),
    (dict(sizes=[300, 300, 64, 128]), "B \\* H must be <= 65535"),
    (dict(core=7), "unknown core"),
])
def test_cuda_launch_rejects_bad_arguments_before_launching(change, words):
    C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built")
    with pytest.raises(ValueError, match=f"temporal_attention: {words}"):
        C.temporal_attention(**cuda_call(**change))


@pytest.mark.parametrize("backend", [b for b in fast_backends("temporal_attention") if b.values[0] == "triton"])
@pytest.mark.parametrize("case", ["full", "block-causal-private", "speculative-pass"])
def test_triton_tile_of_two_query_groups(backend, case, monkeypatch):
    """With BLOCK_M = 128 a Triton program holds two 64-row groups of queries, each quantized with
    its own scale as the reference defines: the first group is 100x larger than the second, which
    one shared scale would flush to a few e4m3 steps."""
    from xjfast.backends import triton_interpreted
    from xjfast.kernels.temporal_attention import CONFIG_ENV, config
    _, block_n, warps, stages = config(torch.device(DEVICE), triton_interpreted())
    monkeypatch.setenv(CONFIG_ENV, f"128,{block_n},{warps},{stages}")
    spec = CASES[case]
    H, T = 2, 32
    q, k, v = (t.to(DEVICE) for t in qkv(L=spec["L"], H=H, D=spec["D"]))
    q[:, :64] *= 100
    caches = [filled_cache(H=H, D=spec["D"], T=T, **spec["cache"]) if "cache" in spec else None for _ in range(2)]
    out, lse = run_backend(backend, q, k, v, caches[0], **spec["kwargs"])
    ref, ref_lse = run_backend("reference", q, k, v, caches[1], simulate=backend, **spec["kwargs"])
    assert rel_l2(out[:, 64:], ref[:, 64:].double()) <= SIM_REL_L2
    assert rel_l2(out, ref.double()) <= SIM_REL_L2
    assert (lse - ref_lse).abs().max() < 5e-3


def test_triton_configuration_forced_or_ranked(monkeypatch):
    """XJFAST_TRITON_ATTENTION_CONFIG runs one configuration; otherwise a GPU runs the fastest
    candidate of its target that backend_ranking.json orders for its compute capability."""
    pytest.importorskip("triton")
    from xjfast.kernels import temporal_attention as kernel
    monkeypatch.setenv(kernel.CONFIG_ENV, "128,32,8,3")
    assert kernel.config(torch.device("cpu"), True) == (128, 32, 8, 3)
    for bad in ("64,64,8", "64,48,8,2", "64,16,4,1", "64,64,6,2", "a,b,c,d"):  # 16 keys: an FP8 dot takes K >= 32
        monkeypatch.setenv(kernel.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=f"XJFAST_TRITON_ATTENTION_CONFIG: expected 'BLOCK_M,BLOCK_N,warps,"
                                             f"stages'.*got '{bad}'"):
            kernel.config(torch.device("cpu"), True)
    monkeypatch.delenv(kernel.CONFIG_ENV)
    assert kernel.config(torch.device("cpu"), True) == kernel.INTERPRET_CONFIG
    ranking = {kernel.CONFIG_RANKING: {"9.0": {"order": ["64,32,8,3", "64,64,8,2"]},
                                       "10.0": {"order": ["64,32,4,2", "64,32,8,1"]}}}
    assert kernel.ranked_config((9, 0), ranking) == (64, 64, 8, 2)  # 64,32,8,3 is no longer a candidate
    assert kernel.ranked_config((10, 0), ranking) == (64, 32, 8, 1)  # 64,32,4,2 is no sm_100 candidate
    assert kernel.ranked_config((9, 0), {}) == kernel.CANDIDATES["sm_90"][0]
    assert kernel.ranked_config((12, 0), {}) == kernel.CANDIDATES["sm_100"][0]
    assert kernel.ranked_config((8, 9), {}) == kernel.CANDIDATES["sm_89"][0] == (64, 64, 8, 1)
    assert [kernel.hopper_paths(cc) for cc in ((8, 9), (9, 0), (10, 0), (12, 0))] == [True, True, False, False]


def test_sixteen_bit_launches_take_the_tiles_that_compile_without_spills():
    """Launches that read 16-bit keys (precision "bf16", a bf16-stored cache) hold twice FP8's
    bytes per K/V tile: at 4 warps 32 keys and one stage, at 8 warps at least 64 keys (sm_100's
    64,32,8,1 spilled inside the key loop there), on sm_89 128 rows and 32 keys at 8 warps; all-FP8
    launches run the candidate as it is."""
    pytest.importorskip("triton")
    from xjfast.kernels.temporal_attention import CANDIDATES, precision_config
    assert precision_config((64, 64, 4, 2), False) == (64, 32, 4, 1)
    assert precision_config((64, 32, 8, 1), False) == (64, 64, 8, 1)
    assert precision_config((64, 64, 8, 2), False) == (64, 64, 8, 2)
    for target, candidates in CANDIDATES.items():
        for cfg in candidates:
            assert precision_config(cfg, True, target) == cfg
            assert precision_config(cfg, False, "sm_89") == (128, 32, 8, 1)  # sm_89's one spill-free 16-bit tile


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("temporal_attention"))
def test_dominant_key_read_last(backend):
    """One key scores ~200 (natural-log units) above all others and is read last in the online
    order, so the earlier tiles' running max sits far below the row's: their P, rescaled by
    exp(running max - row max), underflows to zero and the output is that key's value."""
    q, k, v = qkv(L=256, D=64, k_bias=False)
    direction = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)
    q = q + 30 * direction
    k[:, -1] = 60 * direction
    ref, ref_lse = exact_attention(q, k, v)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    out, lse = temporal_attention(q, k, v, return_lse=True, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    assert out.isfinite().all() and lse.isfinite().all()
    assert rel_l2(out, ref) <= FP8_REL_L2  # the LSE (~225) carries the FP8 scores' relative error
    assert ((lse.double() - ref_lse).abs() <= 0.05 * ref_lse.abs()).all()
