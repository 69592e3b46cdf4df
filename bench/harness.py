"""The one benchmark framework: environment capture, timers, figures, results files.

Every figure is a dict with the median and the spread (min, max) of repeated measurements;
GPU timings use CUDA events around the region after a warm-up, rotating over several input
sets so that L2 does not flatter. `XJFAST_BENCH_DEVICE=cpu` runs the same harness on tiny shapes
with the reference backend (what CI does, so that the harness never rots).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager

import torch


def bench_device() -> torch.device:
    wanted = os.environ.get("XJFAST_BENCH_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def summary(samples_ms: list[float], **extra) -> dict:
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "max_ms": max(samples_ms),
            "samples": len(samples_ms), **extra}


def time_ms(fn, inputs: list, device: torch.device, *, warmup: int = 3, reps: int = 20) -> dict:
    """Median/min/max milliseconds of fn(*inputs[i % len(inputs)]) over `reps` calls."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    samples = []
    if on_gpu(device):
        torch.cuda.synchronize(device)
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            samples.append(1e3 * (time.perf_counter() - t))
    return summary(samples)


def rate(timing: dict, amount: float, unit: str, ceiling: float | None = None) -> dict:
    """Add `unit` figures (amount per second at the median, best and worst time) to a timing."""
    scale = 1e3
    out = dict(timing)
    out[unit] = amount / timing["median_ms"] * scale
    out[f"{unit}_best"] = amount / timing["min_ms"] * scale
    out[f"{unit}_worst"] = amount / timing["max_ms"] * scale
    if ceiling:
        out["fraction_of_ceiling"] = out[unit] / ceiling
    return out


def accuracy(out: torch.Tensor, exact: torch.Tensor) -> dict:
    """Cosine similarity, relative L1/L2 and RMSE of out against a float64 reference."""
    o, e = out.double().flatten(), exact.double().flatten()
    return {"cosine": torch.nn.functional.cosine_similarity(o, e, dim=0).item(),
            "rel_l1": ((o - e).abs().sum() / e.abs().sum()).item(),
            "rel_l2": ((o - e).norm() / e.norm()).item(),
            "rmse": (o - e).pow(2).mean().sqrt().item()}


def _nvml(device: torch.device) -> dict:
    if not on_gpu(device):
        return {"name": platform.processor() or platform.machine(), "kind": "cpu", "cores": os.cpu_count()}
    info = {"name": torch.cuda.get_device_name(device), "kind": "cuda",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "multiprocessors": torch.cuda.get_device_properties(device).multi_processor_count}
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        info.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
            power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3,
            temperature_c=pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        pynvml.nvmlShutdown()
    except Exception as exc:  # NVML is optional: say why it is missing
        info["nvml"] = f"unavailable: {exc}"
    return info


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"device": _nvml(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "xjfast_commit": _commit(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def results_name(env: dict) -> str:
    gpu = env["device"]["name"].lower().replace("nvidia", "").strip().replace(" ", "-") or "cpu"
    day = env["date"][:10].replace("-", "")
    return f"{gpu}-{day}-{env['xjfast_commit']}"


def write_json(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


@contextmanager
def section(results: dict, name: str, log):
    """Run one benchmark section; an exception is recorded (and logged), not fatal to the run."""
    t = time.perf_counter()
    try:
        yield
        log(f"[{name}] done in {time.perf_counter() - t:.1f} s")
    except Exception as exc:  # a broken section must not lose the others' figures
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        log(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
