"""Prompt switching: blended conditioning over N frames, KV recache, no jump cut."""
import pytest
import torch

from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.engine.speculation import relative_l2
from xjfast.models import build


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


def generator(tiny, **kwargs):
    model, decoder, encoder, preset = tiny
    options = dict(cache_config=CacheConfig(1, 4), latent_hw=preset.latent_hw, text_encoder=encoder, seed=2)
    options.update(kwargs)
    g = StreamGenerator(model, decoder, **options)
    g.set_prompt("a quiet forest at dawn")
    return g


def test_conditioning_moves_monotonically_over_exactly_n_frames(tiny):
    g = generator(tiny)
    for _ in range(3):
        g.step()
    g.set_prompt("a city street at night", transition_frames=4)
    for _ in range(6):
        g.step()
    assert list(g.conditioning_weights) == [1.0] * 3 + [0.25, 0.5, 0.75, 1.0] + [1.0] * 2
    s = g.stats()
    assert s["switch_frames"] == 4 and s["switch_latency_p50_ms"] > 0


def test_blended_conditioning_is_the_mix_of_the_two_prompts(tiny):
    g = generator(tiny)
    g.step()
    old = g._embeds
    g.set_prompt("a city street at night", transition_frames=2)
    new = g._embeds
    g.step()
    expected = g.model.prompt_kv(old * 0.5 + new * 0.5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(g.prompt_kv, expected))


def test_no_jump_cut(tiny):
    """The largest frame-to-frame latent change during the switch stays within the stream's
    steady-state range (reported, and held to 1.5x the steady maximum)."""
    g = generator(tiny)
    frames = [g.step().latents for _ in range(6)]
    g.set_prompt("a city street at night", transition_frames=4, recache=True)
    frames += [g.step().latents for _ in range(6)]
    changes = [relative_l2(b, a) for a, b in zip(frames, frames[1:])]
    steady, switch = max(changes[:5]), max(changes[5:10])
    print(f"frame-to-frame relative change: steady max {steady:.3f}, during the switch max {switch:.3f}")
    assert switch <= 1.5 * steady


def test_recache_keeps_geometry_and_memory_and_changes_the_cache(tiny):
    g = generator(tiny)
    for _ in range(7):
        g.step()
    size, frames, seen = g.cache.memory_bytes(), g.cache.cached_frames(0), g.cache.frames_seen
    page = g.cache.view(0).page_table[1].item()
    before = g.cache.k_mean[2, page].clone()
    g.set_prompt("a city street at night", recache=True)
    assert g.cache.memory_bytes() == size and g.cache.cached_frames(0) == frames and g.cache.frames_seen == seen
    assert not torch.equal(g.cache.k_mean[2, page], before)  # deeper layers see the new prompt
    g.step()


def test_recache_under_the_same_prompt_reproduces_the_cache(tiny):
    g = generator(tiny, precision="bf16", cache_config=CacheConfig(1, 8, storage="fp32"), backend="reference")
    for _ in range(4):
        g.step()
    means = g.cache.k_mean.clone()
    g.set_prompt("a quiet forest at dawn", recache=True)
    assert (g.cache.k_mean - means).abs().max() < 1e-4


@pytest.mark.parametrize("sink", [1, 2])
def test_recache_encodes_the_frames_of_a_block_together_as_the_stream_did(tiny, sink):
    """frames_per_block=2: a committed block's frames saw each other when the stream encoded them;
    recache encodes them so again where the cached frames are whole blocks (frame by frame where
    eviction left part of one), so under the same prompt it reproduces the cache."""
    g = generator(tiny, precision="bf16", cache_config=CacheConfig(sink, 8, storage="fp32"), backend="reference",
                  frames_per_block=2)
    for _ in range(3):
        g.step()
    assert g.cache.cached_frames(0) == [0, 1, 2, 3]
    means = g.cache.k_mean.clone()
    g.set_prompt("a quiet forest at dawn", recache=True)
    assert (g.cache.k_mean - means).abs().max() < 1e-4


def test_transition_counts_latent_frames_in_blocks_of_several(tiny):
    g = generator(tiny, frames_per_block=2)
    g.step()
    g.set_prompt("a city street at night", transition_frames=4)
    for _ in range(3):
        g.step()
    assert list(g.conditioning_weights) == [1.0, 0.5, 1.0, 1.0]  # a block takes its last frame's weight
    assert g.stats()["switch_frames"] == 2


def test_a_cut_counts_as_a_switch_and_recache_is_timed(tiny):
    g = generator(tiny)
    for _ in range(3):
        g.step()
    g.set_prompt("a city street at night", recache=True)
    g.step()
    g.step()
    s = g.stats()
    assert s["switch_frames"] == 1 and len(s["recache_ms"]) == 1 and s["recache_ms"][0] > 0


def test_recache_with_blocks_of_three_frames(tiny):
    """The previous block (not committed yet) is kept for the drafters and for recache."""
    g = generator(tiny, frames_per_block=3, cache_config=CacheConfig(1, 6))
    for _ in range(4):
        g.step()
    frames = g.cache.cached_frames(0)
    g.set_prompt("a city street at night", recache=True)
    assert g.cache.cached_frames(0) == frames
    g.step()


def test_reset_during_a_transition_starts_on_the_new_prompt(tiny):
    g = generator(tiny)
    g.step()
    g.set_prompt("a city street at night", transition_frames=4)
    g.step()
    g.reset()
    fresh = generator(tiny)
    fresh.set_prompt("a city street at night")
    assert all(torch.equal(a, b) for a, b in zip(g.prompt_kv[0], fresh.prompt_kv[0]))
    # computed without autograd, as every other prompt K/V (no graph of the text projection kept)
    assert not any(t.requires_grad for kv in g.prompt_kv for t in kv)
    assert torch.equal(g.step().latents, fresh.step().latents)


def test_bad_transition(tiny):
    g = generator(tiny)
    with pytest.raises(ValueError, match=r"prompt: a transition blends embeddings of the current prompt's shape"):
        g.set_prompt(torch.randn(3, g.model.cfg.text_dim), transition_frames=2)
    with pytest.raises(ValueError, match="transition_frames: expected an int >= 0"):
        g.set_prompt("x", transition_frames=-1)
    with pytest.raises(TypeError, match="recache: expected True or False, got 'yes'"):
        g.set_prompt("x", recache="yes")


@pytest.mark.parametrize("frames_per_block", [1, 3])
def test_a_cut_after_the_first_block_counts_as_a_switch(tiny, frames_per_block):
    """The first pass commits nothing (the cache is still empty), yet its frames are out: a cut
    after it is a switch like any later one."""
    g = generator(tiny, frames_per_block=frames_per_block)
    g.step()
    g.set_prompt("a city street at night")
    g.step()
    assert g.stats()["switch_frames"] == 1
    g.step()
    assert g.stats()["switch_frames"] == 1


def test_a_transition_blends_the_embeddings_given_not_what_their_buffer_holds_later(tiny):
    """The caller may reuse its embeddings buffer for the next prompt: the generator keeps a copy,
    so the transition still starts from the old prompt (no cut)."""
    g = generator(tiny)
    encode = g.text_encoder
    buffer = encode("a quiet forest at dawn").clone()
    g.set_prompt(buffer)
    g.step()
    buffer.copy_(encode("a city street at night"))
    g.set_prompt(buffer, transition_frames=2)
    g.step()
    expected = g.model.prompt_kv(encode("a quiet forest at dawn") * 0.5 + encode("a city street at night") * 0.5)
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(g.prompt_kv, expected))
