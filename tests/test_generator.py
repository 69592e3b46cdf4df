"""StreamGenerator: determinism by seed, stats, constant memory, multi-step and multi-frame blocks."""
import pytest
import torch

from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.models import build


@pytest.fixture(scope="module")
def tiny():
    model, decoder, encoder, preset = build("tiny")
    return model, decoder, encoder, preset


def generator(tiny, **kwargs):
    model, decoder, encoder, preset = tiny
    options = dict(cache_config=CacheConfig(1, 3), latent_hw=preset.latent_hw, text_encoder=encoder)
    options.update(kwargs)
    g = StreamGenerator(model, decoder, **options)
    g.set_prompt("waves breaking on black sand")
    return g


def stream(g, blocks):
    return [g.step() for _ in range(blocks)]


def test_same_seed_same_stream_other_seed_other_stream(tiny):
    a = stream(generator(tiny, seed=3), 4)
    b = stream(generator(tiny, seed=3), 4)
    c = stream(generator(tiny, seed=4), 4)
    assert all(torch.equal(x.latents, y.latents) and torch.equal(x.video, y.video) for x, y in zip(a, b))
    assert not torch.equal(a[0].latents, c[0].latents)


def test_reset_replays_the_stream(tiny):
    g = generator(tiny, seed=9)
    first = stream(g, 3)
    g.reset()
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(first, stream(g, 3)))


def test_frames_and_stats(tiny):
    g = generator(tiny)
    frames = stream(g, 6)
    assert [f.index for f in frames] == list(range(6))
    assert frames[0].video.shape == (4, 128, 128, 3) and frames[0].video.dtype == torch.uint8
    s = g.stats()
    assert s["video_frames"] == 24 and s["latent_frames"] == 6 and len(s["block_latency_ms"]) == 6 == s["passes"]
    assert s["model_fps"] > 0 and s["end_to_end_fps"] <= s["model_fps"]
    assert 0 < s["interval_p50_ms"] <= s["interval_p99_ms"] and s["time_to_first_frame_ms"] > 0


def test_stats_keep_a_bounded_history_and_whole_stream_totals(tiny, monkeypatch):
    """However long the stream, the generator keeps the newest HISTORY passes' figures (memory and
    stats()'s cost stay flat: a list per pass grew by 11 MB and 300 ms per call over 100k passes);
    counts, rates and the first frame still cover the whole stream."""
    from xjfast.engine import generator as module
    monkeypatch.setattr(module, "HISTORY", 4)
    g = generator(tiny)
    g.step()
    first = g.stats()["time_to_first_frame_ms"]
    g.set_prompt("a city street at night", transition_frames=2)
    for _ in range(9):
        g.step()
    s = g.stats()
    assert s["passes"] == 10 and s["latent_frames"] == 10 and s["video_frames"] == 40
    assert s["time_to_first_frame_ms"] == first > 0 and s["switch_frames"] == 2
    assert len(s["block_latency_ms"]) == len(s["block_model_ms"]) == 4 == len(g.conditioning_weights)
    assert s["interval_p50_ms"] > 0 and s["interval_p99_ms"] >= s["interval_p50_ms"]
    assert 0 < s["model_fps"] and 0 < s["end_to_end_fps"] <= s["model_fps"]


