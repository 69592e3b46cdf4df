"""StreamingKVCache: eviction order, sink pinning, FP8 storage, keep_tokens retention, constant memory."""
import contextlib

import pytest
import torch

from xjfast import StreamingKVCache, temporal_attention
from xjfast.errors import BackendUnavailable
from xjfast.cache import KEEP
from xjfast.ops.temporal_attention import mass_values

T, H, D = 16, 2, 64


def frame(n=1, dtype=torch.float32):
    return torch.randn(1, n * T, H, D).to(dtype), torch.randn(1, n * T, H, D).to(dtype)


@pytest.mark.parametrize("per_commit", [1, 3])
def test_eviction_order_and_sink_pinning(per_commit):
    cache = StreamingKVCache(2, 1, H, D, T, sink_frames=2, window_frames=3)
    for _ in range(12 // per_commit):
        for layer in range(2):
            cache.commit(layer, *frame(per_commit))
    assert cache.frames_seen == 12
    assert cache.cached_frames(0) == cache.cached_frames(1) == [0, 1, 9, 10, 11]
    assert cache.num_frames(0) == 5


def test_eviction_reuses_the_oldest_page_in_place():
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2)
    storage = cache.k_pages.data_ptr()
    for _ in range(3):
        cache.commit(0, *frame())
    before = cache.view(0).page_table.tolist()  # [sink, window oldest, window newest]
    cache.commit(0, *frame())
    after = cache.view(0).page_table.tolist()
    assert after == [before[0], before[2], before[1]]  # the evicted page now holds the new frame
    assert cache.k_pages.data_ptr() == storage


def test_fp8_pages_store_k_minus_mean_with_per_channel_v_scales():
    cache = StreamingKVCache(1, 1, H, D, T)
    k, v = frame()
    k = k + 5.0  # a common offset: smoothing removes it before quantization
    v[..., 3] *= 1000.0  # one loud V channel must not cost the other channels their precision
    cache.commit(0, k, v)
    view = cache.view(0)
    page = view.page_table[0].item()
    assert view.k_pages.dtype == torch.float8_e4m3fn
    assert torch.allclose(view.k_mean[page], k.mean(1)[0], atol=1e-5)
    k_back = view.k_pages[page].float() * view.k_scale[page][:, None, :, None] + view.k_mean[page][:, None]
    v_back = view.v_pages[page].float() * view.v_scale[page][:, None]
    assert ((k_back - k).norm() / (k - k.mean(1, keepdim=True)).norm()) < 0.04
    quiet = [c for c in range(D) if c != 3]
    assert ((v_back - v)[..., quiet].norm() / v[..., quiet].norm()) < 0.04


def test_memory_constant_over_a_10000_frame_stream():
    cache = StreamingKVCache(1, 1, 1, 64, 4, sink_frames=1, window_frames=4, keep_tokens=4)
    size = cache.memory_bytes()
    k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64)
    for _ in range(10_000):
        cache.commit(0, k, v)
    assert cache.frames_seen == 10_000 and cache.memory_bytes() == size
    assert cache.cached_frames(0) == [0, 9996, 9997, 9998, 9999]
    held = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]  # the device ring's tables too
    assert size == sum(t.numel() * t.element_size() for t in held)


