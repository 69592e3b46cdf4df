"""The steady-state step that StreamGenerator captures in a CUDA graph: it makes the same stream as
the plain passes, it does nothing that depends on the host (so capture cannot break unnoticed),
and on a GPU the replayed stream equals the eager one."""
import dataclasses
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from xjfast.backends import backend_unavailable_reason
from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.models import build
from xjfast.models.decoder import PreviewDecoder
from xjfast.models.dit import CausalDiT
from xjfast.models.presets import PRESETS, init_weights

from backends import DEVICE, fast_backends

PROMPT, OTHER = "waves breaking on black sand", "a paper boat on a rainy street"


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


def generator(tiny, cuda_graph, **kwargs):
    model, decoder, encoder, preset = tiny
    options = dict(cache_config=CacheConfig(1, 3), latent_hw=preset.latent_hw, text_encoder=encoder,
                   backend="reference", seed=5)
    options.update(kwargs)
    g = StreamGenerator(model, decoder, cuda_graph=cuda_graph, **options)
    g.set_prompt(PROMPT)
    return g


def assert_same_stream(a, b):
    for x, y in zip(a, b):
        assert x.index == y.index
        assert torch.equal(x.latents, y.latents), f"frame {x.index}: max |diff| " \
            f"{(x.latents.float() - y.latents.float()).abs().max().item()}"
        assert torch.equal(x.video, y.video)


@pytest.mark.parametrize("steps, frames_per_block, keep_tokens", [(1, 1, 0), (2, 2, 0), (1, 1, 48)])
def test_static_step_makes_the_plain_stream(tiny, steps, frames_per_block, keep_tokens):
    """The static step (the code a CUDA graph captures, run eagerly here) against the plain passes,
    over more frames than sinks + window, so the device ring wraps several times; with a keep
    buffer (48 of each evicted frame's 64 tokens fill it at the first eviction), the evicted
    pages are compacted from device indices."""
    options = dict(steps=steps, frames_per_block=frames_per_block, cache_config=CacheConfig(1, 3, keep_tokens))
    static, plain = generator(tiny, True, **options), generator(tiny, False, **options)
    blocks = 12 // frames_per_block
    assert_same_stream([static.step() for _ in range(blocks)], [plain.step() for _ in range(blocks)])
    assert static.cache.cached_frames(0) == plain.cache.cached_frames(0)
    assert static.cache.frames_seen == plain.cache.frames_seen == 12 - frames_per_block
    if keep_tokens:
        assert torch.equal(static.cache.keep_k.float(), plain.cache.keep_k.float())
        assert static.cache.keep_count(0) == keep_tokens
    s = static.stats()["cuda_graph"]
    # after the first block, the cache's warm-up (and the keep buffer's: the first eviction)
    steady = blocks - 1 - -(-4 // frames_per_block) - (1 if keep_tokens else 0)
    assert s["static_steps_eager"] == steady and s["replayed_frames"] == 0 and not s["in_use"]
    assert s["fallback"].startswith("not a CUDA device")
    assert plain.stats()["cuda_graph"]["fallback"] == "cuda_graph=False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, test_graph_stream_equals_eager_stream_tiny "
                    "captures this step in a CUDA graph on the CUDA kernels")
@pytest.mark.parametrize("backend", [b for b in fast_backends("temporal_attention") if b.values[0] == "cuda"])
def test_static_step_on_the_cuda_kernels_makes_their_plain_stream(tiny, backend):
    """Every op of the stream on the CUDA kernels (xjfast._C's CPU build): the static step (commits
    into the device ring, compaction of the evicted pages into the keep buffer from device indices,
    attention through the device page table on the default core, wgmma) makes the plain passes'
    stream exactly, and that stream is the reference's within FP8's rounding."""
    options = dict(cache_config=CacheConfig(1, 3, 48))
    static, plain = (generator(tiny, flag, backend=backend, **options) for flag in (True, False))
    reference = generator(tiny, False, **options)
    ours = [static.step() for _ in range(12)]
    assert_same_stream(ours, [plain.step() for _ in range(12)])
    assert static.stats()["cuda_graph"]["static_steps_eager"] > 0 and static.cache.keep_count(0) == 48
    for frame, ref in zip(ours, (reference.step() for _ in range(12))):
        assert (frame.latents - ref.latents).norm() <= 1e-2 * ref.latents.norm(), f"frame {frame.index}"


def test_static_step_follows_prompt_switches_transitions_and_resets(tiny):
    """The prompt's K/V are static buffers that a switch or each transition frame copies into."""
    static, plain = generator(tiny, True), generator(tiny, False)
    frames = ([], [])
    for i in range(16):
        for g, out in zip((static, plain), frames):
            if i == 6:
                g.set_prompt(OTHER, transition_frames=3)
            if i == 11:
                g.set_prompt(PROMPT)
            if i == 13:
                g.reset()
            out.append(g.step())
    assert_same_stream(*frames)
    assert static.stats()["cuda_graph"]["static_steps_eager"] == 8


