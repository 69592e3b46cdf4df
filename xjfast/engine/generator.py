"""StreamGenerator: the frame loop of a streaming video generator.

Each step is ONE model call over [clean previous block | noisy current block], block-causal:
the clean block (timestep 0) re-encodes the previous output so that its keys and values are
committed to the cache in the same pass that denoises the current block. With `steps` > 1 the
later steps re-noise x0 to the next sigma (fresh Philox noise) and call the model on the noisy
block alone. Noise is keyed by (seed, frame index, step), so a stream is determined by its seed
and does not depend on how it was split into passes.

Speculative drafting (`speculate`): a drafter proposes the next frames; one pass denoises k
frames [clean last | noisy n | clean draft n | noisy n+1 | ...] with the noisy blocks private,
and the longest prefix of drafts that the model's outputs confirm (relative L2 <= accept_tol) is
kept: 1 + accepted frames per pass, the accepted drafts' keys/values committed afterwards.
Prompt switching (`set_prompt(..., transition_frames=N, recache=...)`): the text conditioning is
blended from the old prompt to the new over N frames; `recache` re-encodes the cached frames
under the new prompt in one pass (as LongLive does), so the scene morphs instead of cutting.
CUDA graphs (`cuda_graph`): once the cache is full, the plain step is captured once and replayed
for every later frame (xjfast.engine.static_step); passes that cannot be replayed run eagerly.
Compiles (`precompile()`): a dry run of those passes compiles every Triton kernel the stream will
launch, in parallel, before its first frame, so that none compiles in the middle of the stream.
"""
from __future__ import annotations

import collections
import copy
import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from xjfast.backends import backend_unavailable_reason
from xjfast.cache import KEEP, StreamingKVCache
from xjfast.engine.schedule import shifted_sigmas, step_seed
from xjfast.engine.speculation import MAX_DEPTH, DepthController, extrapolate, hold, parse_drafter, relative_l2
from xjfast.engine.static_step import WARMUP_PASSES, StaticStep
from xjfast.errors import check_choice, check_finite, is_int
from xjfast.models.decoder import VIDEO_FRAMES_PER_LATENT
from xjfast.models.dit import CausalDiT
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.temporal_attention import PRECISIONS

# Per-pass figures stats() keeps (percentiles, block_latency_ms): the newest HISTORY passes, so that
# the generator's memory and stats()'s cost stay flat however long the stream runs.
HISTORY = 4096


@dataclass(frozen=True)
class CacheConfig:
    sink_frames: int = 1
    window_frames: int = 8
    keep_tokens: int = 0
    storage: str = "fp8"


@dataclass
class Frame:
    index: int               # latent frame index of the first frame
    latents: torch.Tensor    # [B, C, F, h, w] clean latents (F: frames of the block, or of a speculative pass)
    video: torch.Tensor      # [4F, 8h, 8w, 3] uint8 frames of sample 0