def test_keep_tokens_retains_the_highest_mass_tokens():
    """Queries aim at 3 planted keys of frame 1; when frame 1 is evicted, those 3 are kept."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=3, storage="fp32", rope_dims=0)
    target = torch.nn.functional.normalize(torch.randn(H, D), dim=-1)
    frames = [frame() for _ in range(3)]
    planted = [2, 7, 11]
    for i in planted:
        frames[1][0][:, i] = 6.0 * target
    for kf, vf in frames:
        cache.commit(0, kf, vf)
    q = torch.randn(1, T, H, D) + 3.0 * target
    for _ in range(2):  # frame 1 is the oldest window frame: the next to be evicted
        temporal_attention(q, *frame(), kv_cache=cache, layer=0)
    cache.commit(0, *frame())  # evicts frame 1
    assert cache.cached_frames(0) == [0, 2, 3] and cache.keep_count(0) == 3
    view = cache.view(0)
    assert [u.page for u in view.units] == [view.page_table[0].item(), KEEP] + view.page_table[1:].tolist()
    kept = view.keep_k[0].float() * view.keep_k_scale[0][None, :, None] + view.keep_k_mean[0][None]
    assert torch.allclose(kept, frames[1][0][0, planted], atol=1e-4)
    assert torch.allclose(view.keep_v[0].float(), frames[1][1][0, planted], atol=1e-5)


def test_keep_tokens_merge_keeps_the_top_over_evictions():
    """Over 5 evictions the keep buffer holds the 4 tokens of highest attention mass among every
    evicted frame's tokens (each weighed by the pass before its eviction), oldest first, with their
    K and V: the 2 keys of the first frame that its pass aims at outlast the later evictions."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=0, window_frames=1, keep_tokens=4, storage="fp32", rope_dims=0)
    target = torch.nn.functional.normalize(torch.randn(H, D), dim=-1)
    held = frame()
    held[0][:, [3, 9]] = 6.0 * target
    cache.commit(0, *held)
    masses, keys, values = [], [], []
    for i in range(5):
        q = torch.randn(1, T, H, D) + (3.0 * target if i == 0 else 0.0)
        temporal_attention(q, *frame(), kv_cache=cache, layer=0)
        page = cache.view(0).page_table[0].item()  # the window's one frame: the next commit evicts it
        masses.append(mass_values(cache.mass[0, page, 0]))
        keys.append(held[0][0])
        values.append(held[1][0])
        held = frame()
        cache.commit(0, *held)
    assert cache.keep_count(0) == 4
    mass = torch.cat(masses)
    top = mass.topk(4).indices.sort().values
    assert {3, 9} <= set(top.tolist())
    assert torch.equal(cache.keep_mass[0, 0], mass[top])
    view = cache.view(0)
    kept = view.keep_k[0].float() * view.keep_k_scale[0][None, :, None] + view.keep_k_mean[0][None]
    assert torch.allclose(kept, torch.cat(keys)[top], atol=1e-4)
    assert torch.allclose(view.keep_v[0].float(), torch.cat(values)[top], atol=1e-5)


def test_recache_rewrites_frames_in_place():
    cache = StreamingKVCache(2, 1, H, D, T, sink_frames=1, window_frames=2, storage="fp32", rope_dims=0)
    for _ in range(4):
        for layer in range(2):
            cache.commit(layer, *frame())
    size, frames = cache.memory_bytes(), cache.cached_frames(0)
    new = [frame(3) for _ in range(2)]
    cache.recache(new)
    assert cache.memory_bytes() == size and cache.cached_frames(0) == frames and cache.frames_seen == 4
    q, k, v = torch.randn(1, T, H, D), *frame()
    fresh = StreamingKVCache(2, 1, H, D, T, sink_frames=1, window_frames=2, storage="fp32", rope_dims=0)
    fresh.commit(1, *new[1])
    assert torch.allclose(temporal_attention(q, k, v, kv_cache=cache, layer=1, precision="bf16"),
                          temporal_attention(q, k, v, kv_cache=fresh, layer=1, precision="bf16"), atol=1e-5)


