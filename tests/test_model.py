"""CausalDiT: shapes, causality, and streaming through the cache equal to one full pass."""
import pytest
import torch

from xjfast import StreamingKVCache
from xjfast.models import build
from xjfast.models.decoder import PreviewDecoder, TinyDecoder
from xjfast.models.rope import apply_rope_3d
from xjfast.ops.denoise_step import unpatchify
from xjfast.ops.temporal_attention import temporal_attention


@pytest.fixture(scope="module")
def tiny():
    model, _, encoder, preset = build("tiny")
    return model, preset, model.prompt_kv(encoder("a lighthouse at dusk"))


def latents(frames, preset, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, preset.dit.in_channels, frames, *preset.latent_hw, generator=g)


@torch.no_grad()
def test_output_is_the_head_token_layout(tiny):
    model, preset, kv = tiny
    x = latents(2, preset)
    out = model(x, torch.tensor([[0.0, 500.0]]), kv, block_frames=1, precision="bf16")
    assert out.shape == (1, 2 * 64, 4 * 4) and torch.isfinite(out).all()
    assert unpatchify(out, x.shape, (1, 2, 2)).shape == x.shape


def test_rotary_by_cache_slot_equals_the_model_rotary_by_frame():
    """Attention through the cache (spatial rotary here, temporal by slot in the op) equals
    attention with the model's full 3D rotary over the same frames at positions 0, 1, ...:
    for a 2-frame pass with an empty cache, with frame 0 cached, and after an eviction (the
    sink and the newest frame keep slots 0, 1 whatever their frame numbers: StreamingLLM's rule)."""
    g = torch.Generator().manual_seed(7)
    T, H, D = 64, 2, 64
    q, k, v = (torch.randn(1, 4 * T, H, D, generator=g) for _ in range(3))
    qs, ks = (apply_rope_3d(t, (4, 8, 8), temporal=False) for t in (q, k))  # spatial only, as cached

    def frames(t, *ids):
        return torch.cat([t[:, i * T:(i + 1) * T] for i in ids], dim=1)

    def full(*ids):  # the model's path without a cache: frames at positions 0..n-1, block-causal
        qf, kf = (apply_rope_3d(frames(t, *ids), (len(ids), 8, 8)) for t in (q, k))
        # (every frame's spatial rotary is the same, so qs/ks above are these frames' spatial part)
        return temporal_attention(qf, kf, frames(v, *ids), block_tokens=T, precision="bf16")

    def cache(sink, window):
        return StreamingKVCache(1, 1, H, D, T, sink_frames=sink, window_frames=window, storage="fp32")

    empty = cache(1, 4)
    out = temporal_attention(frames(qs, 0, 1), frames(ks, 0, 1), frames(v, 0, 1), block_tokens=T, kv_cache=empty,
                             layer=0, precision="bf16")
    torch.testing.assert_close(out, full(0, 1), atol=1e-5, rtol=1e-5)

    one = cache(1, 4)
    one.commit(0, frames(ks, 0), frames(v, 0))
    out = temporal_attention(frames(qs, 1), frames(ks, 1), frames(v, 1), kv_cache=one, layer=0, precision="bf16")
    torch.testing.assert_close(out, full(0, 1)[:, T:], atol=1e-5, rtol=1e-5)

    evicted = cache(1, 1)  # frames 0 (sink), 1 (evicted by 2), 2
    for f in range(3):
        evicted.commit(0, frames(ks, f), frames(v, f))
    out = temporal_attention(frames(qs, 3), frames(ks, 3), frames(v, 3), kv_cache=evicted, layer=0, precision="bf16")
    torch.testing.assert_close(out, full(0, 2, 3)[:, 2 * T:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_block_causal_pass(tiny):
    """Block 0's output does not depend on block 1; block 1's does depend on block 0."""
    model, preset, kv = tiny
    x = latents(2, preset)
    y = x.clone()
    y[:, :, 1] = torch.randn_like(y[:, :, 1])
    t = torch.tensor([[0.0, 700.0]])
    a = model(x, t, kv, block_frames=1, precision="bf16")
    b = model(y, t, kv, block_frames=1, precision="bf16")
    assert torch.allclose(a[:, :64], b[:, :64], atol=1e-5)
    z = x.clone()
    z[:, :, 0] += 1.0
    assert not torch.allclose(model(z, t, kv, block_frames=1, precision="bf16")[:, 64:], a[:, 64:], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_streaming_through_the_cache_equals_one_full_pass(tiny, frames_per_block):
    """Frames fed one block at a time, each committing its K/V, give what one block-causal pass
    over all frames gives: the cache's slot rotary reproduces the model's frame positions."""
    model, preset, kv = tiny
    blocks = 3
    x = latents(blocks * frames_per_block, preset, seed=1)
    t = torch.full((1, blocks), 250.0)
    full = model(x, t, kv, block_frames=frames_per_block, precision="bf16")
    cfg = preset.dit
    cache = StreamingKVCache(cfg.layers, 1, cfg.heads, cfg.head_dim, 64, sink_frames=1, window_frames=8,
                             storage="fp32")
    per_block = frames_per_block * 64
    for i in range(blocks):
        block = x[:, :, i * frames_per_block:(i + 1) * frames_per_block]
        out = model(block, t[:, :1], kv, cache=cache, commit_frames=frames_per_block,
                    block_frames=frames_per_block, precision="bf16")
        assert torch.allclose(out, full[:, i * per_block:(i + 1) * per_block], atol=2e-4), i
    assert cache.frames_seen == blocks * frames_per_block


@torch.no_grad()
def test_fp8_stream_stays_close_to_bf16(tiny):
    model, preset, kv = tiny
    x = latents(2, preset, seed=2)
    t = torch.tensor([[0.0, 600.0]])
    exact = model(x, t, kv, block_frames=1, precision="bf16")
    fp8 = model(x, t, kv, block_frames=1, precision="fp8")
    assert ((fp8 - exact).norm() / exact.norm()) < 0.05


def test_timesteps_shape_is_checked(tiny):
    model, preset, kv = tiny
    with pytest.raises(ValueError, match=r"timesteps: expected shape \[1, 2\]"):
        model(latents(2, preset), torch.zeros(1, 1), kv, block_frames=1)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset: expected one of"):
        build("wan2.2-14b")


def test_wan_preset_is_wan21_1_3b_shaped():
    """Checked on the config (the weights are 1.3B parameters: built on GPUs, not in CPU tests)."""
    from xjfast.models import PRESETS, CausalDiT
    p = PRESETS["wan2.1-1.3b"]
    c = p.dit
    assert (c.layers, c.dim, c.heads, c.head_dim, c.ffn_dim, c.in_channels, c.text_dim, c.freq_dim) == \
        (30, 1536, 12, 128, 8960, 16, 4096, 256)
    assert p.latent_hw == (60, 104)  # 480x832 video
    with torch.device("meta"):
        model = CausalDiT(c)
    assert model.tokens_per_frame(p.latent_hw) == 1560
    assert 1.2e9 < sum(t.numel() for t in model.parameters()) < 1.5e9


def test_preview_decoder_maps_latents_linearly_and_blends_4_frames():
    decoder = PreviewDecoder(16)
    z = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.5
    latents = z.view(1, 16, 1, 1, 1).expand(1, 16, 1, 4, 6)
    video = decoder(latents)  # a constant latent: a constant colour, (factors . z + bias + 1) / 2
    rgb = (z @ decoder.factors + decoder.bias + 1) * 127.5
    assert video.shape == (4, 32, 48, 3) and video.dtype == torch.uint8
    assert (video.float() - rgb.clamp(0, 255).round()).abs().max() <= 1
    previous = torch.zeros(1, 16, 4, 6)  # frames 1..4 of the block move from the previous latent to this one
    blended = decoder(latents, previous).float().mean(dim=(1, 2))
    black = decoder(previous[:, :, None]).float().mean(dim=(0, 1, 2))
    for i, w in enumerate((0.25, 0.5, 0.75, 1.0)):
        assert torch.allclose(blended[i], black + w * (rgb.clamp(0, 255) - black), atol=1.5)
    tiny_video = TinyDecoder(4)(torch.randn(1, 4, 3, 16, 16), torch.randn(1, 4, 16, 16))
    assert tiny_video.shape == (12, 128, 128, 3)


@pytest.mark.parametrize("seed", [-1, 2 ** 64, True, 1.5])
def test_bad_weight_seed_is_named(seed):
    """Not torch.Generator's "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\^64\)"):
        build("tiny", seed=seed)
