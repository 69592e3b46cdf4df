"""One small registry of op implementations and the rule that picks one.

Each op registers its implementations once, with the minimum compute capability they need.
`resolve(op, backend, device, args)` returns a callable or raises `BackendUnavailable` naming what
is missing; `backend="auto"` takes the first usable entry of the op's preference order. An
implementation that covers only part of an op (say, FP8 precision only) declares `supports`: a
function of the call's arguments returning None or the reason it cannot take them; `auto` then
passes over it for those arguments, and an explicit request gets the reason.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from xjfast import _ext
from xjfast.errors import BackendUnavailable, check_choice

BACKENDS = ("reference", "triton", "cuda")
# The order `auto` tries. No committed GPU results rank the backends yet, so the Triton kernels
# (held to the reference on a GPU and in the interpreter) come before the CUDA ones; the
# benchmark results will order them per op and architecture.
PREFERENCE = ("triton", "cuda", "reference")


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
        _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, fn, min_capability, supports)
        return fn

    return wrap


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """None if `backend` can run on `device` at all, else a sentence saying why not."""
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device) if device is not None else None
    if backend == "reference":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if device is not None and device.type != "cuda" and not triton_interpreted():
            return f"Triton kernels need a CUDA device (got {device}); TRITON_INTERPRET=1 runs them on the CPU"
        if device is None and not torch.cuda.is_available() and not triton_interpreted():
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


def _usable(impl: Implementation, device: torch.device, args: tuple | None = None) -> str | None:
    reason = backend_unavailable_reason(impl.backend, device)
    if reason is None and device.type == "cuda" and impl.min_capability > (0, 0):
        cc = torch.cuda.get_device_capability(device)
        if cc < impl.min_capability:
            reason = (f"{impl.op}/{impl.backend} needs compute capability "
                      f">= {impl.min_capability[0]}.{impl.min_capability[1]}, this GPU has {cc[0]}.{cc[1]}")
    if reason is None and args is not None and impl.supports is not None:
        reason = impl.supports(*args)
    return reason


def resolve(op: str, backend: str, device: torch.device | str, args: tuple | None = None) -> Implementation:
    """The implementation of `op` to run on `device` (for the call's `args`, where an implementation
    covers only some); raises BackendUnavailable with the reason."""
    check_choice("backend", backend, ("auto",) + BACKENDS)
    device = torch.device(device)
    impls = _REGISTRY.get(op, {})
    if backend == "auto":
        if device.type != "cuda":
            return impls["reference"]
        for name in PREFERENCE:
            if name in impls and _usable(impls[name], device, args) is None:
                return impls[name]
        return impls["reference"]
    if backend not in impls:
        raise BackendUnavailable(f"{op}: no {backend} implementation is available in this version of xjfast")
    reason = _usable(impls[backend], device, args)
    if reason is not None:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    return impls[backend]