class StreamGenerator:
    def __init__(self, model, decoder, cache_config: CacheConfig = CacheConfig(), steps: int = 1,
                 frames_per_block: int = 1, seed: int = 0, backend: str = "auto", *, latent_hw=(16, 16),
                 batch: int = 1, precision: str = "fp8", shift: float = 5.0, text_encoder=None,
                 speculate=0, drafter="extrapolate", accept_tol: float = 0.05, cuda_graph: bool | None = None):
        if not isinstance(getattr(model, "_orig_mod", model), CausalDiT):  # torch.compile wraps it so
            raise TypeError(f"model: expected a CausalDiT (xjfast.models), got {type(model).__name__}")
        if not isinstance(cache_config, CacheConfig):
            raise TypeError(f"cache_config: expected a CacheConfig, got {type(cache_config).__name__}")
        if not is_int(frames_per_block) or frames_per_block < 1:
            raise ValueError(f"frames_per_block: expected an int >= 1, got {frames_per_block!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        if speculate != "auto" and (not is_int(speculate) or not 0 <= speculate <= MAX_DEPTH):
            raise ValueError(f"speculate: expected 'auto' or a depth in [0, {MAX_DEPTH}], got {speculate!r}")
        if speculate not in (0, 1) and (steps != 1 or frames_per_block != 1):
            raise ValueError(f"speculate: drafting needs steps=1 and frames_per_block=1, got steps={steps}, "
                             f"frames_per_block={frames_per_block}")
        if isinstance(accept_tol, bool) or not isinstance(accept_tol, numbers.Real) or not 0 <= accept_tol < math.inf:
            raise ValueError(f"accept_tol: expected a finite relative L2 tolerance >= 0, got {accept_tol!r}")
        check_choice("precision", precision, PRECISIONS)
        _, ph, pw = model.cfg.patch_size
        if not (isinstance(latent_hw, (tuple, list)) and len(latent_hw) == 2
                and all(is_int(n) and n > 0 for n in latent_hw)
                and latent_hw[0] % ph == 0 and latent_hw[1] % pw == 0):
            raise ValueError(f"latent_hw: expected (height, width) in latent pixels, positive multiples of the "
                             f"model's patch ({ph}, {pw}), got {latent_hw!r}")
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph: expected True, False or None (True on a CUDA device), got {cuda_graph!r}")
        if not callable(decoder):
            raise TypeError(f"decoder: expected a module turning latents into video frames, got {type(decoder).__name__}")
        if text_encoder is not None and not callable(text_encoder):
            raise TypeError(f"text_encoder: expected None or a module turning a prompt into text embeddings, got "
                            f"{type(text_encoder).__name__}")
        self.drafter = parse_drafter(drafter)
        if self.drafter[0] == "shallow" and self.drafter[1] > model.cfg.layers:
            raise ValueError(f"drafter: shallow:L takes L of the model's {model.cfg.layers} blocks, got {drafter!r}")
        self.model, self.decoder, self.text_encoder = model, decoder, text_encoder
        self.sigmas = shifted_sigmas(steps, shift)
        self.steps, self.frames_per_block, self.seed = steps, frames_per_block, seed
        self.backend, self.precision, self.batch = backend, precision, batch
        self.speculate, self.accept_tol = speculate, float(accept_tol)
        self.latent_hw = tuple(latent_hw)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.cfg
        self.frame_tokens = model.tokens_per_frame(self.latent_hw)
        self.cache = StreamingKVCache(cfg.layers, batch, cfg.heads, cfg.head_dim, self.frame_tokens,
                                      sink_frames=cache_config.sink_frames, window_frames=cache_config.window_frames,
                                      keep_tokens=cache_config.keep_tokens, storage=cache_config.storage,
                                      device=self.device, backend=backend)
        self.prompt_kv, self._embeds = None, None
        # the steady-state step: replayed from a CUDA graph on a GPU; run eagerly elsewhere
        self._static = StaticStep(self, self.device.type == "cuda" if cuda_graph is None else cuda_graph)
        self._timestep_rows = {}
        self._zeros = {}  # latent shape -> zeros, the x0 of _noise
        self.reset()

    @torch.no_grad()  # the newest prompt's K/V below: no autograd graph held with them
    def reset(self) -> None:
        """Start a new stream (same seed: the same frames again), conditioned on the newest prompt
        (a transition under way is completed)."""
        if getattr(self, "_transition", None) is not None:
            self.prompt_kv = self.model.prompt_kv(self._embeds)
        self._recache_s = collections.deque(maxlen=HISTORY)  # seconds of each recache (set_prompt(..., recache=True))
        self._switch_pending = False     # a prompt was cut to: the next pass is a switching one
        self.cache.reset()
        self._next_frame = 0
        self._previous = None            # clean latents of the last block: committed by the next pass
        self._latents = {}               # frame index -> clean latents, for the drafters and recache
        # per pass, the newest HISTORY: model and total seconds, when it was done, frames emitted
        self._model_s, self._total_s, self._done_at, self._frames = (collections.deque(maxlen=HISTORY) for _ in range(4))
        self._switch_s = collections.deque(maxlen=HISTORY)  # total seconds of each prompt-switching pass
        self._totals = dict(passes=0, latent_frames=0, model_s=0.0, total_s=0.0, first_s=float("nan"), switches=0,
                            nonfinite_frames=0, first_nonfinite_frame=None)
        self._transition = None          # (old embeds, new embeds, frames, frames done)
        self.conditioning_weights = collections.deque(maxlen=HISTORY)  # newest prompt's weight, per pass
        # a pass's later frames hide at most the whole window (frame_lags): depth - 1 <= window_frames
        deepest = min(MAX_DEPTH, self.cache.window_frames + 1)
        fixed = None if self.speculate == "auto" else min(max(1, self.speculate), deepest)
        self.depth = DepthController(fixed, max_depth=deepest)
        self._static.reset()

    # ---- compiles ----------------------------------------------------------------------------
    @torch.no_grad()
    def precompile(self, threads: int | None = None) -> dict:
        """Compile every Triton kernel this stream will launch, in parallel (`threads`, default one
        per core), before its first frame: else each compiles when first launched, which on a
        fresh machine stalls the first frame for seconds, and later ones mid-stream (the first
        evictions into the keep buffer, the first prompt recache, each speculation depth).

        A dry run of the stream's passes (the first block, each speculation depth before and after
        the cache fills, the fill, two evictions, the CUDA-graph step's eager warm-up, a recache)
        in which Triton launches compile and run nothing; the stream is then as fresh as before.
        Compiles persist in Triton's cache (~/.triton/cache), so a later process loads them.
        Returns {"compiled": kernels compiled or loaded from that cache, "seconds": wall time};
        nothing to do (0 compiled) where no op runs on Triton."""
        if self.prompt_kv is None:
            raise RuntimeError("set_prompt(...) must be called before precompile(): the dry run needs the conditioning")
        if self._next_frame:
            raise RuntimeError(f"precompile: call it before the stream's first frame (or after reset()), got a "
                               f"stream at frame {self._next_frame}")
        if threads is not None and (not is_int(threads) or threads < 1):
            raise ValueError(f"threads: expected an int >= 1 or None, got {threads!r}")
        start = time.perf_counter()
        if self.backend not in ("auto", "triton") or (self.backend == "auto" and self.device.type != "cuda") \
                or backend_unavailable_reason("triton", self.device) is not None:
            return {"compiled": 0, "seconds": time.perf_counter() - start}
        from xjfast.kernels.launch import compile_only
        try:
            with compile_only(threads) as compiles:
                self._dry_run()
        finally:  # also after a failed compile: the stream starts from an empty cache
            self.cache.reset()  # the dry run's pages hold what no kernel wrote
        self._sync()
        return {"compiled": len(compiles), "seconds": time.perf_counter() - start}

    def _dry_run(self) -> None:
        """The passes precompile() compiles for, on a copy of this generator that shares its model,
        cache and buffers (its passes' frames are garbage: no Triton kernel runs)."""
        dry = copy.copy(self)
        dry._static = StaticStep(dry, self._static.use_graph, capture=False)
        dry._check_finite = lambda first, x: None  # unwritten outputs: nothing to report
        dry.reset()
        top = self.depth.fixed or self.depth.max_depth
        depths = range(2, top + 1)
        plain = -(-(self.cache.sink_frames + self.cache.window_frames) // self.frames_per_block) + 2 + WARMUP_PASSES

        def passes(depth: int, count: int = 1) -> None:
            dry.depth = _ForcedDepth(depth)
            for _ in range(count):
                dry.step()

        passes(1)
        for depth in depths:
            passes(depth)
        passes(1, plain)
        for depth in depths:
            passes(depth)
        dry.set_prompt(self._embeds, recache=True)
        passes(1)

    # ---- prompts ---------------------------------------------------------------------------
    def _embeddings(self, prompt) -> torch.Tensor:
        if isinstance(prompt, str):
            if self.text_encoder is None:
                raise TypeError("prompt: this model takes text embeddings (a tensor [S, text_dim]), got a str")
            embeds = self.text_encoder(prompt)
        elif isinstance(prompt, torch.Tensor):
            embeds = prompt if prompt.dim() == 3 else prompt[None]
            if embeds.dim() != 3 or embeds.shape[-1] != self.model.cfg.text_dim or embeds.shape[0] not in (1, self.batch) \
                    or embeds.shape[1] == 0:
                raise ValueError(f"prompt: expected embeddings [S, {self.model.cfg.text_dim}] or [B, S, "
                                 f"{self.model.cfg.text_dim}] (S >= 1) with B = 1 or the stream's batch {self.batch}, "
                                 f"got shape {tuple(prompt.shape)}")
            if not prompt.is_floating_point():
                raise TypeError(f"prompt: expected floating-point embeddings, got dtype {prompt.dtype}")
            if prompt.is_meta:
                raise ValueError("prompt: expected embeddings with values (on any device), got a tensor on meta")
            check_finite("prompt", prompt)  # once per prompt: NaN here would fill every frame after it
        else:
            raise TypeError(f"prompt: expected a str or a tensor of text embeddings, got {type(prompt).__name__}")
        return embeds.to(self.device).expand(self.batch, -1, -1)

    @torch.no_grad()
    def set_prompt(self, prompt, transition_frames: int = 0, recache: bool = False) -> None:
        """Condition on a prompt: text (presets with a text encoder) or embeddings [S, D] / [B, S, D].

        Mid-stream, `transition_frames=N` blends the conditioning from the current prompt to this
        one over the next N latent frames (cross-attention keys/values recomputed per block while
        blending; a block of several frames takes the weight of its last frame), which needs
        embeddings of the current prompt's shape; `recache=True` re-encodes the cached frames under
        the new prompt in one pass. The passes of a transition, or the first pass after a cut, count
        as switching frames in stats().
        """
        if not is_int(transition_frames) or transition_frames < 0:
            raise ValueError(f"transition_frames: expected an int >= 0, got {transition_frames!r}")
        if not isinstance(recache, bool):
            raise TypeError(f"recache: expected True or False, got {recache!r}")
        # a copy: a transition blends it in later frames, and the caller may reuse its buffer meanwhile
        embeds = self._embeddings(prompt).clone()
        blend = self._embeds is not None and transition_frames > 0
        if blend and embeds.shape != self._embeds.shape:
            raise ValueError(f"prompt: a transition blends embeddings of the current prompt's shape "
                             f"{tuple(self._embeds.shape)}, got {tuple(embeds.shape)} (transition_frames=0 cuts)")
        if blend:
            self._transition = (self._current_embeds(), embeds, transition_frames, 0)
        else:
            self._transition = None
            self.prompt_kv = self.model.prompt_kv(embeds)
        # frames are out once a pass ran (the first one commits nothing: frames_seen is still 0)
        self._switch_pending = self._next_frame > 0
        self._embeds = embeds
        if recache and self.cache.frames_seen:
            self._sync()
            start = time.perf_counter()
            self._recache(self.model.prompt_kv(embeds))
            self._sync()
            self._recache_s.append(time.perf_counter() - start)

    def _current_embeds(self) -> torch.Tensor:
        if self._transition is None:
            return self._embeds
        old, new, frames, done = self._transition
        w = done / frames
        return old * (1 - w) + new * w

    def _advance_transition(self) -> bool:
        """Set this block's conditioning; True while a prompt transition is under way (or for the
        first block after a cut)."""
        pending, self._switch_pending = self._switch_pending, False
        if self._transition is None:
            self.conditioning_weights.append(1.0)
            return pending
        old, new, frames, done = self._transition
        done = min(frames, done + self.frames_per_block)  # the weight of the block's last frame
        w = done / frames
        self.prompt_kv = self.model.prompt_kv(old * (1 - w) + new * w)
        self.conditioning_weights.append(w)
        self._transition = None if done == frames else (old, new, frames, done)
        return True

    def _recache(self, prompt_kv) -> None:
        """Re-encode the cached frames (their clean latents, in slot order) under `prompt_kv`: as the
        stream encoded them, a block's frames together (block-causal by stream block), where the
        cached frames are whole blocks; frame by frame where eviction left part of one."""
        view = self.cache.view(0)
        frames = self.cache.cached_frames(0)
        slots = [u.position for u in view.units if u.page != KEEP]
        x = torch.cat([self._latents[f] for f in frames], dim=2)
        fpb = self.frames_per_block
        groups = [frames[i:i + fpb] for i in range(0, len(frames), fpb)]
        whole = all(g[0] % fpb == 0 and g == list(range(g[0], g[0] + fpb)) for g in groups)
        block = fpb if whole else 1
        captured = []
        self.model(x, torch.zeros(self.batch, len(frames) // block, device=self.device), prompt_kv, block_frames=block,
                   precision=self.precision, backend=self.backend, frame_slots=slots,
                   kv_frames=list(range(len(frames))), kv_out=captured)
        self.cache.recache(captured)

    # ---- frames ----------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _noise(self, first, frames: int) -> torch.Tensor:
        """Initial noise of `frames` frames from frame `first` (an int or an int64 0-d device tensor):
        the fused step's re-noise from sigma 1 (x_next = 0 * x0 + 1 * eps = eps exactly, the Philox
        stream of latent_noise), one kernel on a GPU where the PyTorch Philox takes a few hundred."""
        shape = (self.batch, self.model.cfg.in_channels, frames, *self.latent_hw)
        if shape not in self._zeros:  # kept: a captured graph reads it
            self._zeros[shape] = torch.zeros(shape, device=self.device)
        zeros = self._zeros[shape]
        _, eps = denoise_step(zeros, zeros, 1.0, 1.0, prediction="x0", noise_seed=step_seed(self.seed, 0),
                              frame_index=first, backend=self.backend)
        return eps.to(self.dtype)

    def _remember(self, first: int, latents: torch.Tensor) -> None:
        for f in range(latents.shape[2]):
            self._latents[first + f] = latents[:, :, f:f + 1]
        # the cached frames, the last block (committed by the next pass: recache may need it) and
        # the last two frames (the drafters' history)
        last = first + latents.shape[2]
        keep = set(self.cache.cached_frames(0)) | set(range(last - max(2, self.frames_per_block), last))
        self._latents = {f: x for f, x in self._latents.items() if f in keep}

    def _timesteps(self, sigma: float, with_clean: bool) -> torch.Tensor:
        """[B, blocks] timesteps of a pass ([clean | noisy] or [noisy]): built once, so a pass makes
        no host-to-device copy (and a captured graph keeps the pointer)."""
        key = (sigma, with_clean)
        if key not in self._timestep_rows:
            row = [[0.0, sigma * 1000]] if with_clean else [[sigma * 1000]]
            self._timestep_rows[key] = torch.tensor(row, device=self.device).expand(self.batch, -1)
        return self._timestep_rows[key]

    def _block(self, first: int) -> torch.Tensor:
        """The plain pass of the block at `first`: the static step when the stream is steady."""
        reason = self._static.unready()
        if reason is None:
            return self._static.run(first)
        self._static.note_eager(reason)
        return self._denoise(self._previous, first, self.prompt_kv)

    def _denoise(self, previous, first, prompt_kv) -> torch.Tensor:
        """The step loop of one block: noise, the model over [clean previous | noisy] (committing the
        clean block), then denoise_step per sigma. `first` is the block's first frame index, an int
        or an int64 0-d device tensor (the static step's), which keys the same noise."""
        fpb = self.frames_per_block
        x = self._noise(first, fpb)
        for k, sigma in enumerate(self.sigmas[:-1]):
            with_clean = k == 0 and previous is not None
            inputs = torch.cat((previous, x), dim=2) if with_clean else x
            tokens = self.model(inputs, self._timesteps(sigma, with_clean), prompt_kv, cache=self.cache,
                                commit_frames=fpb if with_clean else 0, block_frames=fpb,
                                precision=self.precision, backend=self.backend)
            noisy = tokens[:, -fpb * self.frame_tokens:]
            last = k == self.steps - 1
            result = denoise_step(x, noisy, sigma, None if last else self.sigmas[k + 1],
                                  noise_seed=step_seed(self.seed, k + 1), frame_index=first, backend=self.backend)
            x = result if last else result[1]
        return x

    def _drafts(self, first: int, count: int) -> list:
        kind, detail = self.drafter
        history = [self._latents[f] for f in sorted(self._latents) if f < first][-2:]
        if kind == "hold":
            return hold(history, count)
        if kind == "extrapolate":
            return extrapolate(history, count)
        if kind == "callable":
            drafts = detail(history, count, frame_index=first)
            expected = f"{count} floating-point tensors shaped {tuple(history[-1].shape)} on {self.device}"
            if not isinstance(drafts, (list, tuple)) or not all(isinstance(d, torch.Tensor) for d in drafts):
                raise TypeError(f"drafter: expected a list of {expected}, got {type(drafts).__name__} "
                                f"{drafts!r:.80}")
            if len(drafts) != count or any(d.shape != history[-1].shape or d.device != self.device
                                           or not d.is_floating_point() for d in drafts):
                raise ValueError(f"drafter: expected {expected}, got "
                                 f"{[(tuple(d.shape), str(d.dtype), str(d.device)) for d in drafts]}")
            return [d.to(self.dtype) for d in drafts]
        return self._shallow_drafts(first, count, detail)

    def _shallow_drafts(self, first: int, count: int, layers: int) -> list:
        """Self-speculative drafts: the first `layers` blocks and the head, over the same cache
        (read only: no attention mass is accumulated), each draft conditioned on the ones before it."""
        drafts = []
        sigma = self.sigmas[0]
        with self.cache.read_only():
            for j in range(count):
                clean = [self._previous] + drafts
                x = torch.cat(clean + [self._noise(first + j, 1)], dim=2)
                t = torch.tensor([[0.0] * len(clean) + [sigma * 1000]], device=self.device).expand(self.batch, -1)
                tokens = self.model(x, t, self.prompt_kv, cache=self.cache, block_frames=1, layers=layers,
                                    precision=self.precision, backend=self.backend)
                drafts.append(denoise_step(x[:, :, -1:], tokens[:, -self.frame_tokens:], sigma, backend=self.backend))
        return drafts

    def _speculative_pass(self, first: int, depth: int) -> tuple[torch.Tensor, int]:
        """One pass over depth noisy frames and depth - 1 drafts; returns (frames, accepted drafts)."""
        self.cache.expect_commits(depth)  # its commits may evict up to depth pages: weigh them all
        drafts = self._drafts(first, depth - 1)
        noise = [self._noise(first + j, 1) for j in range(depth)]
        blocks, slots = [self._previous, noise[0]], [0, 1]
        for j, draft in enumerate(drafts):
            blocks += [draft, noise[j + 1]]
            slots += [j + 1, j + 2]
        private = [i % 2 == 1 for i in range(len(blocks))]
        # noisy frame first + j (and draft j - 1) see the cache as the j-th pass from now would:
        # without the frames evicted by then (sinks and window: what it holds now, plus j)
        cached, capacity = self.cache.num_frames(0), self.cache.sink_frames + self.cache.window_frames
        lags = [max(0, cached + i // 2 - capacity) for i in range(len(blocks))]
        sigma = self.sigmas[0]
        t = torch.tensor([[0.0 if i % 2 == 0 else sigma * 1000 for i in range(len(blocks))]], device=self.device)
        stashed = []
        tokens = self.model(torch.cat(blocks, dim=2), t.expand(self.batch, -1), self.prompt_kv, cache=self.cache,
                            commit_frames=1, block_frames=1, private_blocks=private, frame_slots=slots,
                            kv_frames=[2 * (j + 1) for j in range(depth - 1)], kv_out=stashed,
                            precision=self.precision, backend=self.backend, frame_lags=lags)
        T = self.frame_tokens
        outputs = [denoise_step(noise[j], tokens[:, (2 * j + 1) * T:(2 * j + 2) * T], sigma, backend=self.backend)
                   for j in range(depth)]
        accepted = 0
        while accepted < depth - 1 and relative_l2(outputs[accepted], drafts[accepted]) <= self.accept_tol:
            accepted += 1
        if accepted:  # the confirmed drafts' keys/values, as the next passes would have committed them
            for layer, (k, v) in enumerate(stashed):
                self.cache.commit(layer, k[:, :accepted * T], v[:, :accepted * T])
        self.cache.expect_commits(1)  # the next pass, plain unless it says otherwise, commits one frame
        return torch.cat(outputs[:accepted + 1], dim=2), accepted

    @torch.no_grad()
    def step(self, max_frames: int | None = None) -> Frame:
        """Generate the next block (or the frames of one speculative pass) and decode it.

        `max_frames` caps the latent frames a speculative pass may emit (e.g. to stop at a prompt
        switch or the stream's end); a block of frames_per_block frames is never split."""
        if max_frames is not None and (not is_int(max_frames) or max_frames < 1):
            raise ValueError(f"max_frames: expected an int >= 1 or None, got {max_frames!r}")
        if self.prompt_kv is None:
            raise RuntimeError("set_prompt(...) must be called before generating frames")
        self._sync()
        start = time.perf_counter()
        first = self._next_frame
        switching = self._advance_transition()
        depth = 1 if switching or self._previous is None else min(self.depth.choose(), max_frames or MAX_DEPTH)
        if depth > 1:
            self._static.note_eager("speculation: a drafted pass")
            x, accepted = self._speculative_pass(first, depth)
        else:
            x, accepted = self._block(first), 0
        self._sync()
        model_done = time.perf_counter()
        if self._previous is not None and not switching:
            self.depth.record(depth, model_done - start, accepted)
        video = self.decoder(x, None if self._previous is None else self._previous[:, :, -1])
        self._check_finite(first, x)  # reads one flag: the step synchronizes here anyway
        self._sync()
        done = time.perf_counter()
        self._previous = x[:, :, -self.frames_per_block:] if depth == 1 else x[:, :, -1:]
        self._next_frame += x.shape[2]
        self._remember(first, x)
        model_s, total_s, totals = model_done - start, done - start, self._totals
        self._model_s.append(model_s)
        self._total_s.append(total_s)
        self._done_at.append(done)
        self._frames.append(x.shape[2])
        if not totals["passes"]:
            totals["first_s"] = total_s
        totals["passes"] += 1
        totals["latent_frames"] += x.shape[2]
        totals["model_s"] += model_s
        totals["total_s"] += total_s
        if switching:
            totals["switches"] += 1
            self._switch_s.append(total_s)
        # a copy: the next pass reads x (the clean block it commits), whatever the caller does to its frame
        return Frame(first, x.clone(), video.cpu())

    def _check_finite(self, first: int, x: torch.Tensor) -> None:
        """Count the latent frames that came out NaN or inf, and warn at the stream's first: the next
        pass commits them to the cache, so every later frame attends to them (for good, in a sink)."""
        if bool(torch.isfinite(x).all()):
            return
        bad = (~torch.isfinite(x)).transpose(0, 2).flatten(1).any(1).nonzero().flatten().tolist()
        totals = self._totals
        totals["nonfinite_frames"] += len(bad)
        if totals["first_nonfinite_frame"] is None:
            totals["first_nonfinite_frame"] = first + bad[0]
            # stacklevel: step()'s caller, past step() and its no_grad wrapper
            warnings.warn(f"StreamGenerator: latent frame {first + bad[0]} came out non-finite (NaN or inf), usually "
                          f"from weights or a dtype that overflow; the cache will hold it, so the frames after it "
                          f"will be too: reset() starts the stream again", RuntimeWarning, stacklevel=4)

    def __iter__(self):
        while True:
            yield self.step()

    def stats(self) -> dict:
        """Latency of the stream so far; frame rates count video frames (4 per latent frame). Counts,
        rates and the first frame cover the whole stream; the intervals' percentiles, the per-pass
        lists and the switching passes' latencies its newest HISTORY passes (or switches)."""
        totals = self._totals
        latent_frames = totals["latent_frames"]
        video_frames = latent_frames * VIDEO_FRAMES_PER_LATENT
        # per latent frame: a pass that emits several frames spreads its interval over them
        done_at, frames, total = list(self._done_at), list(self._frames), list(self._total_s)
        intervals = [b - a for a, b in zip(done_at, done_at[1:])] or total[:1]
        per_frame = [i / n for i, n in zip(intervals, frames[1:] or frames[:1]) for _ in range(n)]
        switch = list(self._switch_s)

        def pct(values, q):
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

        model_s, total_s = totals["model_s"], totals["total_s"]
        return {
            "passes": totals["passes"],
            "latent_frames": latent_frames,
            "video_frames": video_frames,
            "model_fps": video_frames / model_s if model_s else float("nan"),
            "end_to_end_fps": video_frames / total_s if total_s else float("nan"),
            "time_to_first_frame_ms": 1e3 * totals["first_s"],
            "interval_p50_ms": 1e3 * statistics.median(per_frame) if per_frame else float("nan"),
            "interval_p99_ms": 1e3 * pct(per_frame, 0.99),
            "block_latency_ms": [1e3 * s for s in self._total_s],
            "block_model_ms": [1e3 * s for s in self._model_s],
            "cache_bytes": self.cache.memory_bytes(),
            "speculation": {
                "depth": self.depth.best() if self.depth.fixed is None else self.depth.fixed,
                "acceptance_rate": self.depth.acceptance(),
                "frames_per_pass": latent_frames / totals["passes"] if totals["passes"] else float("nan"),
                "speedup_over_no_speculation": self.depth.speedup(),
            },
            "cuda_graph": self._static.stats(),
            "nonfinite_frames": totals["nonfinite_frames"],
            "first_nonfinite_frame": totals["first_nonfinite_frame"],
            "switch_frames": totals["switches"],
            "recache_ms": [1e3 * s for s in self._recache_s],
            "switch_latency_p50_ms": 1e3 * statistics.median(switch) if switch else None,
            "switch_latency_max_ms": 1e3 * max(switch) if switch else None,
        }


class _ForcedDepth:
    """The speculation depth of every pass of a dry run (precompile)."""

    def __init__(self, depth: int):
        self.depth = depth

    def choose(self) -> int:
        return self.depth

    def record(self, depth: int, seconds: float, accepted: int) -> None:
        pass
