"""Where a stream step's time goes: device time per kernel family over a few steady passes, from
torch.profiler, so that a frame rate short of its target says what is in the way (attention, the
GEMMs, the memory-bound ops, or the rest) without a second GPU run under Nsight.

On a GPU every kernel, copy and memset the device ran is counted, those a CUDA graph replays
included (the profiler sees the graph's kernels, not the ops that launched them: hence families
by kernel name). On the CPU (the harness checking itself) each op's own CPU time is counted
instead, by op name: the reference attention's products then count as GEMMs.
"""
from __future__ import annotations

import re

import torch
from torch.autograd import DeviceType

# (family, pattern of the lower-cased kernel or op name); the first that matches names it.
FAMILIES = (
    ("temporal_attention", r"temporal_attention|attention_combine|attention_mass"),
    ("kv_cache", r"kv_cache_(commit|compact)"),
    ("denoise_step", r"denoise_step"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|xmma|^aten::(mm|addmm|bmm|baddbmm)$"),
    ("torch_attention", r"flash|fmha|sdpa|attention"),  # torch SDPA: the cross-attention
    ("copy", r"memcpy|memset|copy"),
)
DEVICE_ACTIVITIES = {"kernel", "gpu_memcpy", "gpu_memset"}
TOP_KERNELS = 12
NAME_CHARS = 160  # a templated CUDA kernel's name runs to thousands of characters


def kernel_family(name: str) -> str:
    lower = name.lower()
    return next((family for family, pattern in FAMILIES if re.search(pattern, lower)), "other")


def _timed(prof, gpu: bool) -> list[tuple[str, float]]:
    """(name, milliseconds) of each device activity (GPU) or each op's self time (CPU)."""
    if not gpu:
        return [(e.key, e.self_cpu_time_total / 1e3) for e in prof.events() if e.device_type == DeviceType.CPU]
    out = []
    for e in prof.profiler.kineto_results.events():
        kind = e.activity_type() if hasattr(e, "activity_type") else \
            "kernel" if e.device_type() == DeviceType.CUDA else "cpu_op"
        if kind in DEVICE_ACTIVITIES:
            out.append((e.name(), e.duration_ns() / 1e6))
    return out


def breakdown(timed: list[tuple[str, float]], passes: int) -> dict:
    """Milliseconds and launches per pass, by family (largest first, with its share) and for the
    kernels that take most."""
    per_name: dict = {}
    for name, ms in timed:
        total = per_name.setdefault(name, [0.0, 0])
        total[0] += ms
        total[1] += 1
    total_ms = sum(ms for ms, _ in per_name.values())
    families: dict = {}
    for name, (ms, _) in per_name.items():
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + ms
    top = sorted(per_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {"passes": passes, "ms_per_pass": total_ms / passes, "launches_per_pass": len(timed) / passes,
            "families": {f: {"ms_per_pass": ms / passes, "share": ms / total_ms if total_ms else 0.0}
                         for f, ms in sorted(families.items(), key=lambda item: -item[1])},
            "top": [{"name": name[:NAME_CHARS], "family": kernel_family(name), "ms_per_pass": ms / passes,
                     "launches_per_pass": count / passes} for name, (ms, count) in top]}


def measure(step, device: torch.device, passes: int = 3) -> dict:
    """breakdown() of `passes` calls of `step()` (a steady pass of a warmed-up stream)."""
    from torch.profiler import ProfilerActivity, profile
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            step()
        if gpu:
            torch.cuda.synchronize(device)
    timed = _timed(prof, gpu)
    if not timed:
        return {"skipped": "the profiler recorded no kernels here (CUPTI unavailable?)"}
    return breakdown(timed, passes)
