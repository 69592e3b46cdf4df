"""The machine's ceilings, measured in the same run as every kernel figure: device-to-device
copy bandwidth (bytes read + written), dense bf16 GEMM and FP8 GEMM (torch._scaled_mm) rates."""
from __future__ import annotations

import torch

from bench.harness import on_gpu, rate, time_ms


def measure(device: torch.device) -> dict:
    gpu = on_gpu(device)
    out = {}
    n = (1 << 28) if gpu else (1 << 24)  # bytes per buffer: 256 MiB, far beyond L2
    bufs = [(torch.empty(n, dtype=torch.uint8, device=device), torch.randint(0, 255, (n,), dtype=torch.uint8,
                                                                              device=device)) for _ in range(2)]
    out["copy"] = rate(time_ms(lambda d, s: d.copy_(s), bufs, device), 2 * n / 1e9, "GB/s")

    size = 8192 if gpu else 512
    dtype = torch.bfloat16 if gpu else torch.float32
    mats = [(torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype))
            for _ in range(2)]
    out["gemm_bf16" if gpu else "gemm_fp32_cpu"] = rate(time_ms(torch.mm, mats, device, reps=10),
                                                        2 * size ** 3 / 1e12, "TFLOP/s")
    if gpu and torch.cuda.get_device_capability(device) >= (8, 9):
        a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
        one = torch.ones((), device=device)
        fp8 = time_ms(lambda x, y: torch._scaled_mm(x, y, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                      [(a, b)], device, reps=10)
        out["gemm_fp8"] = rate(fp8, 2 * size ** 3 / 1e12, "TFLOP/s")
    else:
        out["gemm_fp8"] = {"skipped": "no FP8 tensor cores here (needs a GPU of compute capability >= 8.9)"}
    return out