def test_a_frame_that_comes_out_non_finite_is_counted_and_warned_once(tiny):
    """A NaN frame poisons every later one through the cache: the stream says which frame was the
    first, counts them and warns once; reset() starts a healthy stream again. A healthy stream says
    nothing."""
    import warnings
    model = build("tiny")[0]
    g = generator((model,) + tiny[1:], frames_per_block=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stream(g, 2)
        assert g.stats()["nonfinite_frames"] == 0 and g.stats()["first_nonfinite_frame"] is None
        poison = model.register_forward_hook(lambda module, args, out: out * float("nan"))
        with pytest.warns(RuntimeWarning, match="latent frame 4 came out non-finite") as caught:
            g.step()
        assert caught[0].filename == __file__  # points at the caller's step()
        poison.remove()
        assert g.step().latents.isnan().all()  # the cache holds frames 4 and 5: no second warning
        assert g.stats()["first_nonfinite_frame"] == 4 and g.stats()["nonfinite_frames"] == 4
        g.reset()
        assert all(f.latents.isfinite().all() for f in stream(g, 3))
        assert g.stats()["nonfinite_frames"] == 0 and g.stats()["first_nonfinite_frame"] is None


def test_what_the_caller_does_to_a_frame_does_not_reach_the_stream(tiny):
    """Frame.latents is the caller's: writing into it leaves the next frames as they were (the
    eager step read it as the clean block to commit; the captured step had its own copy)."""
    plain, touched = generator(tiny, seed=5), generator(tiny, seed=5)
    expected = [plain.step().latents for _ in range(3)]
    touched.step().latents.zero_()
    assert all(torch.equal(touched.step().latents, e) for e in expected[1:])


def test_a_numpy_tolerance_is_a_tolerance(tiny):
    import numpy as np
    assert generator(tiny, accept_tol=np.float32(0.1)).accept_tol == pytest.approx(0.1)


def test_cache_memory_constant_once_the_window_is_full(tiny):
    g = generator(tiny, cache_config=CacheConfig(1, 2, keep_tokens=16))
    sizes = []
    for _ in range(8):
        g.step()
        sizes.append(g.stats()["cache_bytes"])
    assert len(set(sizes)) == 1 and g.cache.num_frames(0) == 3 and g.cache.frames_seen == 7


@pytest.mark.parametrize("steps, frames_per_block", [(2, 1), (1, 3), (4, 2)])
def test_steps_and_blocks(tiny, steps, frames_per_block):
    g = generator(tiny, steps=steps, frames_per_block=frames_per_block)
    frames = stream(g, 2)
    assert frames[1].index == frames_per_block
    assert frames[1].latents.shape == (1, 4, frames_per_block, 16, 16)
    assert frames[1].video.shape[0] == 4 * frames_per_block
    assert torch.isfinite(frames[1].latents).all()


def test_prompt_is_required_and_checked(tiny):
    model, decoder, encoder, preset = tiny
    g = StreamGenerator(model, decoder, latent_hw=preset.latent_hw, text_encoder=encoder)
    with pytest.raises(RuntimeError, match="set_prompt"):
        g.step()
    with pytest.raises(ValueError, match="prompt: expected embeddings"):
        g.set_prompt(torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"with B = 1 or the stream's batch 1, got shape \(3, 4, 64\)"):
        g.set_prompt(torch.zeros(3, 4, model.cfg.text_dim))
    with pytest.raises(TypeError, match="decoder: expected a module turning latents into video frames, got NoneType"):
        StreamGenerator(model, None, latent_hw=preset.latent_hw)
    with pytest.raises(ValueError, match="steps: expected an int in"):
        StreamGenerator(model, decoder, steps=5, latent_hw=preset.latent_hw)


@pytest.mark.parametrize("kwargs, words", [
    (dict(latent_hw=(15, 16)), r"latent_hw: expected \(height, width\) in latent pixels, positive multiples of the "
                               r"model's patch \(2, 2\), got \(15, 16\)"),
    (dict(latent_hw=(16,)), "latent_hw: expected"),
    (dict(latent_hw="ab"), "latent_hw: expected"),
    (dict(shift=0.0), "shift: expected a positive finite number, got 0.0"),
    (dict(shift=float("nan")), "shift: expected a positive finite number, got nan"),
    (dict(precision="int4"), "precision: expected one of 'fp8', 'bf16', got 'int4'"),
    # a bool is no count (True would run as 1), nor a number a bool
    (dict(frames_per_block=True), "frames_per_block: expected an int >= 1, got True"),
    (dict(steps=True), r"steps: expected an int in \[1, 4\], got True"),
    (dict(speculate=True), r"speculate: expected 'auto' or a depth in \[0, 4\], got True"),
    (dict(cuda_graph=1), "cuda_graph: expected True, False or None"),
])
def test_bad_settings_name_the_argument(tiny, kwargs, words):
    model, decoder, encoder, preset = tiny
    with pytest.raises(ValueError, match=words):
        StreamGenerator(model, decoder, **dict(dict(latent_hw=preset.latent_hw), **kwargs))


@pytest.mark.parametrize("kwargs, words", [
    (dict(cache_config={"window_frames": 3}), "cache_config: expected a CacheConfig, got dict"),
    (dict(cache_config=None), "cache_config: expected a CacheConfig, got NoneType"),
    (dict(text_encoder="utf-8"), "text_encoder: expected None or a module turning a prompt into text embeddings, got str"),
])
def test_bad_components_name_the_argument(tiny, kwargs, words):
    """Named at construction, not an AttributeError there or a "not callable" at the first set_prompt."""
    model, decoder, encoder, preset = tiny
    with pytest.raises(TypeError, match=words):
        StreamGenerator(model, decoder, **dict(dict(latent_hw=preset.latent_hw), **kwargs))
    with pytest.raises(TypeError, match="model: expected a CausalDiT"):
        StreamGenerator(torch.nn.Linear(2, 2), decoder)
    # what torch.compile returns wraps the model (its attributes reach through): accepted
    StreamGenerator(torch.compile(model, backend="eager"), decoder, latent_hw=preset.latent_hw)


@pytest.mark.parametrize("prompt, error, words", [
    (torch.zeros(0, 64), ValueError, r"prompt: expected embeddings \[S, 64\] .*\(S >= 1\).*got shape \(0, 64\)"),
    (torch.zeros(1, 0, 64), ValueError, r"prompt: expected embeddings .*got shape \(1, 0, 64\)"),
    (torch.zeros(4, 64, dtype=torch.complex64), TypeError, "prompt: expected floating-point embeddings, got dtype "
                                                           "torch.complex64"),
    (torch.full((4, 64), float("nan")), ValueError, "prompt: expected finite values, got NaN or Inf"),
    (torch.zeros(4, 64, device="meta"), ValueError, "prompt: expected embeddings with values"),
])
def test_bad_embeddings_are_named(tiny, prompt, error, words):
    """Not a reshape error inside the model, an imaginary part dropped, or a stream of NaN frames."""
    g = generator(tiny)
    with pytest.raises(error, match=words):
        g.set_prompt(prompt)
