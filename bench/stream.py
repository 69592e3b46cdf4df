"""End-to-end stream benchmark: StreamGenerator on the wan2.1-1.3b preset (random weights) at
480x832, two engines in the same run: xjfast (FP8 kernels, FP8 cache, the steady-state step
replayed from a CUDA graph) and the baseline a Self-Forcing-style engine runs (bf16 cache, torch
SDPA, PyTorch reference ops, eager). Frame rates count video frames (4 per latent frame): "model"
without decoding, "end-to-end" with the preview decoder. Each row records the generator's
`cuda_graph` stats: whether the graph was in use, frames replayed, and why passes ran eagerly.
"""
from __future__ import annotations

from unittest import mock

import torch

from bench.baseline import sdpa_temporal_attention
from bench.harness import on_gpu
from xjfast.engine import CacheConfig, StreamGenerator
from xjfast.models import build

ENGINES = {
    "xjfast-fp8": dict(backend="auto", precision="fp8", storage="fp8", cuda_graph=True),
    "baseline-sdpa-bf16": dict(backend="reference", precision="bf16", storage="bf16", cuda_graph=False),
}


def configs(gpu: bool):
    if not gpu:
        return [dict(steps=1, frames_per_block=1, sink=1, window=3, blocks=8),
                dict(steps=2, frames_per_block=3, sink=1, window=3, blocks=3)]
    return [dict(steps=1, frames_per_block=1, sink=1, window=8, blocks=40),
            dict(steps=4, frames_per_block=1, sink=1, window=8, blocks=10),
            dict(steps=1, frames_per_block=3, sink=3, window=12, blocks=12),
            dict(steps=1, frames_per_block=1, sink=2, window=6, blocks=30)]


def _run(model, decoder, preset, device, engine: dict, cfg: dict, prompt) -> dict:
    gen = StreamGenerator(model, decoder, CacheConfig(cfg["sink"], cfg["window"], 0, engine["storage"]),
                          steps=cfg["steps"], frames_per_block=cfg["frames_per_block"], seed=0,
                          backend=engine["backend"], latent_hw=preset.latent_hw, precision=engine["precision"],
                          cuda_graph=engine["cuda_graph"])
    gen.set_prompt(prompt)
    if on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(cfg["blocks"]):
        gen.step()
    s = gen.stats()
    # the stream's second half: past the cache warm-up and the capture, what a long stream sustains
    late = s.pop("block_latency_ms")[cfg["blocks"] // 2:]
    s["second_half_end_to_end_fps"] = 4 * cfg["frames_per_block"] * len(late) / (sum(late) / 1e3)
    if on_gpu(device):
        s["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
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


def measure(device: torch.device, log) -> dict:
    gpu = on_gpu(device)
    name = "wan2.1-1.3b" if gpu else "tiny"
    dtype = torch.bfloat16 if gpu else torch.float32
    model, decoder, encoder, preset = build(name, device=device, dtype=dtype)
    prompt = (encoder("a paper boat drifting down a rainy street") if encoder is not None else
              torch.randn(preset.text_tokens, preset.dit.text_dim, generator=torch.Generator().manual_seed(0)).to(dtype))
    rows = []
    for cfg in configs(gpu):
        for engine_name, engine in ENGINES.items():
            patch = mock.patch("xjfast.models.dit.temporal_attention", sdpa_temporal_attention) \
                if engine_name.startswith("baseline") else mock.patch.dict({})
            try:
                with patch:
                    row = _run(model, decoder, preset, device, engine, cfg, prompt)
                rows.append(dict(cfg, engine=engine_name, preset=name, **row))
                log(f"  stream {engine_name} {cfg}: model {row['model_fps']:.1f} fps, "
                    f"end-to-end {row['end_to_end_fps']:.1f} fps, cuda graph "
                    f"{'in use' if row['cuda_graph']['in_use'] else 'not in use: ' + str(row['cuda_graph']['fallback'])}")
            except Exception as exc:  # e.g. out of memory: recorded, the other figures stand
                rows.append(dict(cfg, engine=engine_name, preset=name, error=f"{type(exc).__name__}: {exc}"))
    out = {"preset": name, "rows": rows, "speculation": _speculation(model, decoder, preset, device, prompt, log)}
    if gpu:
        out["memory"] = _memory_flat(model, decoder, preset, device, ENGINES["xjfast-fp8"], prompt)
    return out


def _speculation(model, decoder, preset, device, prompt, log) -> list[dict]:
    """Speculation off and on, per resolution and depth (xjfast engine), with acceptance rates."""
    gpu = on_gpu(device)
    resolutions = [(32, 32), (60, 104)] if gpu else [preset.latent_hw]  # 256x256 and 480x832 video
    rows = []
    for hw in resolutions:
        for depth in (0, 2, 3, 4, "auto"):
            for drafter in (("extrapolate", "shallow:4") if depth else ("extrapolate",)):
                gen = StreamGenerator(model, decoder, CacheConfig(1, 8), latent_hw=hw, speculate=depth,
                                      drafter=drafter, backend="auto" if gpu else "reference")
                gen.set_prompt(prompt)
                for _ in range(4):  # warm-up, then a fresh stream
                    gen.step()
                gen.reset()
                gen.set_prompt(prompt)
                while gen.stats()["latent_frames"] < (24 if gpu else 8):
                    gen.step()
                s = gen.stats()
                row = dict(video=f"{8 * hw[0]}x{8 * hw[1]}", speculate=depth, drafter=drafter,
                           model_fps=s["model_fps"], end_to_end_fps=s["end_to_end_fps"], **s["speculation"])
                rows.append(row)
                log(f"  speculation {row['video']} depth={depth} {drafter}: {row['model_fps']:.1f} fps, "
                    f"acceptance {row['acceptance_rate']:.0%}")
    return rows
