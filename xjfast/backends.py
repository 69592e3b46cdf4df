"""One small registry of op implementations and the rule that picks one.

Each op registers its implementations once, with the minimum compute capability they need.
`resolve(op, backend, device, args)` returns a callable or raises `BackendUnavailable` naming what
is missing; `backend="auto"` takes the first usable entry of the op's order on the GPU's compute
capability: the backends as the committed benchmark results rank them (backend_ranking.json,
written by `python -m bench.readme_tables`), then the rest in PREFERENCE order. An
implementation that covers only part of an op (say, FP8 precision only) declares `supports`: a
function of the call's arguments returning None or the reason it cannot take them; `auto` then
passes over it for those arguments, and an explicit request gets the reason.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from xjfast import _ext
from xjfast.errors import BackendUnavailable, check_choice

BACKENDS = ("reference", "triton", "cuda")
# The order `auto` tries where no committed benchmark result ranks an op's backends on a GPU's
# compute capability: the Triton kernels (held to the reference on a GPU and in the interpreter)
# before the CUDA ones, the reference last.
PREFERENCE = ("triton", "cuda", "reference")
RANKING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_ranking.json")


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    min_capability: tuple[int, int] = (0, 0)
    supports: Callable[..., str | None] | None = None  # (*args) -> None, or why these args are not covered


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, *, min_capability: tuple[int, int] = (0, 0),
             supports: Callable[..., str | None] | None = None):
    """Decorator: record `fn` as the `backend` implementation of `op`."""
    check_choice("backend", backend, BACKENDS)

    def wrap(fn: Callable) -> Callable:
        run = fn if backend == "reference" else _on_tensors_device(fn)
        _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, run, min_capability, supports)
        return fn

    return wrap


def _first_cuda_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda:
                return a.device
        elif isinstance(a, (tuple, list)) and (device := _first_cuda_device(a)) is not None:
            return device
    return None


def _on_tensors_device(fn: Callable) -> Callable:
    """`fn` run with the GPU of its tensors current: the kernels launch on the current device's
    stream (Triton's launcher and xjfast._C alike), and torch makes a tensor's GPU current only
    inside its own ops, so a call on cuda:1 while cuda:0 is current would launch on the wrong one."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _first_cuda_device(args)
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _major_minor(version: str) -> tuple[int, int]:
    """ "3.6.0" -> (3, 6), "2.4.0rc1" -> (2, 4); (0, 0) for what does not start with two numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


OLDEST_TRITON = (3, 6)  # the oldest Triton the kernels are tested with (torch 2.10 and 2.11 pin 3.6.0)


def _installed_triton() -> str:
    import triton
    return triton.__version__


def triton_version_reason(triton_version: str | None = None) -> str | None:
    """Why this Triton cannot run xjfast's kernels, or None: one older than OLDEST_TRITON (the
    Triton of a torch older than 2.10) lacks language features they use."""
    triton_version = triton_version or _installed_triton()
    if (0, 0) < _major_minor(triton_version) < OLDEST_TRITON:
        oldest = ".".join(map(str, OLDEST_TRITON))
        return (f"Triton {triton_version} is older than {oldest}, the oldest xjfast's kernels run on "
                f"(torch >= 2.10 brings it; pip install 'triton>={oldest}')")
    return None


def interpreter_numpy_reason(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels beside this NumPy, or None. Triton 3.6 and
    older hand a loop a bound held as a one-element array and call int() on it, which NumPy 2.4
    turned from a deprecation into an error: every kernel with a loop over a runtime bound fails
    inside Triton (torch 2.11 pins Triton 3.6)."""
    triton_version = triton_version or _installed_triton()
    if numpy_version is None:
        import numpy
        numpy_version = numpy.__version__
    if (0, 0) < _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) cannot run the kernels with "
                f"NumPy {numpy_version}: it needs Triton >= 3.7 or NumPy < 2.4")
    return None


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third dimensions (the interpreter has none)


def grid_reason(kernel: str, what: str, count: int) -> str | None:
    """Why a launch putting `count` programs (`what`) on a grid's second or third axis would fail on
    a GPU, or None: a supports() check, so auto passes over the kernel instead of failing."""
    if count > MAX_GRID_Y:
        return f"the {kernel} kernel puts {what} on a grid axis of at most {MAX_GRID_Y} programs, got {count}"
    return None


def heads_grid_reason(kernel: str, batch: int, heads: int) -> str | None:
    """grid_reason for the kernels that put batch x heads on a grid axis."""
    return grid_reason(kernel, f"batch x heads ({batch} x {heads})", batch * heads)


