"""Exceptions raised by xjfast, and the input checks that raise them.

Every check names the argument, what was expected and what was received, so a user
never has to guess which of five tensors was wrong.
"""
from __future__ import annotations

from typing import Iterable

import torch


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _fmt(values: Iterable) -> str:
    return " or ".join(str(v) for v in values)


def check_tensor(name: str, t, *, dtypes=None, ndim: int | None = None,
                 device: torch.device | None = None, unit_last_stride: bool = False, nonempty: bool = False) -> None:
    """Raise TypeError/ValueError naming `name` when `t` is not what the op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_fmt(dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != canonical_device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name}: expected a tensor with no empty dimension, got shape {tuple(t.shape)}")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must have stride 1, got strides {t.stride()}")


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), "
                         f"got {tuple(t.shape)}")


def is_int(value) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a count or an index here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")


def check_positive(name: str, value) -> None:
    """A positive finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_device(name: str, device) -> torch.device:
    """A device argument as the torch.device its tensors report (canonical_device), so that it
    compares equal to theirs; a CUDA device needs a GPU torch sees."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}: expected a torch device, got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: expected a usable device, got {device} but torch sees no CUDA GPU "
                         f"(torch.cuda.is_available() is False)")
    device = canonical_device(device)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: expected a usable device, got {device} but torch sees "
                         f"{torch.cuda.device_count()} CUDA GPU(s)")
    return device


def canonical_device(device) -> torch.device:
    """`device` as its tensors report it: "cuda" is the current GPU, cuda:N; "cpu:0" is cpu. (A
    torch.device without an index differs from every tensor's.)"""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "cpu" else device
