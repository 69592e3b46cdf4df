"""Speculative next-frame drafting: drafters, and the depth controller of speculate="auto".

A drafter proposes the next latent frames cheaply; the generator then denoises k frames in one
batched pass [clean last | noisy next | clean draft 1 | noisy next+1 | ...] (noisy blocks
private) and keeps the longest prefix of drafts that the model's own outputs confirm.
"""
from __future__ import annotations

import collections
import statistics
from typing import Callable

import torch

MAX_DEPTH = 4


def hold(history: list, count: int, **_) -> list:
    """Repeat the last frame."""
    return [history[-1]] * count


def extrapolate(history: list, count: int, **_) -> list:
    """Linear motion in latent space from the last two frames (hold with one)."""
    if len(history) < 2:
        return hold(history, count)
    last, step = history[-1], history[-1] - history[-2]
    return [last + (j + 1) * step for j in range(count)]


def parse_drafter(drafter) -> tuple[str, Callable | int | None]:
    """("hold" | "extrapolate" | "shallow" | "callable", detail) from the user's argument."""
    if callable(drafter):
        return "callable", drafter
    if drafter in ("hold", "extrapolate"):
        return drafter, None
    if isinstance(drafter, str) and drafter.startswith("shallow:") and drafter[8:].isdigit() and int(drafter[8:]) > 0:
        return "shallow", int(drafter[8:])
    raise ValueError(f"drafter: expected 'hold', 'extrapolate', 'shallow:L' (L >= 1 blocks) or a callable, "
                     f"got {drafter!r}")


class DepthController:
    """Picks the speculation depth with the most frames per second from measured pass times and
    the running draft-acceptance rate; depth 1 (no speculation) is always a candidate. A fixed
    depth still runs a plain pass now and then (one in explore_every), the baseline of speedup()."""

    def __init__(self, fixed: int | None, max_depth: int = MAX_DEPTH, explore_every: int = 32):
        self.fixed, self.max_depth, self.explore_every = fixed, max_depth, explore_every
        self.pass_s = collections.defaultdict(lambda: collections.deque(maxlen=16))
        self.judged = self.accepted = self.passes = 0

    def acceptance(self) -> float | None:
        """The probability that a draft is accepted given the ones before it were (None before any
        draft was judged): drafts after the first rejected one are never judged, so not counted."""
        return self.accepted / self.judged if self.judged else None

    def expected_frames(self, depth: int) -> float:
        p = self.acceptance() or 0.0
        return sum(p ** i for i in range(depth))

    def frames_per_second(self, depth: int) -> float | None:
        times = self.pass_s.get(depth)  # the median: a pass that compiled or captured a graph is an outlier
        return self.expected_frames(depth) / statistics.median(times) if times else None

    def choose(self) -> int:
        if self.fixed is not None:
            baseline = not self.pass_s.get(1) or self.passes % self.explore_every == self.explore_every - 1
            return 1 if self.fixed > 1 and baseline else self.fixed
        unmeasured = [d for d in range(1, self.max_depth + 1) if not self.pass_s.get(d)]
        if unmeasured:
            return unmeasured[0]
        if self.passes % self.explore_every == self.explore_every - 1:  # re-measure now and then
            return 1 + (self.passes // self.explore_every) % self.max_depth
        return max(range(1, self.max_depth + 1), key=self.frames_per_second)

    def record(self, depth: int, seconds: float, accepted: int) -> None:
        """A pass of `depth` frames (depth - 1 drafts) that took `seconds` and accepted `accepted` drafts."""
        self.pass_s[depth].append(seconds)
        self.judged += accepted + (accepted < depth - 1)  # the first rejected draft was judged too
        self.accepted += accepted
        self.passes += 1

    def best(self) -> int:
        measured = [d for d in range(1, self.max_depth + 1) if self.pass_s.get(d)]
        return max(measured, key=self.frames_per_second) if measured else 1

    def speedup(self) -> float | None:
        """Frames per second of the depth the stream runs (a fixed one, even if slower than plain
        passes; else the best measured) over those of plain passes."""
        depth = self.best() if self.fixed is None else self.fixed
        fps, base = self.frames_per_second(depth), self.frames_per_second(1)
        return fps / base if fps and base else None


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
