"""Calling xjfast._C: raw pointers, sizes, strides and the current CUDA stream (no libtorch)."""
from __future__ import annotations

import torch

from xjfast import _ext

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}


def extension():
    ext = _ext.extension()
    if ext is None:  # resolve() checked this already; a direct call gets the reason too
        raise RuntimeError(_ext.unavailable_reason())
    return ext


def aligned_16(t: torch.Tensor, *, unit_dims: bool = True) -> bool:
    """The kernels' 16-byte vector accesses can read `t`: its address, and the stride of every
    dimension but the last (unit_dims False: of those longer than 1), are multiples of 16 bytes."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
                                          for s, n in zip(t.stride()[:-1], t.shape[:-1]) if unit_dims or n > 1)


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
