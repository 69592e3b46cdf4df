"""StreamGenerator.precompile: every Triton kernel a stream launches is compiled before its first
frame (in parallel), none in the middle of it, and the stream is the same with or without it."""
import dataclasses

import pytest
import torch

from triton_launches import Launches
from xjfast.backends import backend_unavailable_reason
from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.models import build
from xjfast.models.dit import CausalDiT
from xjfast.models.presets import init_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's codecs and a two-block model of its shape, on 8x8 latents (16-token
    frames): streams that the interpreter runs in seconds."""
    if (reason := backend_unavailable_reason("triton", DEVICE)) is not None:
        pytest.skip(reason)
    _, decoder, encoder, preset = build("tiny", device=DEVICE)
    model = CausalDiT(dataclasses.replace(preset.dit, layers=2)).to(DEVICE)
    init_weights(model, 0)
    return model.eval(), decoder, encoder, dataclasses.replace(preset, latent_hw=(8, 8))


@pytest.fixture
def launches(monkeypatch):
    from xjfast.kernels import temporal_attention
    return Launches(monkeypatch, type(temporal_attention.temporal_attention_kernel))


# (cache, generator options): the keep buffer, speculation with the shallow drafter (a fixed depth:
# "auto" picks by measured time, and a stream split otherwise into passes accepts other drafts),
# the CUDA-graph step's eager path; blocks of several frames, steps, partial blocks after eviction,
# 16-bit storage and attention
STREAMS = {
    "keep-speculate": (CacheConfig(1, 3, keep_tokens=8), dict(speculate=3, drafter="shallow:1", cuda_graph=True)),
    "blocks-bf16": (CacheConfig(1, 4, storage="bf16"), dict(steps=2, frames_per_block=3, precision="bf16")),
}


def generator(tiny, name, **kwargs):
    model, decoder, encoder, preset = tiny
    cache, options = STREAMS[name]
    g = StreamGenerator(model, decoder, cache, latent_hw=preset.latent_hw, text_encoder=encoder, backend="triton",
                        seed=5, **options, **kwargs)
    g.set_prompt("a lighthouse in fog")
    return g


def stream(g, passes=8):
    """Passes through the fill, evictions and, midway, a prompt switch with a transition and a recache."""
    frames = []
    for i in range(passes):
        if i == passes // 2:
            g.set_prompt("a lighthouse at noon", transition_frames=2, recache=True)
        frames.append(g.step().latents)
    return frames


def precompiled_stream(tiny, name, launches) -> list:
    """A stream after precompile(), checked to have compiled nothing of its own."""
    g = generator(tiny, name)
    result = g.precompile()
    assert set(result) == {"compiled", "seconds"} and result["seconds"] >= 0
    dry = launches.keys(compile_only=True)
    assert dry and not launches.keys(compile_only=False), "the dry run launched kernels"
    frames = stream(g)
    missed = launches.keys(compile_only=False) - dry
    assert not missed, f"compiled mid-stream: {sorted(missed)}"
    return frames


def test_after_precompile_a_stream_compiles_nothing_and_is_the_same_stream(tiny, launches):
    frames = precompiled_stream(tiny, "keep-speculate", launches)
    assert all(torch.equal(a, b) for a, b in zip(frames, stream(generator(tiny, "keep-speculate"))))
    # and each kernel compiled once per constexpr set: the scale rows a kernel reads as scalars
    # start 16-byte aligned or not with the layer and page, and counts (pages committed, cached
    # frames) cross 1 and multiples of 16 as a stream runs; specialized on, each would compile the
    # kernel again mid-stream (whatever precompile saw), for no better code
    keys = {}
    for r in launches.records:
        keys.setdefault((r.kernel, r.constexprs), set()).add(r.key)
    split = {kernel: len(k) for (kernel, _), k in keys.items() if len(k) > 1}
    assert not split, f"kernels compiled more than once for one constexpr set: {split}"


def test_precompile_covers_blocks_of_frames_steps_and_16_bit_storage(tiny, launches):
    precompiled_stream(tiny, "blocks-bf16", launches)


def test_precompile_needs_a_prompt_and_a_fresh_stream(tiny):
    model, decoder, encoder, preset = tiny
    g = StreamGenerator(model, decoder, CacheConfig(1, 2), latent_hw=preset.latent_hw, text_encoder=encoder,
                        backend="triton")
    with pytest.raises(RuntimeError, match="set_prompt"):
        g.precompile()
    g.set_prompt("rain")
    with pytest.raises(ValueError, match="threads: expected an int >= 1 or None, got 0"):
        g.precompile(threads=0)
    g.step()
    with pytest.raises(RuntimeError, match="before the stream's first frame .* at frame 1"):
        g.precompile()
    g.reset()
    assert g.precompile()["seconds"] >= 0


def test_a_precompile_that_fails_leaves_the_stream_fresh(tiny, monkeypatch):
    """A compile error surfaces from precompile(), and the cache its dry run filled is emptied."""
    from xjfast.engine import generator as module
    calls = []

    def choose(self):
        calls.append(self.depth)
        if len(calls) == 4:
            raise RuntimeError("a compile failed")
        return self.depth

    monkeypatch.setattr(module._ForcedDepth, "choose", choose)
    g = generator(tiny, "blocks-bf16")
    with pytest.raises(RuntimeError, match="a compile failed"):
        g.precompile()
    assert g.cache.frames_seen == 0 and g.cache.num_frames(0) == 0
    assert torch.equal(g.step().latents, generator(tiny, "blocks-bf16").step().latents)


def test_precompile_has_nothing_to_do_off_triton(tiny):
    model, decoder, encoder, preset = tiny
    g = StreamGenerator(model, decoder, CacheConfig(1, 2), latent_hw=preset.latent_hw, text_encoder=encoder,
                        backend="reference")
    g.set_prompt("rain")
    assert g.precompile()["compiled"] == 0 and g.step().index == 0


def test_every_launch_passes_the_compile_options(monkeypatch):
    """What runs is what the SASS checks (tests/test_sass.py, which a GPU run leaves out) compiled:
    each kernel launch of a stream (attention split in two and merged, attention mass, commit,
    compaction into the keep buffer, denoise) passes kernels/launch.py's options, whatever
    Triton's defaults (which 3.9 warns about, once)."""
    from xjfast.kernels import temporal_attention as kernels
    from xjfast.kernels.launch import COMPILE_OPTIONS

    if (reason := backend_unavailable_reason("triton", DEVICE)) is not None:
        pytest.skip(reason)
    recorded = Launches(monkeypatch, type(kernels.temporal_attention_kernel))
    monkeypatch.setenv("XJFAST_TRITON_ATTENTION_SPLITS", "2")
    model, decoder, encoder, preset = build("tiny", device=DEVICE)
    gen = StreamGenerator(model, decoder, CacheConfig(0, 1, keep_tokens=8), latent_hw=preset.latent_hw,
                          text_encoder=encoder, backend="triton", cuda_graph=False)
    gen.set_prompt("a kite over the dunes")
    for _ in range(4):  # the keep buffer fills from the second eviction on
        gen.step()
    launches = [(r.kernel, {k: r.options.get(k) for k in COMPILE_OPTIONS}) for r in recorded.records]
    assert {name for name, _ in launches} == {
        "temporal_attention_kernel", "attention_combine_kernel", "attention_mass_kernel", "kv_cache_commit_stats_kernel",
        "kv_cache_commit_kernel", "kv_cache_compact_stats_kernel", "kv_cache_compact_kernel", "denoise_step_kernel"}
    assert all(options == COMPILE_OPTIONS for _, options in launches), launches
