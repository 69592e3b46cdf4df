"""The steady-state plain step on static buffers: run eagerly, or captured once in a CUDA graph
and replayed for every later frame.

Once the cache is full, every shape and every scalar kernel argument of a plain step is the same
from frame to frame; what changes lives in device memory that the kernels read: the cache's ring
position and page table (advanced by the captured commits, see StreamingKVCache.ring_commits),
the index of the block's first frame (keys the Philox noise; advanced in the step), the clean
latents of the previous block and the prompt's cross-attention K/V (static buffers, written
before a step when the host holds newer ones: after an eager pass, a prompt switch, or each frame
of a prompt transition). An eager step keeps the cache's host bookkeeping as it goes; after a
replay, which runs no Python, the host advances it (StreamingKVCache.advance_ring_mirror).

On a CUDA device the step runs eagerly on a side stream for WARMUP_PASSES frames (Triton
compiles, cuBLAS workspaces), is then captured on that stream into its own memory pool, and
replayed from then on. Anything that cannot be captured runs eagerly, with the reason counted.
"""
from __future__ import annotations

import collections

import torch

from xjfast.backends import resolve
from xjfast.errors import BackendUnavailable

WARMUP_PASSES = 2  # eager static steps before the capture


class StaticStep:
    def __init__(self, gen, use_graph: bool, capture: bool = True):
        self.gen = gen
        self.use_graph = use_graph
        self.capture = capture                 # False: eager static steps only (a dry run's)
        self.graph = self.out = self.stream = None
        self.prev = self.frame = None          # static inputs: previous clean block, its next frame index
        self.prompt, self._prompt_source = None, None
        self.blocker = None                    # why this stream never replays a graph, once known
        self.warm = 0                          # eager static steps since the (re)capture was due
        self.replayed = self.captures = self.static_eager = 0
        self.eager_passes = collections.Counter()  # reason -> passes that did not replay
        self.last_reason, self.last_replayed = None, False
        self._fresh_for = None                 # the frame index the static inputs are ready for

    def reset(self) -> None:
        """A new stream: the static inputs are stale (the captured graph stays valid)."""
        self._fresh_for = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def note_eager(self, reason: str) -> None:
        self.eager_passes[reason] += 1
        self.last_reason, self.last_replayed = reason, False

    def stats(self) -> dict:
        return {"requested": self.use_graph, "in_use": self.graph is not None and self.last_replayed,
                "replayed_frames": self.replayed * self.gen.frames_per_block, "captures": self.captures,
                "static_steps_eager": self.static_eager, "fallback": None if self.last_replayed else self.last_reason,
                "eager_passes": dict(self.eager_passes)}

    def unready(self) -> str | None:
        """None when this pass can be the static step; else why it runs as a plain eager pass."""
        gen = self.gen
        if not self.use_graph:
            return "cuda_graph=False"
        if gen._previous is None:
            return "warm-up: the first block (no clean block to commit yet)"
        return gen.cache.ring_unready(gen.frames_per_block)

    def _graph_blocker(self) -> str | None:
        gen = self.gen
        if gen.device.type != "cuda":
            return f"not a CUDA device ({gen.device}): the static step runs eagerly"
        for op in ("temporal_attention", "kv_cache_commit"):
            try:
                impl = resolve(op, gen.backend, gen.device)
            except BackendUnavailable as exc:
                return str(exc)
            if impl.backend == "reference":
                return (f"{op} resolves to its reference implementation (backend={gen.backend!r}), which indexes "
                        "cache pages from the host: a captured graph would replay stale pages")
        return None

    # ---- the step --------------------------------------------------------------------------------
    def _load(self, first: int) -> None:
        """Outside any capture: bring the static inputs and the device ring up to the host state."""
        gen = self.gen
        if self._fresh_for != first:
            if self.prev is None:
                self.prev = torch.empty(gen._previous.shape, dtype=gen._previous.dtype, device=gen.device)
                self.frame = torch.zeros((), dtype=torch.int64, device=gen.device)
            self.prev.copy_(gen._previous)
            self.frame.fill_(first)
        if self._prompt_source is not gen.prompt_kv:
            shapes = [(k.shape, k.stride(), v.shape, v.stride()) for k, v in gen.prompt_kv]
            if self.prompt is None or shapes != [(k.shape, k.stride(), v.shape, v.stride()) for k, v in self.prompt]:
                if self.graph is not None:  # the graph reads the old buffers: capture again
                    self.graph = self.out = None
                    self.warm = 0
                self.prompt = [(torch.empty_like(k), torch.empty_like(v)) for k, v in gen.prompt_kv]
            for (k_buf, v_buf), (k, v) in zip(self.prompt, gen.prompt_kv):
                k_buf.copy_(k)
                v_buf.copy_(v)
            self._prompt_source = gen.prompt_kv
        gen.cache.sync_ring()

    def _step(self) -> torch.Tensor:
        """The captured work: device ops only, on static inputs (no host sync, no host data)."""
        gen = self.gen
        with gen.cache.ring_commits():
            x = gen._denoise(self.prev, self.frame, self.prompt)
        self.prev.copy_(x)
        self.frame.add_(gen.frames_per_block)
        return x

    def run(self, first: int) -> torch.Tensor:
        """The block starting at frame `first`: replayed, captured then replayed, or eager."""
        gen = self.gen
        self._load(first)
        if self.blocker is None:
            self.blocker = self._graph_blocker()
        if self.blocker is not None:
            x = self._eager(self.blocker)
        elif self.graph is None and (self.warm < WARMUP_PASSES or not self.capture):
            self.warm += 1
            x = self._eager("warm-up: eager static steps before the capture", side_stream=True)
        else:
            if self.graph is None:
                self._capture()
            if self.graph is None:  # the capture failed: the reason is the blocker from now on
                x = self._eager(self.blocker)
            else:
                self.graph.replay()
                gen.cache.advance_ring_mirror(gen.frames_per_block)
                x = self.out.clone()  # the graph's output buffer is overwritten by the next replay
                self.replayed += 1
                self.last_reason, self.last_replayed = None, True
        self._fresh_for = first + gen.frames_per_block
        return x

    def _eager(self, reason: str, side_stream: bool = False) -> torch.Tensor:
        self.static_eager += 1
        self.note_eager(reason)
        if not side_stream:
            return self._step()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.gen.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.gen.device))
        with torch.cuda.stream(self.stream):
            x = self._step()
        torch.cuda.current_stream(self.gen.device).wait_stream(self.stream)
        x.record_stream(torch.cuda.current_stream(self.gen.device))
        return x

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:  # recorded, not run: the device state and the host's books stay where they are
            with self.gen.cache.frozen_mirror(), \
                    torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle(), stream=self.stream):
                out = self._step()
        except Exception as exc:  # noqa: BLE001 -- any capture error: fall back to eager, say why
            self.blocker = f"capture failed: {type(exc).__name__}: {exc}"
            torch.cuda.synchronize(self.gen.device)
            return
        self.graph, self.out = graph, out
        self.captures += 1