@functools.lru_cache(maxsize=None)
def _triton_kernels_installed() -> bool:
    """kernels/ becomes xjfast.kernels only by installing the package (setup.py's package_dir): a
    checkout on sys.path without it has the ops but not their Triton kernels."""
    return importlib.util.find_spec("xjfast.kernels") is not None


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """None if `backend` can run on `device` at all, else a sentence saying why not."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device) if device is not None else None
    if backend == "reference":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if (reason := triton_version_reason()) is not None:
            return reason
        if not _triton_kernels_installed():
            return ("xjfast.kernels is not installed (kernels/ installs as xjfast.kernels: pip install "
                    "--no-build-isolation -e . in the checkout)")
        if device is not None and device.type != "cuda" and not triton_interpreted():
            return f"Triton kernels need a CUDA device (got {device}); TRITON_INTERPRET=1 runs them on the CPU"
        if triton_interpreted() and (device is None or device.type != "cuda"):
            reason = interpreter_numpy_reason()
            if reason is not None:
                return reason
        # a CUDA device needs a GPU; no device at all, a GPU or the interpreter
        if not torch.cuda.is_available() and (device.type == "cuda" if device is not None else not triton_interpreted()):
            return "no CUDA GPU is visible to torch"
        return None
    # cuda
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if device is not None and device.type != "cuda":
        return f"the CUDA backend needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return _ext.capability_reason(torch.cuda.get_device_capability(device))


def implementations(op: str) -> dict[str, Implementation]:
    return dict(_REGISTRY.get(op, {}))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


@functools.lru_cache(maxsize=1)
def ranking() -> dict:
    """op -> "major.minor" -> {"order": [backends, fastest first], "source": results file, "gpu": name}.
    Empty when the file is absent (a build that did not package it) or unreadable. Read once per
    process: `auto` consults it on every call of an op."""
    try:
        with open(RANKING_FILE) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    clean = {op: {cc: entry for cc, entry in by_cc.items()
                  if isinstance(entry, dict) and isinstance(entry.get("order"), list)
                  and all(isinstance(name, str) for name in entry["order"])}
             for op, by_cc in (data.items() if isinstance(data, dict) else ()) if isinstance(by_cc, dict)}
    if clean != data:
        warnings.warn(f"{RANKING_FILE}: entries not of the form {{op: {{'major.minor': {{'order': [names], ...}}}}}} "
                      f"are ignored (python -m bench.readme_tables rewrites the file)", stacklevel=2)
    return clean


def auto_order(op: str, capability: tuple[int, int]) -> tuple[list[str], str | None]:
    """The backends `auto` tries for `op` on a GPU of `capability`, and the results file that
    ranked them (None when no result covers this op and capability: PREFERENCE alone)."""
    entry = ranking().get(op, {}).get(f"{capability[0]}.{capability[1]}")
    ranked = [b for b in entry["order"] if b in BACKENDS] if entry else []
    return ranked + [b for b in PREFERENCE if b not in ranked], entry.get("source") if entry else None


def unusable_reason(op: str, backend: str, device: torch.device | str, args: tuple | None = None) -> str | None:
    """None when `op`'s `backend` implementation can run on `device` (for the call's `args`, when
    given), else why not."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"{op}: no {backend} implementation is available in this version of xjfast"
    return _usable(impl, torch.device(device), args)


def disabled() -> set[tuple[str, str]]:
    """XJFAST_DISABLE: comma-separated op:backend pairs never to run, e.g.
    "temporal_attention:triton,denoise_step:cuda" (bench/gpu_check.sh sets it for an implementation
    whose first launch hung or crashed, so the rest of the check runs without it). auto passes over
    them; asking for one raises BackendUnavailable. The reference cannot be disabled."""
    pairs = set()
    for entry in filter(None, (e.strip() for e in os.environ.get("XJFAST_DISABLE", "").split(","))):
        op, _, backend = (part.strip() for part in entry.partition(":"))
        if op not in _REGISTRY or backend not in BACKENDS[1:]:
            raise ValueError(f"XJFAST_DISABLE: expected op:backend pairs with an op among {registered_ops()} and a "
                             f"backend among {list(BACKENDS[1:])}, got {entry!r}")
        pairs.add((op, backend))
    return pairs


def _usable(impl: Implementation, device: torch.device, args: tuple | None = None) -> str | None:
    if (impl.op, impl.backend) in disabled():
        return f"{impl.op}:{impl.backend} is disabled by XJFAST_DISABLE"
    reason = backend_unavailable_reason(impl.backend, device)
    if reason is None and device.type == "cuda" and impl.min_capability > (0, 0):
        cc = torch.cuda.get_device_capability(device)
        if cc < impl.min_capability:
            reason = (f"{impl.op}/{impl.backend} needs compute capability "
                      f">= {impl.min_capability[0]}.{impl.min_capability[1]}, this GPU has {cc[0]}.{cc[1]}")
    if reason is None and args is not None and impl.supports is not None:
        reason = impl.supports(*args)
    return reason


def check_backend(backend) -> None:
    """A backend argument: "auto" or one of BACKENDS."""
    check_choice("backend", backend, ("auto",) + BACKENDS)


def resolve(op: str, backend: str, device: torch.device | str, args: tuple | None = None) -> Implementation:
    """The implementation of `op` to run on `device` (for the call's `args`, where an implementation
    covers only some); raises BackendUnavailable with the reason."""
    check_backend(backend)
    device = torch.device(device)
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        if device.type != "cuda" or not torch.cuda.is_available():
            return impls["reference"]
        for name in auto_order(op, torch.cuda.get_device_capability(device))[0]:
            if name in impls and _usable(impls[name], device, args) is None:
                return impls[name]
        return impls["reference"]
    if backend not in impls:
        raise BackendUnavailable(f"{op}: no {backend} implementation is available in this version of xjfast")
    reason = _usable(impls[backend], device, args)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    return impls[backend]
