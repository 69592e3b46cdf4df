"""What `xjfast info` reports: versions, the GPU (through NVML), the archs compiled into
xjfast._C, and which backends can run here — each with the reason when it cannot."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from xjfast import __version__, _ext
from xjfast.backends import BACKENDS, backend_unavailable_reason


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> dict:
    try:
        import pynvml
    except ImportError:
        return {"gpus": [], "gpu_reason": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "gpu_reason": f"NVML could not start ({exc}): no NVIDIA driver or GPU here"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append({"name": name.decode() if isinstance(name, bytes) else name,
                         "compute_capability": f"{major}.{minor}", "memory_gib": round(memory / 2 ** 30, 1)})
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"gpus": gpus, "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "gpu_reason": None if gpus else "NVML sees no GPU"}
    finally:
        pynvml.nvmlShutdown()


def collect_info() -> dict:
    ext = _ext.extension()
    info = {
        "xjfast": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)", "triton": _version("triton"),
        "extension_archs": ext.built_archs() if ext else [], "extension_reason": _ext.unavailable_reason(),
        "backends": {name: backend_unavailable_reason(name) for name in BACKENDS},
    }
    info.update(_gpus())
    return info


def format_info(info: dict) -> str:
    lines = [f"xjfast {info['xjfast']}  (python {info['python']}, torch {info['torch']}, "
             f"CUDA {info['torch_cuda']}, triton {info['triton']})"]
    if info["gpus"]:
        for i, gpu in enumerate(info["gpus"]):
            lines.append(f"GPU {i}: {gpu['name']}, sm_{gpu['compute_capability'].replace('.', '')}, "
                         f"{gpu['memory_gib']} GiB (driver {info.get('driver')})")
    else:
        lines.append(f"GPU: none ({info['gpu_reason']})")
    if info["extension_archs"]:
        lines.append(f"xjfast._C: built for sm_{', sm_'.join(info['extension_archs'])}")
    else:
        lines.append(f"xjfast._C: absent ({info['extension_reason']})")
    for name, reason in info["backends"].items():
        lines.append(f"backend {name:9}: " + ("usable" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
