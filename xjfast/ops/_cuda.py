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


# csrc/kv_cache_{commit,compact}.cu: kStageBytes (160 KiB) of staged rows beside static shared
# memory (the compaction's 21.5 KiB is the larger), allowed per kernel once per device; sm_90 and
# sm_100 give a block 227 KiB
CACHE_KERNEL_SHARED_BYTES = 182 << 10


def shared_memory_reason(device: torch.device) -> str | None:
    """Why the CUDA cache kernels cannot run on `device` (a GPU that gives a block less shared
    memory than they set aside, e.g. sm_120's 99 KiB), or None."""
    if device.type != "cuda":
        return None
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if optin is not None and optin < CACHE_KERNEL_SHARED_BYTES:
        return (f"the CUDA kernel sets aside {CACHE_KERNEL_SHARED_BYTES >> 10} KiB of shared memory per block, "
                f"this GPU allows {optin >> 10} KiB (backend='triton' runs it)")
    return None


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
