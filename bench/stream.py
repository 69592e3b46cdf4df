"""End-to-end stream benchmark: StreamGenerator on the wan2.1-1.3b preset (random weights) at
480x832, two engines in the same run: xjfast (FP8 kernels, FP8 cache, the steady-state step
replayed from a CUDA graph) and the baseline a Self-Forcing-style engine runs (bf16 cache, torch
SDPA, PyTorch reference ops, eager). Frame rates count video frames (4 per latent frame): "model"
without decoding, "end-to-end" with the preview decoder. Each row records the generator's
`cuda_graph` stats: whether the graph was in use, frames replayed, and why passes ran eagerly.
Last, `profile`: where the xjfast engine's steady step spends the device's time, by kernel family
(bench/step_profile.py).
"""
from __future__ import annotations

import gc
import time
from unittest import mock

import torch

from . import step_profile
from .baseline import sdpa_temporal_attention
from .harness import fail_if_context_lost, on_gpu
from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.engine.static_step import WARMUP_PASSES
from xjfast.models import build
from xjfast.models.decoder import VIDEO_FRAMES_PER_LATENT

ENGINES = {
    "xjfast-fp8": dict(backend="auto", precision="fp8", storage="fp8", cuda_graph=True),
    "baseline-sdpa-bf16": dict(backend="reference", precision="bf16", storage="bf16", cuda_graph=False),
}


def configs(gpu: bool):
    """`steady` blocks are measured after warm_up_blocks."""
    if not gpu:
        return [dict(steps=1, frames_per_block=1, sink=1, window=3, steady=2),
                dict(steps=2, frames_per_block=3, sink=1, window=3, steady=1)]
    return [dict(steps=1, frames_per_block=1, sink=1, window=8, steady=28),
            dict(steps=4, frames_per_block=1, sink=1, window=8, steady=8),
            dict(steps=1, frames_per_block=3, sink=3, window=12, steady=8),
            dict(steps=1, frames_per_block=1, sink=2, window=6, steady=19)]


