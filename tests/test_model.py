"""CausalDiT: shapes, causality, and streaming through the cache equal to one full pass."""
import pytest
import torch

from xjfast import StreamingKVCache
from xjfast.models import build
from xjfast.ops.denoise_step import unpatchify


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
