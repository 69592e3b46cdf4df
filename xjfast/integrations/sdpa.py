"""xjfast.sdpa: torch's scaled_dot_product_attention, signature and semantics ([B, H, L, D]),
with FP8 attention inside where xjfast accelerates the call, and torch's own implementation for
the rest — each fallback counted by reason and warned about once.

`patch()` routes torch.nn.functional.scaled_dot_product_attention through xjfast.sdpa (as a
context manager or a plain call); `unpatch()` restores torch's function.
"""
from __future__ import annotations

import collections
import threading
import warnings

import torch

from xjfast.backends import backend_unavailable_reason, check_backend
from xjfast.errors import check_choice
from xjfast.ops.temporal_attention import HEAD_DIMS, PRECISIONS, temporal_attention

TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention
_FALLBACKS: collections.Counter = collections.Counter()
_WARNED: set = set()
_LOCK = threading.Lock()


def fallback_counts() -> dict:
    """How many calls went to torch's implementation, by reason."""
    return dict(_FALLBACKS)


def check_settings(precision: str, backend: str) -> None:
    """What a call, a patch or a diffusers model will run with, checked where it is given."""
    check_choice("precision", precision, PRECISIONS)
    check_backend(backend)


def reset_fallback_counts() -> None:
    with _LOCK:
        _FALLBACKS.clear()
        _WARNED.clear()


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, backend) -> str | None:
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p:
        return "dropout_p > 0"
    if is_causal:
        return "is_causal (token-causal; xjfast masks by blocks of frames)"
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        return "query/key/value shapes differ (e.g. cross-attention) or are not [B, H, L, D]"
    if enable_gqa:
        return "enable_gqa"
    if query.numel() == 0:
        return "empty tensors"
    if query.shape[-1] not in HEAD_DIMS:
        return f"head_dim {query.shape[-1]} (xjfast has {HEAD_DIMS})"
    if backend == "reference":
        return None if query.dtype in (torch.float32, torch.bfloat16, torch.float16) else f"dtype {query.dtype}"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {query.dtype}"
    if query.device.type != "cuda":
        return "tensors on the CPU"
    if backend == "auto" and backend_unavailable_reason("triton", query.device) is not None \
            and backend_unavailable_reason("cuda", query.device) is not None:
        return "no xjfast GPU backend usable here"
    return None


def _fallback(reason: str) -> None:
    with _LOCK:
        _FALLBACKS[reason] += 1
        first = reason not in _WARNED
        _WARNED.add(reason)
    if first:
        warnings.warn(f"xjfast.sdpa: {reason} is not accelerated; using torch's implementation "
                      f"(counted in xjfast.integrations.sdpa.fallback_counts())", stacklevel=3)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
         precision: str = "fp8", backend: str = "auto"):
    """torch.nn.functional.scaled_dot_product_attention, FP8 inside where it can be."""
    check_settings(precision, backend)
    reason = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, backend)
    if reason is not None:
        _fallback(reason)
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    out = temporal_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale,
                             precision=precision, backend=backend)
    return out.transpose(1, 2)


class _Patch:
    """The installed routing; also a context manager that restores what was there before."""

    def __init__(self, precision: str, backend: str):
        check_settings(precision, backend)
        self.previous = torch.nn.functional.scaled_dot_product_attention

        def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                        precision=precision, backend=backend)

        routed.__doc__ = TORCH_SDPA.__doc__
        routed.xjfast = True
        torch.nn.functional.scaled_dot_product_attention = routed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.previous


def patch(precision: str = "fp8", backend: str = "auto") -> _Patch:
    """Route torch.nn.functional.scaled_dot_product_attention through xjfast.sdpa, now.

    `with patch(): ...` restores the previous function on exit; a plain `patch()` lasts until
    `unpatch()`.
    """
    return _Patch(precision, backend)


def unpatch() -> None:
    """Restore torch's own scaled_dot_product_attention."""
    torch.nn.functional.scaled_dot_product_attention = TORCH_SDPA


def is_patched() -> bool:
    return getattr(torch.nn.functional.scaled_dot_product_attention, "xjfast", False)