def warm_up_blocks(cfg: dict, graph: bool = True) -> int:
    """Blocks before the steady state: the first block, those that fill the cache (until then each
    pass differs, and a graph step cannot run), and with a CUDA graph the static step's eager
    warm-up and the block that captures the graph (and replays it once: its time carries the
    capture)."""
    return 1 + -(-(cfg["sink"] + cfg["window"]) // cfg["frames_per_block"]) + (WARMUP_PASSES + 1 if graph else 0)


# Steady blocks an eager engine (the baseline) is measured over at most: its passes take the same
# path every time, and at several times xjfast's latency it would spend the run's budget.
EAGER_STEADY = 8


def _generator(model, decoder, preset, engine: dict, cfg: dict, prompt) -> StreamGenerator:
    gen = StreamGenerator(model, decoder, CacheConfig(cfg["sink"], cfg["window"], 0, engine["storage"]),
                          steps=cfg["steps"], frames_per_block=cfg["frames_per_block"], seed=0,
                          backend=engine["backend"], latent_hw=preset.latent_hw, precision=engine["precision"],
                          cuda_graph=engine["cuda_graph"])
    gen.set_prompt(prompt)
    return gen


def _run(model, decoder, preset, device, engine: dict, cfg: dict, prompt) -> dict:
    gen = _generator(model, decoder, preset, engine, cfg, prompt)
    # what xjfast generate does before a stream: its Triton kernels compiled at once (the first
    # engine's row of a process compiles them, or loads them from Triton's cache; later rows reuse
    # them). Should that fail, the row says why and its stream compiles each kernel at its launch
    try:
        precompiled = gen.precompile()
    except Exception as exc:  # noqa: BLE001 -- recorded in the row, which goes on without it
        precompiled = {"compiled": None, "seconds": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    if on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)
    warm_up = warm_up_blocks(cfg, engine["cuda_graph"])
    steady = cfg["steady"] if engine["cuda_graph"] else min(cfg["steady"], EAGER_STEADY)
    done = []  # a step returns once its frames are on the host: the time each block was delivered
    for _ in range(warm_up + steady):
        gen.step()
        done.append(time.perf_counter())
    s = gen.stats()
    # the steady state (what a long stream sustains) apart from the whole run's figures, which
    # carry Triton's first compiles, the cache filling and the capture
    total, model_ms = s.pop("block_latency_ms")[warm_up:], s.pop("block_model_ms")[warm_up:]
    video_frames = 4 * cfg["frames_per_block"]
    per_frame = sorted(1e3 * (b - a) / cfg["frames_per_block"] for a, b in zip(done[warm_up - 1:], done[warm_up:]))
    s.update(blocks=len(done), steady_blocks=len(total), precompiled_kernels=precompiled["compiled"],
             precompile_s=precompiled["seconds"], precompile_error=precompiled.get("error"),
             steady_model_fps=video_frames * len(model_ms) / (sum(model_ms) / 1e3),
             steady_end_to_end_fps=video_frames * len(total) / (sum(total) / 1e3),
             steady_interval_p50_ms=per_frame[len(per_frame) // 2],
             steady_interval_p99_ms=per_frame[min(len(per_frame) - 1, int(0.99 * len(per_frame)))])
    if on_gpu(device):
        s["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    # the first frame of a fresh stream, the process warm: the run's own first block also carries
    # what a process does once (Triton compiles, library set-up), in the first row only
    gen.reset()
    gen.set_prompt(prompt)
    gen.step()
    s.update(cold_time_to_first_frame_ms=s["time_to_first_frame_ms"],
             time_to_first_frame_ms=gen.stats()["time_to_first_frame_ms"])
    return s


def _memory_flat(model, decoder, preset, device, engine, prompt, frames=(100, 1000)) -> dict:
    """Allocated device memory after 100 and after 1000 latent frames: equal for a flat stream."""
    gen = StreamGenerator(model, decoder, CacheConfig(1, 8, 0, engine["storage"]), latent_hw=preset.latent_hw,
                          backend=engine["backend"], precision=engine["precision"], cuda_graph=engine["cuda_graph"])
    gen.set_prompt(prompt)
    out = {}
    for i in range(1, frames[-1] + 1):
        gen.step()
        if i in frames:
            torch.cuda.synchronize(device)
            out[f"allocated_after_{i}_frames"] = torch.cuda.memory_allocated(device)
    out["flat"] = len(set(out.values())) == 1
    out["cuda_graph_in_use"] = gen.stats()["cuda_graph"]["in_use"]
    return out


# Seconds a part of the section is expected to need at most on an H100; one is not started with
# less of the budget left (and the results say so): a stage cut off from outside would lose them.
# The first row compiles the kernels (precompile) and captures a graph; the memory check's need is
# worked out from the measured steady state where there is one (_memory_need).
NEEDS_S = {"first_row": 60, "row": 20, "memory": 75, "speculation_row": 10, "profile": 15}


def _memory_need(rows: list[dict]) -> float:
    """Seconds _memory_flat's 1,000 latent frames take: from the measured xjfast row of its
    configuration (1 step, 1 frame per block, 1 sink + 8 window frames), a quarter more for its
    warm-up and capture; NEEDS_S's without one."""
    for r in rows:
        if (r["engine"], r["steps"], r["frames_per_block"], r["sink"], r["window"]) == ("xjfast-fp8", 1, 1, 1, 8) \
                and r.get("steady_end_to_end_fps"):
            return 1.25 * 1000 * VIDEO_FRAMES_PER_LATENT / r["steady_end_to_end_fps"] + 10
    return NEEDS_S["memory"]


def measure(device: torch.device, log, budget=None, checkpoint=None) -> dict:
    """The engines per configuration, the memory after 100 and 1,000 frames, speculation on/off,
    the steady step's profile.
    `budget()`: seconds left (None: unbounded); `checkpoint(partial)` is given the section's
    results after each row, so a run stopped from outside keeps what was measured. An exception in
    one part is recorded in that part; the others stand, unless it broke the CUDA context (then
    ContextLost ends the section: every later part would fail alike)."""
    gpu = on_gpu(device)
    name = "wan2.1-1.3b" if gpu else "tiny"
    dtype = torch.bfloat16 if gpu else torch.float32
    model, decoder, encoder, preset = build(name, device=device, dtype=dtype)
    prompt = (encoder("a paper boat drifting down a rainy street") if encoder is not None else
              torch.randn(preset.text_tokens, preset.dit.text_dim, generator=torch.Generator().manual_seed(0)).to(dtype))
    out = {"preset": name, "rows": [], "speculation": []}

    def save():
        if checkpoint is not None:
            checkpoint(out)

    def short_of(need_s: float) -> str | None:
        left = budget() if budget is not None else None
        return None if left is None or left >= need_s else \
            f"not run: {left:.0f} s of the time budget left, {need_s:.0f} s needed"

    for cfg in configs(gpu):
        for engine_name, engine in ENGINES.items():
            first = not out["rows"]
            row = dict(cfg, engine=engine_name, preset=name)
            out["rows"].append(row)
            patch = mock.patch("xjfast.models.dit.temporal_attention", sdpa_temporal_attention) \
                if engine_name.startswith("baseline") else mock.patch.dict({})
            if (skipped := short_of(NEEDS_S["first_row" if first else "row"])) is not None:
                row["skipped"] = skipped
            else:
                with patch:  # an exception (e.g. out of memory) is recorded, the other figures stand
                    row.update(_recorded(_run, model, decoder, preset, device, engine, cfg, prompt))
            if "steady_model_fps" in row:
                log(f"  stream {engine_name} {cfg}: steady model {row['steady_model_fps']:.1f} fps, "
                    f"end-to-end {row['steady_end_to_end_fps']:.1f} fps, cuda graph "
                    f"{'in use' if row['cuda_graph']['in_use'] else 'not in use: ' + str(row['cuda_graph']['fallback'])}"
                    f"{', NaN or inf frames: ' + str(row['nonfinite_frames']) if row['nonfinite_frames'] else ''}")
            save()
            _fail_if_lost(device, row, f"stream {engine_name} {cfg}")
    if gpu:
        out["memory"] = {"skipped": skipped} if (skipped := short_of(_memory_need(out["rows"]))) is not None else \
            _recorded(_memory_flat, model, decoder, preset, device, ENGINES["xjfast-fp8"], prompt)
        save()
        _fail_if_lost(device, out["memory"], "stream memory after 100 and 1,000 frames")
    _speculation(model, decoder, preset, device, prompt, log, out["speculation"],
                 lambda need: short_of(need + NEEDS_S["profile"]), save)
    # last, so that no figure is timed in a process the profiler has run in
    out["profile"] = {"skipped": skipped} if (skipped := short_of(NEEDS_S["profile"])) is not None else \
        _recorded(_profile, model, decoder, preset, device, prompt)
    save()
    _fail_if_lost(device, out["profile"], "stream profile")
    return out


def _profile(model, decoder, preset, device, prompt) -> dict:
    """Where the xjfast engine's steady step of the first configuration spends the device's time
    (bench/step_profile.py): its passes once the cache has filled and the graph is captured."""
    cfg = configs(on_gpu(device))[0]
    engine = ENGINES["xjfast-fp8"]
    gen = _generator(model, decoder, preset, engine, cfg, prompt)
    for _ in range(warm_up_blocks(cfg, engine["cuda_graph"])):
        gen.step()
    out = dict(engine="xjfast-fp8", **{k: cfg[k] for k in ("steps", "frames_per_block", "sink", "window")})
    out.update(step_profile.measure(gen.step, device))
    out["cuda_graph_in_use"] = gen.stats()["cuda_graph"]["in_use"]
    return out


def _fail_if_lost(device, part: dict, where: str) -> None:
    if "error" in part:
        fail_if_context_lost(device, where)


def _recorded(part, *args) -> dict:
    # a StreamGenerator is a reference cycle: only the GC frees the previous part's engine (its
    # cache, graph pool), which would otherwise count in this part's peak and allocated memory
    gc.collect()
    try:
        return part(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _speculation(model, decoder, preset, device, prompt, log, rows, short_of, save) -> None:
    """Speculation off and on, per resolution and depth (xjfast engine), with acceptance rates,
    appended to `rows`."""
    gpu = on_gpu(device)
    resolutions = [(32, 32), (60, 104)] if gpu else [preset.latent_hw]  # 256x256 and 480x832 video
    for hw in resolutions:
        for depth in (0, 2, 3, 4, "auto"):
            for drafter in (("extrapolate", "shallow:4") if depth else ("extrapolate",)):
                row = dict(video=f"{8 * hw[0]}x{8 * hw[1]}", speculate=depth, drafter=drafter)
                rows.append(row)
                if (skipped := short_of(NEEDS_S["speculation_row"])) is not None:
                    row["skipped"] = skipped
                else:
                    row.update(_recorded(_speculation_row, model, decoder, device, prompt, hw, depth, drafter))
                if "model_fps" in row:
                    rate = row["acceptance_rate"]
                    log(f"  speculation {row['video']} depth={depth} {drafter}: {row['model_fps']:.1f} fps, "
                        f"acceptance {'-' if rate is None else f'{rate:.0%}'}")
                save()
                _fail_if_lost(device, row, f"speculation {row['video']} depth={depth} {drafter}")


def _speculation_row(model, decoder, device, prompt, hw, depth, drafter) -> dict:
    """The steady state of one stream: its passes after the cache has filled and (depth 0) the
    step's graph is captured, so that no row's figures carry compiles, the warm-up or a capture
    (which speculative passes, run eagerly, never make)."""
    gpu = on_gpu(device)
    cache = dict(sink=1, window=8, frames_per_block=1)
    gen = StreamGenerator(model, decoder, CacheConfig(cache["sink"], cache["window"]), latent_hw=hw, speculate=depth,
                          drafter=drafter, backend="auto" if gpu else "reference")
    gen.set_prompt(prompt)
    if gpu:
        gen.precompile()  # every depth's kernels, before the stream
    for _ in range(warm_up_blocks(cache) if gpu else 2):
        gen.step()
    passes = latent_frames = 0
    while latent_frames < (24 if gpu else 8):  # the steady passes: counted from what each emits
        latent_frames += gen.step().latents.shape[2]
        passes += 1
    s = gen.stats()
    video_frames = VIDEO_FRAMES_PER_LATENT * latent_frames
    return dict(model_fps=video_frames / (sum(s["block_model_ms"][-passes:]) / 1e3),
                end_to_end_fps=video_frames / (sum(s["block_latency_ms"][-passes:]) / 1e3),
                steady_passes=passes, nonfinite_frames=s["nonfinite_frames"], **s["speculation"])