class HostDependence(TorchDispatchMode):
    """Fails on what a captured CUDA graph cannot hold: a read of a device value by the host
    (.item(), bool(), data-dependent output shapes) and tensors built from Python data."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default,
                 torch.ops.aten.lift_fresh_copy.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        host = (func in self.FORBIDDEN or torch.Tag.data_dependent_output in func.tags
                or torch.Tag.dynamic_output_shape in func.tags)
        if host and not _in_triton_interpreter():
            raise AssertionError(f"{func} in the captured step:\n{''.join(traceback.format_stack(limit=12))}")
        return func(*args, **(kwargs or {}))


class HostTransfer(TorchFunctionMode):
    """Fails on Python-level reads of tensors by the host (tolist, numpy, .cpu(), int(t), ...) and on
    .to() another device."""

    FORBIDDEN = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        moved = name == "to" and isinstance(args[0], torch.Tensor) and any(
            isinstance(a, (str, torch.device)) and torch.device(a).type != args[0].device.type
            for a in list(args[1:]) + list((kwargs or {}).values()))
        if (name in self.FORBIDDEN or moved) and not _in_triton_interpreter():
            raise AssertionError(f"Tensor.{name} in the captured step:\n{''.join(traceback.format_stack(limit=12))}")
        return func(*args, **(kwargs or {}))


def _in_triton_interpreter() -> bool:
    """Triton's CPU interpreter copies kernel arguments to the host by design; a GPU launch does not."""
    return any("/triton/" in frame.filename for frame in traceback.extract_stack())


def steady_generator(tiny, backend, keep_tokens=0):
    g = generator(tiny, True, cache_config=CacheConfig(0, 2, keep_tokens), backend=backend)
    while g.cache.ring_unready(1) is not None or g._previous is None:
        g.step()
    g.step()  # one static step (the warm-up a capture follows)
    assert g.stats()["cuda_graph"]["static_steps_eager"] + g.stats()["cuda_graph"]["replayed_frames"] >= 1
    return g


@pytest.mark.parametrize("keep_tokens", [0, 48])
def test_the_captured_step_never_depends_on_the_host(tiny, keep_tokens):
    """The function StreamGenerator captures, with the kernels a GPU runs (Triton, interpreted here),
    under modes that fail on host reads, host data and device transfers: a change that would break
    the capture (an .item(), a torch.tensor([...]) per pass, a .tolist() of a page table) fails here.
    With a keep buffer: the compaction of the evicted page and the attention mass too."""
    on_gpu = DEVICE.type == "cuda"  # there the tiny preset in bf16 on the GPU, whose kernels auto picks
    if not on_gpu and (reason := backend_unavailable_reason("triton", DEVICE)) is not None:
        pytest.skip(reason)
    g = steady_generator(build("tiny", device=DEVICE, dtype=torch.bfloat16) if on_gpu else tiny,
                         "auto" if on_gpu else "triton", keep_tokens)
    ring, frame = g.cache.ring_head.clone(), g._static.frame.clone()
    with HostDependence(), HostTransfer():
        g._static._step()
    assert int(g._static.frame) == int(frame) + 1  # the step advanced its device state itself
    assert not torch.equal(g.cache.ring_head, ring)


def test_the_detector_catches_host_dependence(tiny):
    """The modes above are not vacuous: each kind of host dependence they exist for trips them."""
    x = torch.randn(4)
    for bad in (lambda: x.sum().item(), lambda: torch.tensor([1, 2]), lambda: bool(x[0] > 0), lambda: x.nonzero(),
                lambda: x.tolist(), lambda: x.to("meta")):
        with pytest.raises(AssertionError, match="in the captured step"):
            with HostDependence(), HostTransfer():
                bad()


def test_cuda_graph_argument_is_checked(tiny):
    with pytest.raises(ValueError, match="cuda_graph: expected True, False or None"):
        generator(tiny, "yes")
    assert generator(tiny, None).stats()["cuda_graph"]["requested"] is False  # a CPU model: no graph by default


# ---- GPU: the captured graph, replayed --------------------------------------------------------

def gpu_generator(model, decoder, latent_hw, cuda_graph, encoder=None, keep_tokens=0, **kwargs):
    g = StreamGenerator(model, decoder, CacheConfig(1, 3, keep_tokens), latent_hw=latent_hw, text_encoder=encoder,
                        cuda_graph=cuda_graph, seed=7, **kwargs)
    g.set_prompt(PROMPT if encoder is not None else
                 torch.randn(16, model.cfg.text_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE,
                                                                                                  torch.bfloat16))
    return g


def assert_graph_stream_equals_eager(model, decoder, latent_hw, encoder=None, frames=12, keep_tokens=0, **kwargs):
    graph = gpu_generator(model, decoder, latent_hw, True, encoder, keep_tokens, **kwargs)
    eager = gpu_generator(model, decoder, latent_hw, False, encoder, keep_tokens, **kwargs)
    assert_same_stream([graph.step() for _ in range(frames)], [eager.step() for _ in range(frames)])
    s = graph.stats()["cuda_graph"]
    assert s["in_use"] and s["captures"] == 1 and s["fallback"] is None, s
    # first block, cache warm-up (and the keep buffer's: one eviction fills it here), eager warm-up
    assert s["replayed_frames"] == frames - 1 - 4 - (1 if keep_tokens else 0) - 2
    assert graph.cache.cached_frames(0) == eager.cache.cached_frames(0) and graph.cache.frames_seen == frames - 1


