"""The machine's ceilings, measured in the same run as every kernel figure: device-to-device
copy bandwidth (bytes read + written), dense bf16 GEMM and FP8 GEMM (torch._scaled_mm) rates.
Each ceiling is measured on its own: one that cannot be measured says why, the others stand."""
from __future__ import annotations

import torch

from .harness import error_text, on_gpu, rate, time_ms


def _copy(device, gpu: bool) -> dict:
    n = (1 << 28) if gpu else (1 << 24)  # bytes per buffer: 256 MiB, far beyond L2
    bufs = [(torch.empty(n, dtype=torch.uint8, device=device),
             torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)) for _ in range(2)]
    return rate(time_ms(lambda d, s: d.copy_(s), bufs, device), 2 * n / 1e9, "GB/s")


def _gemm(device, size: int, dtype) -> dict:
    mats = [(torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype))
            for _ in range(2)]
    return rate(time_ms(torch.mm, mats, device, reps=10), 2 * size ** 3 / 1e12, "TFLOP/s")


def _gemm_fp8(device, size: int, fast_accum: bool) -> dict:
    """torch._scaled_mm with per-tensor scales (float32 tensors holding one value): the first
    operand row-major, the second column-major (what cuBLASLt's FP8 GEMM takes)."""
    mats = []
    for _ in range(2):
        a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()
        mats.append((a, b))
    one = torch.ones((), device=device, dtype=torch.float32)
    timing = time_ms(lambda x, y: torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                    use_fast_accum=fast_accum), mats, device, reps=10)
    return dict(rate(timing, 2 * size ** 3 / 1e12, "TFLOP/s"), use_fast_accum=fast_accum)


def measure(device: torch.device) -> dict:
    gpu = on_gpu(device)
    size = 8192 if gpu else 512
    steps = {"copy": lambda: _copy(device, gpu)}
    if gpu:
        steps["gemm_bf16"] = lambda: _gemm(device, size, torch.bfloat16)
        if torch.cuda.get_device_capability(device) >= (8, 9):
            # the ceiling is the faster accumulation mode; the exact one is what fp32-accumulating kernels face
            steps["gemm_fp8"] = lambda: _gemm_fp8(device, size, fast_accum=True)
            steps["gemm_fp8_exact_accum"] = lambda: _gemm_fp8(device, size, fast_accum=False)
        else:
            steps["gemm_fp8"] = lambda: {"skipped": "no FP8 tensor cores here (needs compute capability >= 8.9)"}
    else:
        steps["gemm_fp32_cpu"] = lambda: _gemm(device, size, torch.float32)
    out = {}
    for name, step in steps.items():
        try:
            out[name] = step()
        except Exception as exc:  # e.g. a torch whose _scaled_mm wants other arguments: say so
            out[name] = {"error": error_text(exc)}
        if gpu:
            torch.cuda.empty_cache()
    return out
