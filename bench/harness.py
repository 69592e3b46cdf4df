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
import traceback
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
    """Median/min/max milliseconds of fn(*inputs[i % len(inputs)]) over `reps` calls, and the host
    time one call takes to issue its work (`host_ms`: what a CUDA graph would save)."""
    host = []
    for i in range(warmup):
        t = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        host.append(1e3 * (time.perf_counter() - t))
    if on_gpu(device):
        return summary(_device_samples(fn, inputs, device, reps, statistics.median(host[1:] or host)),
                       host_ms=statistics.median(host[1:] or host))
    samples = []
    for i in range(reps):
        t = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        samples.append(1e3 * (time.perf_counter() - t))
    return summary(samples)


FLUSH_BYTES = 1 << 28  # 256 MiB: beyond any L2 (50 MB on H100, 126 MB on B200)
MAX_HOLD_S = 1.0


def _device_samples(fn, inputs, device, reps: int, host_ms: float) -> list[float]:
    """Device milliseconds per call from CUDA events around each call. Before each call the L2 is
    flushed (small inputs would otherwise be read from L2 and flatter bandwidth figures), and the
    stream is first held by a spin kernel long enough for the host to queue every call, so that
    the events time the device's work, not Python's launch overhead."""
    # freed on return: a buffer kept for the process would count in the stream's peak memory
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    # events and the spin kernel go to the current device's stream: make it `device` (cuda:1...)
    with torch.cuda.device(device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(device)
        hold_s = min(MAX_HOLD_S, 1.5 * reps * (host_ms + 0.05) / 1e3)  # + the flush's own launch
        torch.cuda._sleep(int(hold_s * _sm_clock_hz(device)))
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn(*inputs[i % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _sm_clock_hz(device: torch.device) -> float:
    """The SM clock torch reports (kHz in its properties), else 2 GHz: only sizes the hold."""
    khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0)
    return 1e3 * khz if khz else 2e9


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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's `device`, matched by UUID (NVML and CUDA may number GPUs
    differently, e.g. under CUDA_VISIBLE_DEVICES), else by index."""
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else torch.cuda.current_device())


# What NVML tells of the card's state; each read on its own, as some are refused on some machines.
_NVML_READINGS = {
    "sm_clock_mhz": lambda n, h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
    "mem_clock_mhz": lambda n, h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
    "power_w": lambda n, h: n.nvmlDeviceGetPowerUsage(h) / 1e3,
    "temperature_c": lambda n, h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
    "clock_event_reasons": lambda n, h: hex(n.nvmlDeviceGetCurrentClocksEventReasons(h)),
}
_NVML_FIXED = {
    "driver": lambda n, h: _text(n.nvmlSystemGetDriverVersion()),
    "max_sm_clock_mhz": lambda n, h: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM),
    "max_mem_clock_mhz": lambda n, h: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_MEM),
    "power_limit_w": lambda n, h: n.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3,
    "memory_gib": lambda n, h: round(n.nvmlDeviceGetMemoryInfo(h).total / 2 ** 30, 1),
}


def nvml_readings(device: torch.device, fixed: bool = False) -> dict:
    """Clocks, power and temperature now (and with `fixed`, the driver and limits) from NVML;
    NVML is optional: what cannot be read says why."""
    if not on_gpu(device):
        return {}
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:  # not installed, or no driver library: the figures stand without it
        return {"nvml": f"unavailable: {type(exc).__name__}: {exc}"}
    out, failed = {}, {}
    try:
        handle = _nvml_handle(pynvml, device)
        for key, read in ({**_NVML_FIXED, **_NVML_READINGS} if fixed else _NVML_READINGS).items():
            try:
                out[key] = read(pynvml, handle)
            except Exception as exc:  # one refused reading must not hide the others
                failed[key] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        failed["handle"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if failed:
        out["nvml_failed"] = failed
    return out


def _device_info(device: torch.device) -> dict:
    if not on_gpu(device):
        return {"name": platform.processor() or platform.machine(), "kind": "cpu", "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "kind": "cuda", "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "l2_bytes": getattr(props, "L2_cache_size", None)}
    info.update(nvml_readings(device, fixed=True))
    return info


def _commit(root: str = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) -> str:
    """XJFAST_COMMIT when set (a copy of a checkout without its .git, as a GPU machine gets, says so
    through it); else the checkout's commit, "-dirty" when tracked files differ from it (the
    figures are not that commit's); for an installed package (no checkout of ours around it), its
    version."""
    if os.environ.get("XJFAST_COMMIT"):
        return os.environ["XJFAST_COMMIT"]
    if os.path.isfile(os.path.join(root, "setup.py")):
        try:
            def git(*args):
                return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout
            # content only: a copied work tree (a GPU machine's) may not keep the files' modes
            dirty = git("-c", "core.fileMode=false", "status", "--porcelain", "--untracked-files=no").strip()
            return git("rev-parse", "--short=10", "HEAD").strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    import xjfast
    return f"v{xjfast.__version__}"


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    from xjfast import _ext
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"device": _device_info(device), "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "triton": version("triton"), "diffusers": version("diffusers"), "xjfast_commit": _commit(),
            "xjfast_C_archs": _ext.built_archs(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def results_name(env: dict) -> str:
    gpu = env["device"]["name"].lower().replace("nvidia", "").strip().replace(" ", "-") or "cpu"
    day = env["date"][:10].replace("-", "")
    return f"{gpu}-{day}-{env['xjfast_commit']}"


def write_json(path: str, results: dict) -> None:
    """Written whole or not at all: a run killed mid-write keeps the previous complete file."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def error_text(exc: BaseException) -> str:
    """The exception's type and first line, short enough for a results row."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


class ContextLost(RuntimeError):
    """A sticky CUDA error (an illegal address, a kernel that trapped) broke this process's CUDA
    context: nothing more runs on the GPU in it. `leave_out`: what was running, for the process the
    run goes on in (XJFAST_DISABLE's "op:backend", or "path:NAME" for XJFAST_CUDA_ATTENTION_SKIP);
    None when it was not one of xjfast's implementations."""

    def __init__(self, where: str, error: str, leave_out: str | None = None):
        super().__init__(f"the CUDA context was lost at {where}: {error}")
        self.leave_out = leave_out


def leave_out_name(op: str, backend: str, path: str | None = None) -> str | None:
    """ContextLost's `leave_out` for `op` on `backend` (on CUDA attention path `path`); None for the
    reference, which defines the op and cannot be left out."""
    if path:
        return f"path:{path}"
    return None if backend == "reference" else f"{op}:{backend}"


def context_error(device: torch.device | None = None) -> str | None:
    """None while the CUDA context of `device` (default: the current one) works, or when CUDA was
    never started; else the sticky error it now reports. An out-of-memory error or a bad argument
    leaves the context working: only a fault that ends every later launch counts."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized() or (device is not None and not on_gpu(device)):
        return None
    try:  # a sticky error is returned by every CUDA call after it
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 -- whatever it says, nothing launched here can be trusted
        return error_text(exc)
    return None


def fail_if_context_lost(device: torch.device, where: str, leave_out: str | None = None) -> None:
    """Called after a figure failed: raises ContextLost when the failure broke the CUDA context, so
    that the section ends there instead of recording the same error for every figure after it."""
    if (error := context_error(device)) is not None:
        raise ContextLost(where, error, leave_out)


@contextmanager
def section(results: dict, name: str, log):
    """Run one benchmark section; an exception is recorded (and logged), not fatal to the run."""
    t = time.perf_counter()
    try:
        yield
        log(f"[{name}] done in {time.perf_counter() - t:.1f} s")
    except Exception as exc:  # a broken section must not lose the others' figures
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        log(f"[{name}] FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


@contextmanager
def environ(name: str, value: str | None):
    """os.environ[name] = value while the block runs (None: leave it as it is)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def cuda_attention_core(core):
    """XJFAST_CUDA_ATTENTION_CORE=core while the block runs (None: leave it as it is)."""
    return environ("XJFAST_CUDA_ATTENTION_CORE", core)
