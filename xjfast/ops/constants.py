"""Small constant device tensors, built once per value and kept: a CUDA graph that captured a
kernel reading one of them keeps a valid pointer, and no step pays a host-to-device copy for them."""
from __future__ import annotations

from typing import Callable

import torch

_CACHE: dict = {}


def device_constant(key: tuple, device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor `build()` (on the CPU) moved to `device`, built the first time `key` is asked for."""
    full_key = key + (str(torch.device(device)),)
    if full_key not in _CACHE:
        _CACHE[full_key] = build().to(device)
    return _CACHE[full_key]


def device_tuple(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` on `device`, built once per value."""
    return device_constant(("tuple", values, dtype), device, lambda: torch.tensor(values, dtype=dtype))