def skip_unless_every_op_runs_on(backend):
    """A whole stream on `backend`: skipped where one of its ops cannot run here (e.g. left out by
    gpu_check.sh's first launches, XJFAST_DISABLE), which an explicit request would raise for."""
    from xjfast.backends import registered_ops, unusable_reason
    reasons = [reason for op in registered_ops() if (reason := unusable_reason(op, backend, DEVICE))]
    if reasons:
        pytest.skip(reasons[0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("keep_tokens", [0, 48])
def test_graph_stream_equals_eager_stream_tiny(keep_tokens, backend):
    skip_unless_every_op_runs_on(backend)
    model, decoder, encoder, preset = build("tiny", device=DEVICE, dtype=torch.bfloat16)
    assert_graph_stream_equals_eager(model, decoder, preset.latent_hw, encoder, frames=3 * 4, keep_tokens=keep_tokens,
                                     backend=backend)


@pytest.mark.gpu
def test_graph_replays_through_a_prompt_transition():
    model, decoder, encoder, preset = build("tiny", device=DEVICE, dtype=torch.bfloat16)
    graph, eager = (gpu_generator(model, decoder, preset.latent_hw, flag, encoder) for flag in (None, False))
    assert graph.stats()["cuda_graph"]["requested"]  # None: a GPU model's default
    frames = ([], [])
    for i in range(14):
        for g, out in zip((graph, eager), frames):
            if i == 8:
                g.set_prompt(OTHER, transition_frames=3)
            out.append(g.step())
    assert_same_stream(*frames)
    assert graph.stats()["cuda_graph"]["captures"] == 1 and graph.stats()["cuda_graph"]["in_use"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graph_stream_equals_eager_stream_wan_shaped(backend):
    """Wan2.1-1.3B's block (dim 1536, 12 heads x 128, FFN 8960) and frame (1560 tokens), 2 blocks."""
    skip_unless_every_op_runs_on(backend)
    cfg = dataclasses.replace(PRESETS["wan2.1-1.3b"].dit, layers=2)
    with torch.device("meta"):
        model = CausalDiT(cfg)
    model = model.to_empty(device=DEVICE).to(torch.bfloat16)
    init_weights(model, 0)
    assert_graph_stream_equals_eager(model.eval(), PreviewDecoder(cfg.in_channels).to(DEVICE), (60, 104),
                                     backend=backend)


@pytest.mark.gpu
def test_reference_backend_on_a_gpu_is_not_captured_and_says_why():
    model, decoder, encoder, preset = build("tiny", device=DEVICE, dtype=torch.bfloat16)
    g = gpu_generator(model, decoder, preset.latent_hw, True, encoder, backend="reference", precision="bf16")
    for _ in range(8):
        g.step()
    s = g.stats()["cuda_graph"]
    assert not s["in_use"] and s["captures"] == 0 and "reference implementation" in s["fallback"]


def _compiled_triton_variants() -> int:
    """Kernels Triton has compiled so far for xjfast's kernels (every specialization, every device)."""
    import importlib

    from triton.runtime.jit import JITFunction
    total = 0
    for module in ("denoise_step", "kv_cache_commit", "kv_cache_compact", "temporal_attention"):
        for fn in vars(importlib.import_module(f"xjfast.kernels.{module}")).values():
            if isinstance(fn, JITFunction):
                total += sum(len(cache[0]) for cache in fn.device_caches.values())
    return total


@pytest.mark.gpu
def test_a_stream_compiles_nothing_once_its_cache_and_keep_buffer_are_full():
    """Triton's launcher compiles an integer argument equal to 1, or divisible by 16, as a variant
    of its own: counters that move in a stream (frame index, cache and keep fill) must not, or a
    frame mid-stream waits seconds for a compile; and seed 0's re-noise after step 1 is keyed 1
    (step_seed(0, 1)), which as a constant broke the denoise kernel's compile."""
    skip_unless_every_op_runs_on("triton")
    model, decoder, encoder, preset = build("tiny", device=DEVICE, dtype=torch.bfloat16)
    g = StreamGenerator(model, decoder, CacheConfig(1, 3, 48), latent_hw=preset.latent_hw, text_encoder=encoder,
                        cuda_graph=False, seed=0, steps=2, backend="triton")
    g.set_prompt(PROMPT)
    for _ in range(8):  # the first block, the cache filled, the first eviction filling the keep buffer
        g.step()
    compiled = _compiled_triton_variants()
    assert compiled > 0
    for _ in range(40):  # frame indices 1 .. 46 pass 16 and 32
        g.step()
    assert _compiled_triton_variants() == compiled
