"""StreamingKVCache: fixed-capacity FP8 paged KV cache with sinks, a rolling window and
score-based token retention, so a stream of any length runs in constant memory.

Storage per layer (allocated once): pages of one latent frame each, `[pages, B, T, H, D]`
e4m3 with fp32 scales per (page, b, head) for K and per (page, b, head, channel) for V, and each
page's K mean per (page, b, head, channel): a page stores K minus its own mean (smoothing; the
attention op adds q.mean back). A page table lists the pages in slot order: sinks first, then
the window oldest first. Eviction reuses the oldest window page in place (a table update).

With `keep_tokens > 0`, the tokens of an evicted page that received the most attention (mass
accumulated by the attention op, in int64 fixed point so that it does not depend on the order of
a GPU's atomics) are merged into a side buffer of `keep_tokens` slots, stored like one more page
and placed at its own temporal slot between the sinks and the window.

Keys are committed with their spatial rotary but without the temporal one: the attention op
assigns temporal positions by slot (StreamingLLM's rule), so positions never grow with the
stream and never exceed what the model saw in training.

The bookkeeping (which page holds which frame) is host-side Python. Once the sinks and the
window are full, a commit only rotates the ring, and inside `ring_commits()` the device side of
it is done by device ops alone: the ring position, the page ids the commit writes and the page
table are device tensors, so a CUDA graph that captured the commits replays them frame after
frame. A replay runs no Python: `advance_ring_mirror(frames)` then brings the host bookkeeping
along (and `frozen_mirror()` keeps a capture, which records but runs nothing, from moving it).
With a keep buffer, ring commits start once it is full (how many tokens it holds then stays
put): the evicted pages are gathered by device index and compacted into it the same way.
"""
from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple, Sequence

import torch

from xjfast.backends import check_backend, resolve
from xjfast.errors import check_choice, check_device, check_positive, check_tensor, is_int
from xjfast.ops.fp8 import E4M3
from xjfast.ops.kv_cache_commit import kv_cache_commit
from xjfast.ops.kv_cache_compact import kv_cache_compact
from xjfast.ops.rotary import temporal_rope_dims
from xjfast.ops.temporal_attention import mass_values

STORAGE_DTYPES = {"fp8": E4M3, "bf16": torch.bfloat16, "fp32": torch.float32}
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KEEP = -1  # page id that stands for the keep buffer in a view's unit list


class KeyUnit(NamedTuple):
    """Keys that share one temporal slot and one quantization: a page or the keep buffer."""
    page: int       # page id, or KEEP
    position: int   # temporal slot
    tokens: int     # valid tokens


class CacheLayerView(NamedTuple):
    """What the attention op reads of one layer (tensors are the cache's own storage)."""
    k_pages: torch.Tensor   # [P, B, T, H, D] storage dtype, K minus the page mean (scaled)
    v_pages: torch.Tensor   # [P, B, T, H, D]
    k_scale: torch.Tensor   # [P, B, H] fp32
    k_mean: torch.Tensor    # [P, B, H, D] fp32
    v_scale: torch.Tensor   # [P, B, H, D] fp32
    keep_k: torch.Tensor    # [B, K, H, D]
    keep_v: torch.Tensor
    keep_k_scale: torch.Tensor  # [B, H]
    keep_k_mean: torch.Tensor   # [B, H, D]
    keep_v_scale: torch.Tensor  # [B, H, D]
    page_table: torch.Tensor    # [num_pages_in_use] int32, slot order
    units: tuple                # KeyUnit per slot in use, slot order
    num_slots: int              # temporal slots in use (the pass's frames come after)
    num_sinks: int              # sink pages in use (the first entries of page_table)
    keep_count: int             # tokens in the keep buffer (its slot follows the sinks when > 0)
    mass: torch.Tensor | None   # [P, B, T] int64 fixed point (MASS_SCALE), None when keep_tokens == 0
    mass_pages: tuple           # pages whose tokens' attention mass the op accumulates
    mass_units: tuple           # the same as (page-table index, temporal slot): fast kernels read the
                                # page from the device table, so a captured graph follows the ring
    storage: str
    rope_dims: int
    rope_theta: float


