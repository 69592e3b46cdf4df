"""StreamGenerator: the frame loop of a streaming video generator.

Each step is ONE model call over [clean previous block | noisy current block], block-causal:
the clean block (timestep 0) re-encodes the previous output so that its keys and values are
committed to the cache in the same pass that denoises the current block. With `steps` > 1 the
later steps re-noise x0 to the next sigma (fresh Philox noise) and call the model on the noisy
block alone. Noise is keyed by (seed, frame index, step), so a stream is determined by its seed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from xjfast.cache import StreamingKVCache
from xjfast.engine.schedule import shifted_sigmas, step_seed
from xjfast.models.decoder import VIDEO_FRAMES_PER_LATENT
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.philox import latent_noise


@dataclass(frozen=True)
class CacheConfig:
    sink_frames: int = 1
    window_frames: int = 8
    keep_tokens: int = 0
    storage: str = "fp8"


@dataclass
class Frame:
    index: int               # latent frame index of the block's first frame
    latents: torch.Tensor    # [B, C, F, h, w] clean latents of the block
    video: torch.Tensor      # [4F, 8h, 8w, 3] uint8 frames of sample 0


class StreamGenerator:
    def __init__(self, model, decoder, cache_config: CacheConfig = CacheConfig(), steps: int = 1,
                 frames_per_block: int = 1, seed: int = 0, backend: str = "auto", *, latent_hw=(16, 16),
                 batch: int = 1, precision: str = "fp8", shift: float = 5.0, text_encoder=None):
        if not isinstance(frames_per_block, int) or frames_per_block < 1:
            raise ValueError(f"frames_per_block: expected an int >= 1, got {frames_per_block!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self.model, self.decoder, self.text_encoder = model, decoder, text_encoder
        self.sigmas = shifted_sigmas(steps, shift)
        self.steps, self.frames_per_block, self.seed = steps, frames_per_block, seed
        self.backend, self.precision, self.batch = backend, precision, batch
        self.latent_hw = tuple(latent_hw)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.cfg
        self.frame_tokens = model.tokens_per_frame(self.latent_hw)
        self.cache = StreamingKVCache(cfg.layers, batch, cfg.heads, cfg.head_dim, self.frame_tokens,
                                      sink_frames=cache_config.sink_frames, window_frames=cache_config.window_frames,
                                      keep_tokens=cache_config.keep_tokens, storage=cache_config.storage,
                                      device=self.device, backend=backend)
        self.prompt_kv = None
        self.reset()

    def reset(self) -> None:
        """Start a new stream (same seed: the same frames again)."""
        self.cache.reset()
        self._next_frame = 0
        self._previous = None  # clean latents of the last block: committed by the next pass
        self._model_s, self._total_s, self._done_at = [], [], []
        self._started = None

    def set_prompt(self, prompt) -> None:
        """Condition on a prompt: text (presets with a text encoder) or embeddings [S, D] / [B, S, D]."""
        if isinstance(prompt, str):
            if self.text_encoder is None:
                raise TypeError("prompt: this model takes text embeddings (a tensor [S, text_dim]), got a str")
            embeds = self.text_encoder(prompt)
        elif isinstance(prompt, torch.Tensor):
            embeds = prompt if prompt.dim() == 3 else prompt[None]
            if embeds.dim() != 3 or embeds.shape[-1] != self.model.cfg.text_dim:
                raise ValueError(f"prompt: expected embeddings [S, {self.model.cfg.text_dim}] or [B, S, "
                                 f"{self.model.cfg.text_dim}], got shape {tuple(prompt.shape)}")
        else:
            raise TypeError(f"prompt: expected a str or a tensor of text embeddings, got {type(prompt).__name__}")
        embeds = embeds.to(self.device).expand(self.batch, -1, -1)
        with torch.no_grad():
            self.prompt_kv = self.model.prompt_kv(embeds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def step(self) -> Frame:
        """Generate the next block of latent frames and decode it."""
        if self.prompt_kv is None:
            raise RuntimeError("set_prompt(...) must be called before generating frames")
        self._sync()
        start = time.perf_counter()
        self._started = self._started or start
        fpb, first = self.frames_per_block, self._next_frame
        shape = (self.batch, self.model.cfg.in_channels, fpb, *self.latent_hw)
        x = latent_noise(step_seed(self.seed, 0), first, shape, self.device).to(self.dtype)
        for k, sigma in enumerate(self.sigmas[:-1]):
            with_clean = k == 0 and self._previous is not None
            inputs = torch.cat((self._previous, x), dim=2) if with_clean else x
            t = torch.tensor([[0.0, sigma * 1000]] if with_clean else [[sigma * 1000]], device=self.device)
            tokens = self.model(inputs, t.expand(self.batch, -1), self.prompt_kv, cache=self.cache,
                                commit_frames=fpb if with_clean else 0, block_frames=fpb,
                                precision=self.precision, backend=self.backend)
            noisy = tokens[:, -fpb * self.frame_tokens:]
            last = k == self.steps - 1
            result = denoise_step(x, noisy, sigma, None if last else self.sigmas[k + 1],
                                  noise_seed=step_seed(self.seed, k + 1), frame_index=first, backend=self.backend)
            x = result if last else result[1]
        self._sync()
        model_done = time.perf_counter()
        video = self.decoder(x, None if self._previous is None else self._previous[:, :, -1])
        self._sync()
        done = time.perf_counter()
        self._previous = x
        self._next_frame += fpb
        self._model_s.append(model_done - start)
        self._total_s.append(done - start)
        self._done_at.append(done)
        return Frame(first, x, video.cpu())

    def __iter__(self):
        while True:
            yield self.step()

    def stats(self) -> dict:
        """Latency of the stream so far; frame rates count video frames (4 per latent frame)."""
        blocks = len(self._total_s)
        video_frames = blocks * self.frames_per_block * VIDEO_FRAMES_PER_LATENT
        intervals = [b - a for a, b in zip(self._done_at, self._done_at[1:])] or self._total_s[:1]

        def pct(values, q):
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

        model_s, total_s = sum(self._model_s), sum(self._total_s)
        return {
            "blocks": blocks,
            "latent_frames": blocks * self.frames_per_block,
            "video_frames": video_frames,
            "model_fps": video_frames / model_s if model_s else float("nan"),
            "end_to_end_fps": video_frames / total_s if total_s else float("nan"),
            "time_to_first_frame_ms": 1e3 * self._total_s[0] if blocks else float("nan"),
            "interval_p50_ms": 1e3 * statistics.median(intervals) if intervals else float("nan"),
            "interval_p99_ms": 1e3 * pct(intervals, 0.99),
            "block_latency_ms": [1e3 * s for s in self._total_s],
            "cache_bytes": self.cache.memory_bytes(),
        }