def test_reset_forgets_frames():
    cache = StreamingKVCache(1, 1, H, D, T)
    cache.commit(0, *frame(2))
    cache.reset()
    assert cache.frames_seen == 0 and cache.num_frames(0) == 0 and cache.view(0).num_slots == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(window_frames=0), "window_frames: expected an int >= 1"),
    (dict(sink_frames=-1), "sink_frames: expected an int >= 0"),
    (dict(keep_tokens=1.5), "keep_tokens: expected an int"),
    (dict(storage="int4"), "storage: expected one of"),
    (dict(rope_dims=3), "rope_dims: expected an even int"),
    (dict(rope_dims=2.0), r"rope_dims: expected an even int in \[0, 64\], got 2.0"),
    (dict(rope_theta=0.0), "rope_theta: expected a positive finite number, got 0.0"),
    (dict(rope_theta=float("nan")), "rope_theta: expected a positive finite number, got nan"),
    (dict(backend="bogus"), "backend: expected one of 'auto', 'reference', 'triton', 'cuda', got 'bogus'"),
    (dict(device="gpu0"), "device: expected a torch device, got 'gpu0'"),
])
def test_bad_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StreamingKVCache(1, 1, H, D, T, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_a_cuda_cache_without_a_gpu_names_the_device():
    with pytest.raises(ValueError, match=r"device: expected a usable device, got cuda but torch sees no CUDA GPU"):
        StreamingKVCache(1, 1, H, D, T, device="cuda")


@pytest.mark.parametrize("name", ["cpu:0", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_device_named_without_its_tensors_index_takes_them(name):
    """Tensors made on "cuda" report cuda:N (and on "cpu:0", cpu): a cache made on either name
    takes them, in commit and in attention."""
    cache = StreamingKVCache(1, 1, H, D, T, device=name)
    k, v = (t.to(name) for t in frame())
    assert cache.device == k.device
    cache.commit(0, k, v)
    out = temporal_attention(torch.randn(1, T, H, D, device=name), k, v, kv_cache=cache, layer=0)
    assert out.device == k.device and out.isfinite().all()


def test_bad_commits_name_the_argument():
    cache = StreamingKVCache(2, 1, H, D, T)
    k, v = frame()
    with pytest.raises(ValueError, match=r"k: expected shape \[1, n\*16, 2, 64\]"):
        cache.commit(0, k[:, :10], v)
    with pytest.raises(ValueError, match="v: expected 1 frames"):
        cache.commit(0, k, frame(2)[1])
    with pytest.raises(TypeError, match="k: expected dtype"):
        cache.commit(0, k.to(torch.int8), v)
    with pytest.raises(ValueError, match="v: expected a tensor on cpu"):
        cache.commit(0, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 2\)"):
        cache.commit(2, k, v)
    with pytest.raises(ValueError, match="frames: expected one"):
        cache.recache([(k, v)])
    for frames in (None, 3, ((k, v) for _ in range(2))):  # no len(): named, not "object of type ... has no len()"
        with pytest.raises(TypeError, match=r"frames: expected a list of \(k, v\) pairs, one per layer \(2\), got"):
            cache.recache(frames)


def _state(cache):
    return ([cache.cached_frames(i) for i in range(cache.num_layers)], cache.frames_seen,
            [cache.view(i).page_table.tolist() for i in range(cache.num_layers)],
            [cache.keep_count(i) for i in range(cache.num_layers)])


@pytest.mark.parametrize("keep_tokens", [0, 12])
@pytest.mark.parametrize("replayed", [False, True])
@pytest.mark.parametrize("per_commit", [1, 2])
def test_ring_commits_rotate_on_the_device_as_host_commits_do(per_commit, replayed, keep_tokens):
    """Ring commits rotate the ring with device ops; pages, page tables and bookkeeping equal those
    of plain commits over wraps, also when the host's books are kept out of the commits (as in a
    graph capture) and advanced afterwards (as after a replay). With a keep buffer, the evicted
    pages' tokens, chosen by the attention mass each pass accumulates, are compacted alike."""
    host, ring = (StreamingKVCache(2, 1, H, D, T, sink_frames=2, window_frames=3, keep_tokens=keep_tokens)
                  for _ in range(2))
    for step in range(14 // per_commit):
        frames = [frame(per_commit) for _ in range(2)]
        q, own = torch.randn(1, T, H, D), frame()
        for cache in (host, ring):  # a pass over the cache: the mass of the pages next to go
            for layer in range(2):
                temporal_attention(q, *own, kv_cache=cache, layer=layer)
        for layer in range(2):
            host.commit(layer, *frames[layer])
        if ring.ring_unready(per_commit) is not None:
            for layer in range(2):
                ring.commit(layer, *frames[layer])
            continue
        ring.sync_ring()
        before = _state(ring)
        with ring.frozen_mirror() if replayed else contextlib.nullcontext(), ring.ring_commits():
            for layer in range(2):
                ring.commit(layer, *frames[layer])
        if replayed:
            assert _state(ring)[:2] == before[:2]  # the host's books wait for advance_ring_mirror
            ring.advance_ring_mirror(per_commit)
        assert _state(ring) == _state(host)
    assert ring.frames_seen == 14 and ring.cached_frames(1) == [0, 1, 11, 12, 13]
    names = ["k_pages", "v_pages", "k_scale", "k_mean", "v_scale", "page_table"]
    if keep_tokens:
        names += ["keep_k", "keep_v", "keep_k_scale", "keep_k_mean", "keep_v_scale", "keep_mass", "mass"]
        assert ring.keep_count(0) == keep_tokens and host.keep_mass.sum() > 0
    for name in names:
        assert torch.equal(getattr(ring, name).float(), getattr(host, name).float()), name
    q, k, v = torch.randn(1, T, H, D), *frame()
    assert torch.equal(temporal_attention(q, k, v, kv_cache=ring, layer=1),
                       temporal_attention(q, k, v, kv_cache=host, layer=1))


def test_ring_needs_a_full_cache_a_sync_and_a_full_keep_buffer():
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2)
    assert cache.ring_unready(1) == "warm-up: the cache (sinks and window) is not full yet"
    for _ in range(3):
        cache.commit(0, *frame())
    assert cache.ring_unready(1) is None
    assert "larger than the window" in cache.ring_unready(3)
    with pytest.raises(RuntimeError, match="sync_ring"):
        with cache.ring_commits():
            pass
    cache.sync_ring()
    assert cache.ring_head.tolist() == [0]
    with cache.ring_commits():
        cache.commit(0, *frame())
    cache.commit(0, *frame())  # a host commit: the device ring must be synced again
    with pytest.raises(RuntimeError, match="sync_ring"):
        with cache.ring_commits():
            pass
    cache.sync_ring()
    assert cache.ring_head.tolist() == [0] and cache.cached_frames(0) == [0, 3, 4]
    keeping = StreamingKVCache(1, 1, H, D, T, sink_frames=0, window_frames=1, keep_tokens=2 * T)
    keeping.commit(0, *frame())
    for _ in range(2):  # each eviction adds T tokens to the keep buffer, until it is full
        assert keeping.ring_unready(1) == "warm-up: the keep buffer is not full yet"
        keeping.commit(0, *frame())
    assert keeping.ring_unready(1) is None and keeping.keep_count(0) == 2 * T


@pytest.mark.parametrize("keep_tokens", [0, 5])
def test_a_commit_longer_than_the_window_equals_its_frames_one_at_a_time(keep_tokens):
    """Frames past the window's length are evicted within the commit: each evicted page is merged
    into the keep buffer once, before it is overwritten, as frame-by-frame commits do."""
    whole, single = (StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=keep_tokens,
                                      storage="fp32") for _ in range(2))
    k, v = frame(7)
    whole.commit(0, k, v)
    for f in range(7):
        single.commit(0, k[:, f * T:(f + 1) * T], v[:, f * T:(f + 1) * T])
    assert whole.cached_frames(0) == single.cached_frames(0) == [0, 5, 6] and whole.frames_seen == 7
    assert whole.keep_count(0) == single.keep_count(0) == keep_tokens
    for name in ("k_pages", "v_pages", "k_mean", "page_table", "keep_k", "keep_v", "keep_k_mean"):
        assert torch.equal(getattr(whole, name), getattr(single, name)), name


def test_a_rejected_commit_or_recache_leaves_the_cache_as_it_was():
    cache = StreamingKVCache(2, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=4)
    for _ in range(3):
        for layer in range(2):
            cache.commit(layer, *frame())
    before, pages = _state(cache), cache.k_pages.clone()
    k, v = frame()
    with pytest.raises(TypeError, match="v: expected dtype torch.float32, got torch.bfloat16"):
        cache.commit(0, k, v.bfloat16())
    with pytest.raises(ValueError, match="k: the last dimension must have stride 1"):
        cache.commit(0, torch.randn(1, T, H, 2 * D)[..., ::2], v)
    with pytest.raises(ValueError, match=r"frames\[1\]\[1\]: expected 3 frames"):
        cache.recache([frame(3), (frame(3)[0], frame(2)[1])])
    assert _state(cache) == before and torch.equal(cache.k_pages, pages)
    if not torch.cuda.is_available():  # a backend that cannot run here, found before anything moves
        cache.backend = "cuda"
        with pytest.raises(BackendUnavailable, match="kv_cache_commit: backend 'cuda' is unavailable"):
            cache.commit(0, k, v)
        assert _state(cache) == before


def test_a_ring_commit_before_the_cache_is_full_is_refused():
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2)
    cache.commit(0, *frame())
    cache.sync_ring()
    with pytest.raises(RuntimeError, match="not a pure ring rotation .*warm-up"):
        with cache.ring_commits():
            cache.commit(0, *frame())
    assert cache.cached_frames(0) == [0] and cache.ring_head.tolist() == [0]


def test_expected_commits_weigh_every_page_they_may_evict():
    """A speculative pass commits its block, then the drafts it accepts: the attention mass is
    accumulated on as many of the oldest window pages as it may evict, so that each one's kept
    tokens are chosen by attention, not arbitrarily."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=3, keep_tokens=T, storage="fp32")
    for _ in range(4):
        cache.commit(0, *frame())
    window = cache.view(0).page_table[1:].tolist()
    assert cache.view(0).mass_pages == tuple(window[:1])  # as large as the last commit
    cache.expect_commits(2)
    assert cache.view(0).mass_pages == tuple(window[:2])
    temporal_attention(torch.randn(1, T, H, D), *frame(), kv_cache=cache, layer=0)
    assert (cache.mass[0, window[:2]] > 0).all() and (cache.mass[0, window[2]] == 0).all()
    cache.commit(0, *frame())
    cache.commit(0, *frame())  # the second page evicted in the pass: its tokens compete by their mass
    assert (cache.keep_mass[0] > 0).all()
    with pytest.raises(ValueError, match="frames: expected an int >= 1, got 0"):
        cache.expect_commits(0)


def test_attention_inside_read_only_accumulates_no_mass():
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=0, window_frames=1, keep_tokens=T, storage="fp32")
    cache.commit(0, *frame())
    with cache.read_only():
        temporal_attention(torch.randn(1, T, H, D), *frame(), kv_cache=cache, layer=0)
    assert (cache.mass == 0).all()
    temporal_attention(torch.randn(1, T, H, D), *frame(), kv_cache=cache, layer=0)
    assert (cache.mass > 0).any()


def test_a_cache_warming_up_weighs_only_pages_a_commit_would_evict():
    """Until the sinks and window are full a commit evicts nothing: passes then weigh no page, so
    the first evicted page enters the keep buffer with one pass's mass, as every later one does
    (weighed by every warm-up pass, its tokens held the keep buffer for good)."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=3, keep_tokens=T, storage="fp32")
    for _ in range(4):
        temporal_attention(torch.randn(1, T, H, D), *frame(), kv_cache=cache, layer=0)
        assert cache.view(0).mass_pages == () and (cache.mass == 0).all()
        cache.commit(0, *frame())
    cache.expect_commits(3)  # the cache is full: 3 frames evict the 3 window pages
    assert cache.view(0).mass_pages == tuple(cache.view(0).page_table[1:].tolist())
    cache.reset()
    cache.commit(0, *frame(2))
    cache.expect_commits(3)  # 2 free pages take the first 2 frames: the third evicts the oldest window page
    assert cache.view(0).mass_pages == tuple(cache.view(0).page_table[1:2].tolist())


def test_recache_keeps_the_attention_mass_of_its_frames():
    """Passes between commits (a step schedule's later steps) weigh the page the next commit
    evicts; a recache in between re-encodes the same frames, so their weights stay."""
    cache = StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=T, storage="fp32")
    for _ in range(3):
        cache.commit(0, *frame())
    temporal_attention(torch.randn(1, T, H, D), *frame(), kv_cache=cache, layer=0)
    mass = cache.mass.clone()
    assert mass.sum() > 0
    cache.recache([frame(3)])
    assert torch.equal(cache.mass, mass)
    cache.commit(0, *frame())  # the evicted page's tokens enter the keep buffer with that mass
    assert torch.allclose(cache.keep_mass[0].sum(), mass_values(mass).sum())
    assert (cache.mass == 0).all()