class StreamingKVCache:
    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, frame_tokens: int, *,
                 sink_frames: int = 1, window_frames: int = 8, keep_tokens: int = 0, storage: str = "fp8",
                 rope_dims: int | None = None, rope_theta: float = 10000.0, device="cpu", backend: str = "auto"):
        for name, value, low in (("num_layers", num_layers, 1), ("batch", batch, 1), ("heads", heads, 1),
                                 ("head_dim", head_dim, 1), ("frame_tokens", frame_tokens, 1),
                                 ("sink_frames", sink_frames, 0), ("window_frames", window_frames, 1),
                                 ("keep_tokens", keep_tokens, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        check_choice("storage", storage, tuple(STORAGE_DTYPES))
        rope_dims = temporal_rope_dims(head_dim) if rope_dims is None else rope_dims
        if not is_int(rope_dims) or not 0 <= rope_dims <= head_dim or rope_dims % 2:
            raise ValueError(f"rope_dims: expected an even int in [0, {head_dim}], got {rope_dims!r}")
        check_positive("rope_theta", rope_theta)
        check_backend(backend)
        device = check_device("device", device)
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.frame_tokens, self.sink_frames, self.window_frames = frame_tokens, sink_frames, window_frames
        self.keep_tokens, self.storage = keep_tokens, storage
        self.rope_dims, self.rope_theta = rope_dims, float(rope_theta)
        self.device = device
        self.backend = backend  # of the commit and compaction kernels

        pages = sink_frames + window_frames
        dtype, dev = STORAGE_DTYPES[storage], self.device
        page_shape = (num_layers, pages, batch, frame_tokens, heads, head_dim)
        self.k_pages = torch.zeros(page_shape, dtype=dtype, device=dev)
        self.v_pages = torch.zeros(page_shape, dtype=dtype, device=dev)
        self.k_scale = torch.ones(num_layers, pages, batch, heads, device=dev)
        self.k_mean = torch.zeros(num_layers, pages, batch, heads, head_dim, device=dev)
        self.v_scale = torch.ones(num_layers, pages, batch, heads, head_dim, device=dev)
        keep_shape = (num_layers, batch, keep_tokens, heads, head_dim)
        self.keep_k = torch.zeros(keep_shape, dtype=dtype, device=dev)
        self.keep_v = torch.zeros(keep_shape, dtype=dtype, device=dev)
        self.keep_k_scale = torch.ones(num_layers, batch, heads, device=dev)
        self.keep_k_mean = torch.zeros(num_layers, batch, heads, head_dim, device=dev)
        self.keep_v_scale = torch.ones(num_layers, batch, heads, head_dim, device=dev)
        self.keep_mass = torch.zeros(num_layers, batch, keep_tokens, device=dev)
        self.mass = (torch.zeros(num_layers, pages, batch, frame_tokens, dtype=torch.int64, device=dev)
                     if keep_tokens else None)
        self.page_table = torch.zeros(num_layers, pages, dtype=torch.int32, device=dev)
        # the device ring: ring_head[layer] is the ring position of the oldest window page, and
        # row h of _ring_tables is the full page table at ring position h (sinks, then the window)
        self.ring_head = torch.zeros(num_layers, dtype=torch.int64, device=dev)
        window = (torch.arange(window_frames)[:, None] + torch.arange(window_frames)[None, :]) % window_frames
        rows = torch.cat((torch.arange(sink_frames).expand(window_frames, -1), sink_frames + window), dim=1)
        self._ring_tables = rows.to(device=dev, dtype=torch.int32)
        self._ring_mode = False
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached frame (storage stays allocated)."""
        L = self.num_layers
        self._sinks = [0] * L            # sink pages in use (pages 0..sinks-1)
        self._window = [0] * L           # window pages in use
        self._head = [0] * L             # ring position of the oldest window page
        self._keep_count = [0] * L
        self._frames_seen = [0] * L
        self._lookahead = [1] * L        # frames per commit, seen last: pages next to evict
        self._frame_of_page = [[-1] * (self.sink_frames + self.window_frames) for _ in range(L)]
        self._ring_synced = False        # ring_head holds _head (set by sync_ring)
        self._read_only = False          # inside read_only(): views accumulate no attention mass
        self.keep_mass.zero_()
        if self.mass is not None:
            self.mass.zero_()

    @property
    def frames_seen(self) -> int:
        """Frames committed so far to layer 0 (evicted ones included)."""
        return self._frames_seen[0]

    def num_frames(self, layer: int) -> int:
        """Frames held in pages of `layer` now."""
        self._check_layer(layer)
        return self._sinks[layer] + self._window[layer]

    def _slot_pages(self, layer: int) -> list[int]:
        S, W = self.sink_frames, self.window_frames
        window = [S + (self._head[layer] + i) % W for i in range(self._window[layer])]
        return list(range(self._sinks[layer])) + window

    def cached_frames(self, layer: int = 0) -> list[int]:
        """Stream indices of the frames held by `layer`, in slot order (what `recache` rewrites)."""
        self._check_layer(layer)
        return [self._frame_of_page[layer][p] for p in self._slot_pages(layer)]

    def memory_bytes(self) -> int:
        """Bytes of device memory the cache holds; constant for the life of the cache."""
        tensors = [self.k_pages, self.v_pages, self.k_scale, self.k_mean, self.v_scale, self.keep_k,
                   self.keep_v, self.keep_k_scale, self.keep_k_mean, self.keep_v_scale, self.keep_mass,
                   self.page_table, self.ring_head, self._ring_tables] + ([self.mass] if self.mass is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- writing -----------------------------------------------------------------------------
    def _check_layer(self, layer) -> None:
        if not is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")

    def _check_frames(self, name: str, t, frames: int | None = None, dtype: torch.dtype | None = None) -> int:
        check_tensor(name, t, dtypes=INPUT_DTYPES if dtype is None else (dtype,), ndim=4, device=self.device,
                     unit_last_stride=True)
        B, L, H, D = t.shape
        T = self.frame_tokens
        if (B, H, D) != (self.batch, self.heads, self.head_dim) or L % T or L == 0:
            raise ValueError(f"{name}: expected shape [{self.batch}, n*{T}, {self.heads}, {self.head_dim}] "
                             f"(whole frames of this cache), got {tuple(t.shape)}")
        if frames is not None and L != frames * T:
            raise ValueError(f"{name}: expected {frames} frames ({frames * T} tokens), got {L} tokens")
        return L // T

    def commit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole frames of K/V (spatial rotary applied, temporal not) and append them.

        When the window is full, each new frame evicts the oldest non-sink frame; with
        `keep_tokens`, the evicted frame's highest-mass tokens are merged into the keep buffer.
        Inside `ring_commits()` the commit is a device-side ring rotation (see there). A commit
        that raises (bad input, a backend that cannot run) leaves the cache as it was.
        """
        self._check_layer(layer)
        n = self._check_frames("k", k)
        self._check_frames("v", v, n, dtype=k.dtype)
        if self._ring_mode:
            self._ring_commit(layer, k, v, n)
            self._assign_pages(layer, n, ring=True)  # the same pages, on the host's books
            return
        W, T = self.window_frames, self.frame_tokens
        for first in range(0, n, W):  # a page is evicted at most once per chunk, before it is written
            chunk = slice(first * T, min(n, first + W) * T)
            self._commit_chunk(layer, k[:, chunk], v[:, chunk])
        self._lookahead[layer] = n

    def _commit_chunk(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A host commit of at most window_frames frames. The commit kernel is resolved first (its
        supports hooks read the tensors, not the page ids), so one that cannot run raises before
        anything moves; the compaction kernel of a backend takes whatever cache storage its commit
        kernel takes (the same head_dim rule; the storage is the cache's own)."""
        write = resolve("kv_cache_commit", self.backend, self.device, self._commit_args(layer, k, v, None))
        pages, evicted = self._assign_pages(layer, k.shape[1] // self.frame_tokens)
        for page in evicted if self.keep_tokens else ():
            self._compact(layer, page)
        self._write_pages(layer, pages, k, v, write)
        if self.mass is not None:  # new frames start unweighed (recache keeps its frames' mass)
            self.mass[layer, pages] = 0
        self._update_page_table(layer)
        self._ring_synced = False

    def _assign_pages(self, layer: int, n: int, ring: bool = False) -> tuple[list[int], list[int]]:
        """Host bookkeeping of a commit of n <= window_frames frames to `layer`: the pages they go
        to, in order, and the pages evicted for them (oldest first), which a host commit merges
        into the keep buffer before writing; for `ring` commits, whose device work ran already,
        only the kept-token count is advanced."""
        S, W = self.sink_frames, self.window_frames
        pages, evicted = [], []
        for _ in range(n):
            if self._sinks[layer] < S:
                page = self._sinks[layer]
                self._sinks[layer] += 1
            elif self._window[layer] < W:
                page = S + (self._head[layer] + self._window[layer]) % W
                self._window[layer] += 1
            else:  # evict the oldest window page: its slot in the ring now holds the new frame
                page = S + self._head[layer]
                evicted.append(page)
                if self.keep_tokens and ring:
                    self._keep_count[layer] = min(self.keep_tokens, self._keep_count[layer] + self.frame_tokens)
                self._head[layer] = (self._head[layer] + 1) % W
            pages.append(page)
            self._frame_of_page[layer][page] = self._frames_seen[layer]
            self._frames_seen[layer] += 1
        self._lookahead[layer] = n
        return pages, evicted

    @contextlib.contextmanager
    def read_only(self):
        """Attention over the cache inside accumulates no attention mass (e.g. a drafter's passes,
        which the stream without drafting would not run)."""
        self._read_only, previous = True, self._read_only
        try:
            yield
        finally:
            self._read_only = previous

    def expect_commits(self, frames: int) -> None:
        """The next pass commits up to `frames` frames to each layer, in one commit or several (a
        speculative pass commits its block, then the drafts it accepts): the attention op then
        accumulates attention mass (for `keep_tokens`) on the `frames` oldest window pages, less
        the free pages those commits fill first: the ones they may evict. Without it, the next
        commit is taken to be as large as the last one."""
        if not is_int(frames) or frames < 1:
            raise ValueError(f"frames: expected an int >= 1, got {frames!r}")
        self._lookahead = [frames] * self.num_layers

    # ---- the device ring (CUDA-graph capturable commits) -------------------------------------
    def ring_unready(self, frames: int) -> str | None:
        """None when a commit of `frames` frames to every layer is a pure ring rotation (sinks and
        window full, and the keep buffer full when there is one: then how many tokens it keeps no
        longer changes), which `ring_commits()` runs on the device; else the reason."""
        if frames > self.window_frames:
            return f"a commit of {frames} frames is larger than the window ({self.window_frames} frames)"
        full = self.sink_frames + self.window_frames
        if any(self._sinks[i] + self._window[i] < full for i in range(self.num_layers)):
            return "warm-up: the cache (sinks and window) is not full yet"
        if any(count < self.keep_tokens for count in self._keep_count):
            return "warm-up: the keep buffer is not full yet"
        return None

    def sync_ring(self) -> None:
        """Bring the device ring position up to the host bookkeeping (a host-to-device copy, so it
        happens outside any capture; a no-op while only ring commits have run)."""
        if not self._ring_synced:
            self.ring_head.copy_(torch.tensor(self._head, dtype=torch.int64))
            self._ring_synced = True

    @contextlib.contextmanager
    def ring_commits(self):
        """Inside, the device side of every commit is a ring rotation by device ops only: the page
        ids come from the device ring position, which then advances, and the page table is
        rewritten from it (the host bookkeeping runs as for any commit). Needs
        `ring_unready(frames) is None` and `sync_ring()` first."""
        if not self._ring_synced:
            raise RuntimeError("ring_commits: call sync_ring() first (host commits ran since the last ring sync)")
        self._ring_mode = True
        try:
            yield
        finally:
            self._ring_mode = False

    def _ring_commit(self, layer: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        S, W = self.sink_frames, self.window_frames
        if n > W or self._sinks[layer] + self._window[layer] < S + W or self._keep_count[layer] < self.keep_tokens:
            raise RuntimeError(f"ring_commits: a commit of {n} frames to layer {layer} is not a pure ring rotation "
                               f"(ring_unready: {self.ring_unready(n)}); commit it outside ring_commits()")
        head = self.ring_head[layer:layer + 1]
        order = self._ring_tables.index_select(0, head)[0]  # the page table now, the window oldest first
        evicted = order[S:S + n]  # the n oldest pages, which the new frames overwrite
        if self.keep_tokens:
            for i in range(n):  # oldest first, as host commits merge them
                self._compact_ring(layer, evicted[i:i + 1])
        kv_cache_commit(k, v, self.k_pages[layer], self.v_pages[layer], self.k_scale[layer], self.k_mean[layer],
                        self.v_scale[layer], evicted, backend=self.backend)
        if self.mass is not None:
            self.mass[layer].index_fill_(0, evicted.long(), 0)
        head.add_(n).remainder_(self.window_frames)
        torch.index_select(self._ring_tables, 0, head, out=self.page_table[layer:layer + 1])

    def advance_ring_mirror(self, frames: int) -> None:
        """The host bookkeeping of ring commits of `frames` frames to every layer that ran on the
        device without Python (a replayed graph), so cached_frames(), frames_seen and view() stay true."""
        for layer in range(self.num_layers):
            self._assign_pages(layer, frames, ring=True)

    @contextlib.contextmanager
    def frozen_mirror(self):
        """The host bookkeeping as it was on entry, again on exit: a CUDA graph capture runs the
        Python of its commits, but none of their device work."""
        saved = copy.deepcopy((self._sinks, self._window, self._head, self._keep_count, self._frames_seen,
                               self._lookahead, self._frame_of_page))
        try:
            yield
        finally:
            (self._sinks, self._window, self._head, self._keep_count, self._frames_seen, self._lookahead,
             self._frame_of_page) = saved

    def recache(self, frames: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Overwrite the cached frames in place with re-encoded K/V (e.g. under a new prompt).

        `frames[layer] = (k, v)`, each `[B, num_frames(layer) * T, H, D]` in slot order. The
        geometry, the page table, the keep buffer and the attention mass the frames received
        (the next evictions keep tokens by it) are unchanged.
        """
        if not isinstance(frames, (tuple, list)):
            raise TypeError(f"frames: expected a list of (k, v) pairs, one per layer ({self.num_layers}), got "
                            f"{type(frames).__name__}")
        if len(frames) != self.num_layers:
            raise ValueError(f"frames: expected one (k, v) pair per layer ({self.num_layers}), got {len(frames)}")
        writes = []  # every layer checked, and its kernel resolved, before any is rewritten
        for layer, pair in enumerate(frames):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"frames[{layer}]: expected a (k, v) pair, got {type(pair).__name__}")
            k, v = pair
            pages = self._slot_pages(layer)
            if pages:
                self._check_frames(f"frames[{layer}][0]", k, len(pages))
                self._check_frames(f"frames[{layer}][1]", v, len(pages), dtype=k.dtype)
                write = resolve("kv_cache_commit", self.backend, self.device, self._commit_args(layer, k, v, None))
                writes.append((layer, pages, k, v, write))
        for write in writes:
            self._write_pages(*write)

    def _commit_args(self, layer: int, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor | None) -> tuple:
        return (k, v, self.k_pages[layer], self.v_pages[layer], self.k_scale[layer], self.k_mean[layer],
                self.v_scale[layer], ids)

    def _write_pages(self, layer: int, pages: list[int], k: torch.Tensor, v: torch.Tensor, write) -> None:
        """Frame i of k/v into page pages[i], by the kv_cache_commit implementation `write` resolved
        for these arguments (checked by _check_frames; the storage is the cache's own)."""
        ids = torch.tensor(pages, dtype=torch.int32, device=self.device)
        write.fn(*self._commit_args(layer, k, v, ids))

    def _keep_buffer(self, layer: int) -> tuple:
        return (self.keep_k[layer], self.keep_v[layer], self.keep_k_scale[layer], self.keep_k_mean[layer],
                self.keep_v_scale[layer])

    def _compact(self, layer: int, page: int) -> None:
        keep = self._keep_buffer(layer)
        evicted = (self.k_pages[layer, page], self.v_pages[layer, page], self.k_scale[layer, page],
                   self.k_mean[layer, page], self.v_scale[layer, page])
        self._keep_count[layer] = kv_cache_compact(keep, self.keep_mass[layer], self._keep_count[layer], evicted,
                                                   mass_values(self.mass[layer, page]), backend=self.backend)

    def _compact_ring(self, layer: int, page: torch.Tensor) -> None:
        """_compact with the evicted page given as a device index: its storage is gathered by
        device ops (a copy of one page), and the full keep buffer keeps its size."""
        keep = self._keep_buffer(layer)
        index = page.long()
        evicted = tuple(t[layer].index_select(0, index)[0] for t in
                        (self.k_pages, self.v_pages, self.k_scale, self.k_mean, self.v_scale))
        kv_cache_compact(keep, self.keep_mass[layer], self.keep_tokens, evicted,
                         mass_values(self.mass[layer].index_select(0, index)[0]), backend=self.backend)

    def _update_page_table(self, layer: int) -> None:
        pages = self._slot_pages(layer)
        self.page_table[layer, :len(pages)] = torch.tensor(pages, dtype=torch.int32)

    # ---- reading -----------------------------------------------------------------------------
    def keep_count(self, layer: int) -> int:
        self._check_layer(layer)
        return self._keep_count[layer]

    def view(self, layer: int) -> CacheLayerView:
        """The read-only view of `layer` the attention op consumes."""
        self._check_layer(layer)
        T = self.frame_tokens
        pages = self._slot_pages(layer)
        sinks = self._sinks[layer]
        units = [KeyUnit(p, i, T) for i, p in enumerate(pages[:sinks])]
        if self._keep_count[layer]:
            units.append(KeyUnit(KEEP, len(units), self._keep_count[layer]))
        units += [KeyUnit(p, len(units) + i, T) for i, p in enumerate(pages[sinks:])]
        window = pages[sinks:]
        weighed = self.mass is not None and not self._read_only
        # only pages the expected commits would evict: frames that fill free sink or window pages
        # evict nothing, and mass weighed while warming up would let the first evicted page's
        # tokens (weighed by every pass until the window filled) crowd the keep buffer for good
        free = self.sink_frames + self.window_frames - len(pages)
        mass_pages = tuple(window[:max(0, self._lookahead[layer] - free)]) if weighed else ()
        first = len(units) - len(window)  # the slot of the oldest window page
        mass_units = tuple((sinks + i, first + i) for i in range(len(mass_pages)))
        return CacheLayerView(
            self.k_pages[layer], self.v_pages[layer], self.k_scale[layer], self.k_mean[layer],
            self.v_scale[layer], self.keep_k[layer], self.keep_v[layer], self.keep_k_scale[layer],
            self.keep_k_mean[layer], self.keep_v_scale[layer], self.page_table[layer, :len(pages)],
            tuple(units), len(units), sinks, self._keep_count[layer],
            self.mass[layer] if weighed else None, mass_pages, mass_units,
            self.storage, self.rope_dims, self.rope_theta)

    def __repr__(self) -> str:
        return (f"StreamingKVCache(layers={self.num_layers}, batch={self.batch}, heads={self.heads}, "
                f"head_dim={self.head_dim}, frame_tokens={self.frame_tokens}, sinks={self.sink_frames}, "
                f"window={self.window_frames}, keep_tokens={self.keep_tokens}, storage={self.storage!r}, "
                f"frames_seen={self.frames_seen}, bytes={self.memory_bytes()})")
