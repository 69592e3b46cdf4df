"""Speculative next-frame drafting: exactness against the sequential stream, depth control."""
import pytest
import torch

from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.engine.speculation import DepthController
from xjfast.models import build

from backends import DEVICE, fast_backends

FRAMES = 9


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


def generator(tiny, **kwargs):
    model, decoder, encoder, preset = tiny
    # fp32 storage, bf16 precision on fp32 tensors: exact attention, so equality is meaningful;
    # a window that holds the whole test stream, so no eviction differs between pass shapes
    options = dict(cache_config=CacheConfig(1, 16, storage="fp32"), latent_hw=preset.latent_hw,
                   text_encoder=encoder, precision="bf16", backend="reference", seed=5)
    options.update(kwargs)
    g = StreamGenerator(model, decoder, **options)
    g.set_prompt("fireflies over a pond")
    return g


def latent_stream(g, frames=FRAMES):
    out = []
    while sum(x.shape[2] for x in out) < frames:
        out.append(g.step().latents)
    return torch.cat(out, dim=2)[:, :, :frames]


@pytest.fixture(scope="module")
def sequential(tiny):
    """The non-speculative stream, with room for an oracle's drafts past the compared frames."""
    return latent_stream(generator(tiny), FRAMES + 4)


def oracle(sequential):
    def draft(history, count, frame_index):
        return [sequential[:, :, frame_index + j:frame_index + j + 1] for j in range(count)]
    return draft


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_oracle_drafts_are_always_accepted_and_reproduce_the_stream(tiny, sequential, depth):
    g = generator(tiny, speculate=depth, drafter=oracle(sequential))
    stream = latent_stream(g)
    assert (stream - sequential[:, :, :FRAMES]).abs().max() < 1e-5
    s = g.stats()["speculation"]
    assert s["acceptance_rate"] == 1.0 and s["frames_per_pass"] > 1.5


