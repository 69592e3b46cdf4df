"""Sigma schedules of the step loop (rectified flow with Wan's shift)."""
from __future__ import annotations

from xjfast.errors import check_positive, is_int

MASK64 = 2 ** 64 - 1


def shifted_sigmas(steps: int, shift: float = 5.0) -> list[float]:
    """steps + 1 sigmas from 1 to 0: t = 1 - k/steps warped by shift*t / (1 + (shift-1)*t)."""
    if not is_int(steps) or not 1 <= steps <= 4:
        raise ValueError(f"steps: expected an int in [1, 4], got {steps!r}")
    check_positive("shift", shift)
    ts = [1 - k / steps for k in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts] + [0.0]


def step_seed(seed: int, step: int) -> int:
    """Philox key of the noise drawn at `step` (0: the initial noise; k: the re-noise after step k),
    so that every frame's noise is fixed by (seed, frame index, step) alone."""
    return (seed * 0x9E3779B97F4A7C15 + step) & MASK64
