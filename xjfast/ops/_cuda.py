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


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