@pytest.mark.parametrize("sinks", [0, 1])
@pytest.mark.parametrize("depth", [2, 4])
def test_speculation_reproduces_the_stream_while_the_cache_evicts(tiny, sinks, depth):
    """A window of 3: from the fourth frame on every pass evicts, and a pass's later frames see
    the cache as the stream would by then (frame_lags), so the stream is the same."""
    config = CacheConfig(sinks, 3, storage="fp32")
    sequential = latent_stream(generator(tiny, cache_config=config), 14 + depth)
    g = generator(tiny, cache_config=config, speculate=depth, drafter=oracle(sequential))
    assert (latent_stream(g, 14) - sequential[:, :, :14]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", [b for b in fast_backends("temporal_attention") if b.values[0] == "cuda"])
def test_speculation_on_the_cuda_kernels_reproduces_their_stream_while_the_cache_evicts(backend):
    """Every op on the CUDA kernels (xjfast._C's CPU build without a GPU), FP8 attention with
    frame_lags: oracle drafts at depth 2 give the stream the same kernels give without speculation,
    to FP8's pass-shape rounding (2e-5 on the CPU build)."""
    tiny = build("tiny", device=DEVICE)
    options = dict(cache_config=CacheConfig(1, 3), precision="fp8", backend=backend)
    sequential = latent_stream(generator(tiny, **options), 12)
    g = generator(tiny, speculate=2, drafter=oracle(sequential), **options)
    assert (latent_stream(g, 10) - sequential[:, :, :10]).abs().max() < 1e-3
    assert g.stats()["speculation"]["acceptance_rate"] == 1.0


@pytest.mark.parametrize("drafter", ["hold", "extrapolate", "shallow:2"])
def test_zero_tolerance_reproduces_the_stream_with_any_drafter(tiny, sequential, drafter):
    g = generator(tiny, speculate=3, drafter=drafter, accept_tol=0.0)
    assert (latent_stream(g) - sequential[:, :, :FRAMES]).abs().max() < 1e-5
    assert g.stats()["speculation"]["acceptance_rate"] == 0.0


def test_cache_after_speculation_equals_sequential_cache(tiny, sequential):
    seq = generator(tiny)
    latent_stream(seq, 7)
    spec = generator(tiny, speculate=4, drafter=oracle(sequential))
    latent_stream(spec, 7)
    assert seq.cache.cached_frames(0)[:6] == spec.cache.cached_frames(0)[:6]
    for layer in range(len(tiny[0].blocks)):
        a, b = seq.cache.view(layer), spec.cache.view(layer)
        for pa, pb in zip(a.page_table.tolist()[:6], b.page_table.tolist()[:6]):
            k_a = a.k_pages[pa] + a.k_mean[pa][:, None]
            k_b = b.k_pages[pb] + b.k_mean[pb][:, None]
            assert (k_a - k_b).abs().max() < 1e-4


def test_auto_depth_measures_and_picks_the_fastest():
    c = DepthController(None, max_depth=3)
    assert [c.choose() for _ in range(1)] == [1]
    for depth, seconds in ((1, 1.0), (2, 1.1), (3, 1.2)):
        c.record(depth, seconds, depth - 1)  # every draft accepted
    assert c.choose() == 3 and c.expected_frames(3) == 3
    slow = DepthController(None, max_depth=3)
    for depth, seconds in ((1, 1.0), (2, 3.0), (3, 5.0)):
        slow.record(depth, seconds, 0)  # nothing accepted: no speculation pays
    assert slow.choose() == 1 and slow.speedup() == 1.0
    c.record(3, 1.2, 2)
    c.record(3, 100.0, 2)  # one slow pass (a compile, a graph capture) does not move the median
    assert c.choose() == 3


def test_acceptance_counts_the_drafts_judged():
    """Drafts after the first rejected one are never judged: a pass of 3 drafts that accepts one
    judged two, so the per-draft rate is 1/2 (not 1/3) and the expected frames follow from it."""
    c = DepthController(None, max_depth=4)
    assert c.acceptance() is None
    c.record(4, 1.0, 1)
    assert c.acceptance() == 0.5 and c.expected_frames(3) == 1.75


def test_a_fixed_depth_measures_its_speedup(tiny, sequential):
    """A plain pass now and then gives the baseline of speedup_over_no_speculation."""
    c = DepthController(3, explore_every=4)
    depths = []
    for _ in range(8):
        depths.append(c.choose())
        c.record(depths[-1], 1.0, depths[-1] - 1)
    assert depths == [1, 3, 3, 1, 3, 3, 3, 1]
    g = generator(tiny, speculate=2, drafter=oracle(sequential))
    latent_stream(g)
    assert g.stats()["speculation"]["speedup_over_no_speculation"] > 0


def test_a_callable_drafter_returning_other_things_is_named(tiny):
    for result, error in ((None, TypeError), ([1, 2], TypeError), ([torch.zeros(1)] * 2, ValueError)):
        g = generator(tiny, speculate=3, drafter=lambda history, count, frame_index, r=result: r)
        g.step()
        g.step()  # the baseline pass
        with pytest.raises(error, match="drafter: expected"):
            g.step()


@pytest.mark.parametrize("speculate", ["auto", 4])
def test_depth_stays_within_what_the_window_can_lag(tiny, speculate):
    """depth - 1 <= window_frames: auto measures and picks among those depths only (it never waits
    for a depth it cannot run), and a deeper fixed depth runs as the deepest."""
    g = generator(tiny, cache_config=CacheConfig(1, 1, storage="fp32"), speculate=speculate, drafter="hold")
    for _ in range(8):
        g.step()
    assert g.depth.max_depth == 2 and set(g.depth.pass_s) <= {1, 2}
    assert g.stats()["speculation"]["depth"] <= 2 and 2 in g.depth.pass_s


def test_step_caps_a_speculative_pass(tiny, sequential):
    g = generator(tiny, speculate=4, drafter=oracle(sequential))
    g.step()
    g.step()  # the baseline pass
    assert g.step(max_frames=2).latents.shape[2] == 2
    with pytest.raises(ValueError, match="max_frames: expected an int >= 1 or None, got 0"):
        g.step(max_frames=0)


def test_auto_runs_and_reports(tiny, sequential):
    g = generator(tiny, speculate="auto", drafter=oracle(sequential))
    latent_stream(g, 9)
    s = g.stats()["speculation"]
    assert 1 <= s["depth"] <= 4 and s["acceptance_rate"] == 1.0 and s["speedup_over_no_speculation"] > 0


def test_bad_arguments(tiny):
    model, decoder, encoder, preset = tiny
    with pytest.raises(ValueError, match="drafter: expected"):
        StreamGenerator(model, decoder, latent_hw=preset.latent_hw, speculate=2, drafter="psychic")
    with pytest.raises(ValueError, match="speculate: drafting needs steps=1"):
        StreamGenerator(model, decoder, latent_hw=preset.latent_hw, speculate=2, steps=2)
    with pytest.raises(ValueError, match="speculate: expected"):
        StreamGenerator(model, decoder, latent_hw=preset.latent_hw, speculate=9)
    with pytest.raises(ValueError, match=f"drafter: shallow:L takes L of the model's {model.cfg.layers} blocks, "
                                         "got 'shallow:99'"):
        StreamGenerator(model, decoder, latent_hw=preset.latent_hw, speculate=2, drafter="shallow:99")
    with pytest.raises(ValueError, match="accept_tol: expected a finite relative L2 tolerance >= 0, got nan"):
        StreamGenerator(model, decoder, latent_hw=preset.latent_hw, speculate=2, accept_tol=float("nan"))


def test_a_fixed_depth_reports_its_own_speedup_even_below_one():
    """The speedup of a fixed depth is that of the depth the stream runs, not of the best measured
    one: a depth slower than plain passes reports a speedup below 1 (here 3 frames in 6 s against
    1 frame in 1 s), not 1.0."""
    c = DepthController(3)
    c.record(1, 1.0, 0)
    for _ in range(3):
        c.record(3, 6.0, 2)
    assert c.best() == 1 and c.speedup() == pytest.approx(0.5)
    assert DepthController(None).speedup() is None  # nothing measured yet


def test_the_plain_pass_after_a_speculative_one_weighs_one_page(tiny):
    """With keep_tokens, a pass accumulates attention mass on the window pages its commits may
    evict: a speculative pass on `depth` of them, the plain pass after it (one frame) on one, as in
    the plain stream, not on as many as the speculative pass last committed (which a CUDA graph
    captured then would weigh at every replay)."""
    g = generator(tiny, cache_config=CacheConfig(1, 3, 48, storage="fp32"), speculate=4, drafter="hold",
                  accept_tol=10.0)
    for _ in range(6):  # the first block, the baseline pass, then passes of 4 frames
        g.step()
    assert g._frames[-1] == 4 and g.cache.keep_count(0) == 48
    assert len(g.cache.view(0).mass_pages) == 1


@pytest.mark.parametrize("window, keep, depth", [(3, 48, 2), (8, 16, 4)])
def test_speculation_with_keep_tokens_stays_near_the_stream_without_drifting(tiny, window, keep, depth):
    """With keep_tokens the speculative stream is an approximation (the keep buffer is not
    re-merged inside a pass, and every query of the pass adds to the attention mass): over 60
    frames with every draft accepted it stays within 1e-2 of the plain stream (latents of unit
    scale; the README's figure), and its last 20 frames are no further off than twice the 40
    before them: the error does not grow with the stream."""
    config = CacheConfig(1, window, keep, storage="fp32")
    sequential = latent_stream(generator(tiny, cache_config=config), 60 + depth)
    g = generator(tiny, cache_config=config, speculate=depth, drafter=oracle(sequential))
    diff = (latent_stream(g, 60) - sequential[:, :, :60]).abs().amax(dim=(0, 1, 3, 4))
    assert g.stats()["speculation"]["acceptance_rate"] == 1.0
    assert diff.max() < 1e-2 and diff[40:].max() <= 2 * diff[:40].max()
    assert diff.max() > 0  # the keep buffer took part (without it the stream is exact: tested above)
