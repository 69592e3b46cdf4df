"""What `xjfast info` reports: versions, the GPU (through NVML), the archs compiled into
xjfast._C, which backends can run here — each with the reason when it cannot — and which one
`backend="auto"` runs for each op here, and on what grounds.

Never raises: whatever cannot be found is reported as absent, with why.
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from xjfast import __version__, _ext
from xjfast.backends import (BACKENDS, auto_order, backend_unavailable_reason, implementations, registered_ops,
                             unusable_reason)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpus() -> dict:
    """The GPUs NVML sees: name, compute capability, memory, driver; or none, with the reason."""
    try:
        import pynvml
    except ImportError:
        return {"gpus": [], "driver": None, "gpu_reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "driver": None, "gpu_reason": f"NVML could not start ({exc}): no NVIDIA driver or GPU here"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append({
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "compute_capability": (major, minor),
                "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2 ** 30, 1),
                # None when xjfast._C has SASS that runs on this GPU, else why not.
                "extension_reason": _ext.capability_reason((major, minor)),
            })
        return {"gpus": gpus, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "gpu_reason": None if gpus else "NVML sees no GPU"}
    except pynvml.NVMLError as exc:
        return {"gpus": [], "driver": None, "gpu_reason": f"NVML query failed ({exc})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _extension() -> dict:
    ext = _ext.extension()
    if ext is None:
        return {"extension_archs": [], "extension_cuda_runtime": None, "extension_reason": _ext.unavailable_reason()}
    runtime = ext.runtime_version()  # needs no driver: the runtime is linked into _C
    return {"extension_archs": _ext.built_archs(), "extension_cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "extension_reason": None}


def _backend_reason(name: str) -> str | None:
    try:
        return backend_unavailable_reason(name)
    except Exception as exc:  # a broken driver or torch install: report it, never crash `info`
        return f"checking it failed: {type(exc).__name__}: {exc}"


def _auto_picks() -> dict:
    """op -> {"backend": what auto runs here, "why": the grounds}, for every registered op."""
    picks = {}
    for op in registered_ops():
        try:
            if not torch.cuda.is_available():
                picks[op] = {"backend": "reference", "why": "no CUDA GPU: the reference"}
                continue
            capability = torch.cuda.get_device_capability()
            order, source = auto_order(op, capability)
            backend = next((b for b in order if b in implementations(op) and unusable_reason(op, b, "cuda") is None),
                           "reference")
            if op == "temporal_attention" and backend == "cuda":  # and its path (XJFAST_CUDA_ATTENTION_CORE)
                from xjfast.ops.temporal_attention import cuda_core
                backend = f"cuda[{cuda_core(torch.device('cuda'))}]"
            elif op == "temporal_attention" and backend == "triton":  # and its configuration
                from xjfast.kernels.temporal_attention import config, config_name
                backend = f"triton[{config_name(config(torch.device('cuda'), False))}]"
            grounds = (f"ranked by {source}" if source else
                       f"no benchmark ranking for compute capability {capability[0]}.{capability[1]}: default order")
            picks[op] = {"backend": backend, "why": grounds}
        except Exception as exc:  # a broken driver or torch install: report it, never crash `info`
            picks[op] = {"backend": None, "why": f"checking it failed: {type(exc).__name__}: {exc}"}
    return picks


def collect_info() -> dict:
    """Everything `xjfast info` shows, as a dict (the GPU part from NVML, not from torch)."""
    info = {
        "xjfast": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None for a CPU build
        "triton": _version("triton"),
    }
    info.update(_extension())
    info.update(_gpus())
    info["backends"] = {name: _backend_reason(name) for name in BACKENDS}
    info["auto"] = _auto_picks()
    return info


def format_info(info: dict) -> str:
    torch_cuda = f"built with CUDA {info['torch_cuda']}" if info["torch_cuda"] else "a CPU build"
    lines = [f"xjfast {info['xjfast']}  (python {info['python']}, torch {info['torch']} ({torch_cuda}), "
             f"triton {info['triton']})"]
    if info["gpus"]:
        for i, gpu in enumerate(info["gpus"]):
            major, minor = gpu["compute_capability"]
            runs = "xjfast._C runs on it" if gpu["extension_reason"] is None else "xjfast._C cannot run on it"
            lines.append(f"GPU {i}: {gpu['name']}, compute capability {major}.{minor}, {gpu['memory_gib']} GiB, "
                         f"driver {info['driver']} ({runs})")
    else:
        lines.append(f"GPU: none ({info['gpu_reason']})")
    if info["extension_archs"]:
        lines.append(f"xjfast._C: SASS for {', '.join('sm_' + a for a in info['extension_archs'])} "
                     f"(CUDA runtime {info['extension_cuda_runtime']}, linked statically)")
    else:
        lines.append(f"xjfast._C: absent ({info['extension_reason']})")
    for name, reason in info["backends"].items():
        lines.append(f"backend {name:9}: " + ("usable" if reason is None else f"unavailable: {reason}"))
    for op, pick in info["auto"].items():
        lines.append(f"auto {op}: {pick['backend']} ({pick['why']})")
    return "\n".join(lines)
