"""xjfast.sdpa: torch's scaled_dot_product_attention, signature and semantics ([B, H, L, D]),
with FP8 attention inside where xjfast accelerates the call, and torch's own implementation for
the rest — each fallback counted by reason and warned about once.

`patch()` routes torch.nn.functional.scaled_dot_product_attention through xjfast.sdpa (as a
context manager or a plain call); `unpatch()` restores torch's function.

How a call is decided, in two stages:
- What the call itself asks for — a mask's kind, dropout, is_causal, inputs that require grad
  (xjfast has no backward), shapes, dtypes, strides, scale — is decided here in plain Python,
  which torch.compile traces (the decision is made once, at trace time).
- What depends on the machine or on tensor values — whether the tensors are on a GPU, which kernel
  can run there (the real resolver, xjfast.backends.resolve, on the call's arguments: compute
  capability, XJFAST_DISABLE, the CUDA extension, precision), which keys a key-padding mask
  keeps — is decided inside the custom op xjfast::sdpa,
  which torch.compile keeps as one opaque node (its fake gives the output's exact layout: a
  contiguous [B, L, H, D], returned to the caller as its [B, H, L, D] transpose, as xjfast's
  kernels write it). With backend="auto", a call no GPU kernel can take here goes to torch's SDPA
  (counted), never to the O(L^2)-memory Python reference; an explicit backend="triton"/"cuda" that
  cannot run raises BackendUnavailable; backend="reference" runs the reference anywhere.

Counting: fallback_counts() by reason, accelerated_counts() by backend. Decisions made while
torch.compile traces are not counted (nor warned about): in a compiled model the static
fallbacks are not counted; the op's own decisions (the GPU ones, and every accelerated call) are,
each time the compiled code runs (a replayed CUDA graph, as torch.compile's "reduce-overhead"
mode makes, runs no Python: its calls are not counted). Warnings point at the first caller outside xjfast, torch,
diffusers and accelerate: the line that called xjfast.sdpa or torch's SDPA, or under diffusers the
line that called the model.

Routing torch's function: one dispatcher replaces torch.nn.functional.scaled_dot_product_attention
while any routing is active — a patch() (process-wide, as the attribute it replaces) or a
diffusers processor call (its own thread only) — and what was there before is put back when the
last one ends, in whatever order they end. A thread's innermost processor call decides its
settings, else the newest patch(); calls no routing covers go to the previous function. While
torch.compile traces, a processor instead swaps the attribute for the duration of its call (a
side effect Dynamo replays), and the dispatcher reads the patches only.

Key-padding masks (HunyuanVideo's text padding): a bool attn_mask that broadcasts over heads and
queries ([B or 1, 1, 1, Lk], or fewer leading dims) and keeps a prefix of each row's keys — the
first n_b of batch element b — is accelerated exactly: queries 0..n_b-1 attend to keys 0..n_b-1 on
xjfast's kernel (the self-attention it has), and the padded queries n_b.. (whose keys no one sees)
attend to the same n_b keys on torch's SDPA. Reading n_b takes one device-to-host copy of the
mask's row sums, so a mask is handed to torch while a CUDA graph is being captured, as is a mask
that keeps something other than a prefix, or no key at all in some row.
"""
from __future__ import annotations

import collections
import numbers
import os
import sys
import threading
import warnings
from typing import Optional

import torch

from xjfast.backends import BACKENDS, check_backend, resolve, unusable_reason
from xjfast.errors import check_choice
from xjfast.ops.temporal_attention import DTYPES, HEAD_DIMS, PRECISIONS, AttentionPlan

F = torch.nn.functional
TORCH_SDPA = F.scaled_dot_product_attention
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what the GPU kernels take

_FALLBACKS: collections.Counter = collections.Counter()
_ACCELERATED: collections.Counter = collections.Counter()
_WARNED: set = set()
_COUNT_LOCK = threading.Lock()


class XjfastFallbackWarning(UserWarning):
    """A call xjfast hands to torch (warned once per reason until reset_fallback_counts())."""


def fallback_counts() -> dict:
    """How many calls went to torch's implementation, by reason."""
    with _COUNT_LOCK:
        return dict(_FALLBACKS)


def accelerated_counts() -> dict:
    """How many calls xjfast ran itself, by backend ("triton", "cuda", "reference")."""
    with _COUNT_LOCK:
        return dict(_ACCELERATED)


def reset_fallback_counts() -> None:
    """Zero fallback_counts() and accelerated_counts(); each reason warns again once."""
    with _COUNT_LOCK:
        _FALLBACKS.clear()
        _ACCELERATED.clear()
        _WARNED.clear()


def check_settings(precision: str, backend: str) -> None:
    """What a call, a patch or a diffusers model will run with, checked where it is given."""
    check_choice("precision", precision, PRECISIONS)
    check_backend(backend)


def _skipped_dirs() -> tuple:
    import xjfast
    dirs = [os.path.dirname(xjfast.__file__), os.path.dirname(torch.__file__)]
    dirs += [os.path.dirname(sys.modules[m].__file__) for m in ("diffusers", "accelerate")
             if getattr(sys.modules.get(m), "__file__", None)]
    return tuple(os.path.join(d, "") for d in dirs)


def _caller_frame():
    """The innermost frame outside xjfast, torch, diffusers and accelerate (the user's line)."""
    skipped = _skipped_dirs()
    frame = outermost = sys._getframe(1)
    while frame is not None:
        if not frame.f_code.co_filename.startswith(skipped):
            return frame
        outermost, frame = frame, frame.f_back
    return outermost


def _fallback(reason: str, message: str | None = None) -> None:
    """Count `reason` and warn the first time (since the last reset). Skipped while torch.compile
    traces: a decision made at trace time is not counted."""
    if torch.compiler.is_compiling():
        return
    with _COUNT_LOCK:
        _FALLBACKS[reason] += 1
        first = reason not in _WARNED
        _WARNED.add(reason)
    if first:
        frame = _caller_frame()
        # a fresh registry: Python's per-location one would hide the warning after a reset
        text = message or (f"xjfast.sdpa hands this call to torch's implementation: {reason} (counted in "
                           f"xjfast.integrations.sdpa.fallback_counts(), warned once per reason)")
        where = (XjfastFallbackWarning, frame.f_code.co_filename, frame.f_lineno)
        module = frame.f_globals.get("__name__", "<unknown>")
        try:
            warnings.warn_explicit(text, *where, module=module, registry={}, module_globals=frame.f_globals)
        except ImportError:  # __main__ of the REPL or `python -c`: its loader has no source to give
            warnings.warn_explicit(text, *where, module=module, registry={})


def _accelerated(backend: str) -> None:
    with _COUNT_LOCK:
        _ACCELERATED[backend] += 1


MASK_REASON = "an attn_mask other than a bool key-padding mask [B or 1, 1, 1, Lk]"


def _is_key_padding(attn_mask, query, key) -> bool:
    """Whether `attn_mask` has the kind xjfast may accelerate: bool, on the inputs' device, one row of
    Lk keys per batch element (or one for all), broadcast over heads and queries."""
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or not 2 <= attn_mask.dim() <= 4:
        return False
    if query.dim() != 4 or key.dim() != 4 or attn_mask.device != query.device:
        return False
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    return shape[1] == shape[2] == 1 and shape[0] in (1, query.shape[0]) and shape[3] == key.shape[2]


def _torch_types(dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether the non-tensor arguments have types torch's SDPA takes: bools, and for dropout_p and
    scale a real number or a 0-d tensor (else its parser raises a TypeError); symbolic ones while
    torch.compile traces."""
    def number(x):
        return isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)) or (isinstance(x, torch.Tensor)
                                                                                and x.dim() == 0)
    return isinstance(is_causal, (bool, torch.SymBool)) and isinstance(enable_gqa, (bool, torch.SymBool)) and \
        number(dropout_p) and (scale is None or number(scale))


def _static_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> str | None:
    """Why torch's implementation takes the call, from the call alone (traceable), or None."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query/key/value that are not all tensors"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "inputs that require grad (xjfast has no backward)"
    if attn_mask is not None and not _is_key_padding(attn_mask, query, key):
        return MASK_REASON
    if dropout_p:
        return "dropout_p > 0"
    if is_causal:
        return "is_causal (token-causal; xjfast masks by blocks of frames)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs that are not 4-D [B, H, L, D]"
    if not (key.dtype == value.dtype == query.dtype) or not (key.device == value.device == query.device):
        return "query/key/value of different dtypes or devices"
    if enable_gqa and (key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]):
        return "grouped-query attention (enable_gqa with fewer key/value heads)"
    if key.shape != query.shape or value.shape != query.shape:
        return "query/key/value shapes differ (e.g. cross-attention)"
    if query.numel() == 0:
        return "empty tensors"
    if query.shape[-1] not in HEAD_DIMS:
        return f"head_dim {query.shape[-1]} (xjfast has {HEAD_DIMS})"
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return "a last dimension with stride != 1"
    if scale is not None and not 0 < scale < float("inf"):
        return "scale <= 0 or not finite"
    if query.dtype not in (DTYPES if backend == "reference" else KERNEL_DTYPES):
        return f"dtype {query.dtype}"
    return None


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
         precision: str = "fp8", backend: str = "auto"):
    """torch.nn.functional.scaled_dot_product_attention, FP8 inside where it can be.

    A bool key-padding attn_mask that keeps a prefix of each row's keys is accelerated too (module
    docstring); other masks go to torch. Returns [B, H, L, D] in query's dtype (the transpose of a
    contiguous [B, L, H, D]). backend:
    "auto" (a GPU kernel, else torch), "triton"/"cuda" (that kernel, else BackendUnavailable), or
    "reference" (xjfast's PyTorch definition, on any device)."""
    check_settings(precision, backend)
    if not _torch_types(dropout_p, is_causal, scale, enable_gqa):  # torch raises its own TypeError: nothing to count
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    reason = _static_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    if reason is not None:
        _fallback(reason)
        return TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    key_mask = None if attn_mask is None else attn_mask.reshape(-1, key.shape[2])
    out = torch.ops.xjfast.sdpa(query, key, value, key_mask, None if scale is None else float(scale), precision,
                                backend)
    return out.transpose(1, 2)


def runtime_choice(device: torch.device, args: tuple, backend: str) -> tuple:
    """(the temporal_attention Implementation to run, None) or (None, why torch takes the call),
    for validated `args` (q, k, v, plan, None) on `device`, by the real resolver; an explicit
    backend that cannot run raises BackendUnavailable."""
    if backend != "auto":
        return resolve("temporal_attention", backend, device, args), None
    if device.type != "cuda":
        return None, "tensors on the CPU" if device.type == "cpu" else f"tensors on {device.type}"
    chosen = resolve("temporal_attention", "auto", device, args)
    if chosen.backend != "reference":
        return chosen, None
    why = "; ".join(f"{name}: {unusable_reason('temporal_attention', name, device, args) or 'ranked after the reference'}"
                    for name in BACKENDS if name != "reference")
    return None, f"no xjfast GPU kernel can run this call here ({why})"


def _kept_prefixes(key_mask: torch.Tensor, batch: int) -> tuple:
    """([(b0, b1, n)]: batch elements b0..b1-1 keep their first n keys, in runs of equal n; None)
    or (None, why torch takes the call), from a [B or 1, Lk] bool key-padding mask (one host read)."""
    if key_mask.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None, "a key-padding mask while a CUDA graph is being captured (reading it needs the host)"
    length = key_mask.shape[1]
    kept = key_mask.sum(1)
    prefix = (key_mask == (torch.arange(length, device=key_mask.device) < kept[:, None])).all(1)
    rows = torch.stack([kept, prefix.long()]).cpu().tolist()
    if not all(rows[1]):
        return None, "a key-padding mask that keeps other keys than a prefix of the row"
    if not all(rows[0]):
        return None, "a key-padding mask that keeps no key of a row"
    kept = rows[0] * batch if len(rows[0]) == 1 else rows[0]
    runs = []
    for b, n in enumerate(kept):
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], b + 1, n)
        else:
            runs.append((b, b + 1, n))
    return runs, None


@torch.library.custom_op("xjfast::sdpa", mutates_args=(), schema=(  # see xjfast::temporal_attention
    "(Tensor query, Tensor key, Tensor value, Tensor? key_mask, float? scale, str precision, str backend) -> Tensor"))
def _sdpa_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: Optional[torch.Tensor],
             scale: Optional[float], precision: str, backend: str) -> torch.Tensor:
    """The runtime half of xjfast.sdpa on inputs its static checks accepted (key_mask: None or a
    [B or 1, Lk] bool key-padding mask): returns a contiguous [B, L, H, D], from xjfast's kernel or
    (auto, where none can run) torch's SDPA."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    B, L, H, D = q.shape
    scale_ = D ** -0.5 if scale is None else scale
    runs, reason = ([(0, B, L)], None) if key_mask is None else _kept_prefixes(key_mask, B)
    calls = []
    for b0, b1, n in runs or ():
        args = (q[b0:b1, :n], k[b0:b1, :n], v[b0:b1, :n], AttentionPlan(n, (False,), False, scale_, None, precision),
                None)
        chosen, reason = runtime_choice(q.device, args, backend)
        if chosen is None:
            break
        calls.append((b0, b1, n, chosen, args))
    if reason is not None:
        _fallback(reason)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return TORCH_SDPA(query, key, value, attn_mask=mask, scale=scale).transpose(1, 2).contiguous()
    if len(calls) == 1 and calls[0][2] == L:
        out = calls[0][3].fn(*calls[0][4])[0].contiguous()
    else:
        out = q.new_empty(B, L, H, D)
        for b0, b1, n, chosen, args in calls:
            out[b0:b1, :n] = chosen.fn(*args)[0]
            if n < L:  # the padded queries: attend to the same kept keys (torch; no one sees their keys)
                out[b0:b1, n:] = TORCH_SDPA(query[b0:b1, :, n:], key[b0:b1, :, :n], value[b0:b1, :, :n],
                                            scale=scale).transpose(1, 2)
    _accelerated(calls[0][3].backend)
    return out


@_sdpa_op.register_fake
def _(query, key, value, key_mask, scale, precision, backend):
    B, H, L, D = query.shape
    return query.new_empty((B, L, H, D))


# ---- routing torch's function ------------------------------------------------------------------

class Route:
    """Settings to route torch's SDPA with; calling it is xjfast.sdpa with those settings."""

    def __init__(self, precision: str = "fp8", backend: str = "auto"):
        check_settings(precision, backend)
        self.precision, self.backend = precision, backend

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                    precision=self.precision, backend=self.backend)

    def __repr__(self):
        return f"Route(precision={self.precision!r}, backend={self.backend!r})"


class _Frame:
    """A thread's active routing (a processor call); counts the SDPA calls it routed."""
    __slots__ = ("route", "calls")

    def __init__(self, route: Route):
        self.route, self.calls = route, 0


_LOCAL = threading.local()      # .stack: the thread's active _Frames, innermost last
_ROUTE_LOCK = threading.Lock()
_PATCHES: tuple = ()            # active patch() objects, newest last (process-wide)
_ACTIVE = 0                     # active routings, all threads: the dispatcher is installed while > 0
_PREVIOUS = TORCH_SDPA          # what the dispatcher replaced; calls no routing covers go there


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    route = None
    if not torch.compiler.is_compiling():
        stack = getattr(_LOCAL, "stack", None)
        if stack:
            frame = stack[-1]
            frame.calls += 1
            route = frame.route
    if route is None:
        patches = _PATCHES
        if patches:
            route = patches[-1].route
    if route is None:
        return _PREVIOUS(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    return route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


_dispatch.__doc__ = TORCH_SDPA.__doc__
_dispatch.xjfast = True


def _activate() -> None:
    """One more active routing (hold _ROUTE_LOCK): install the dispatcher on the first."""
    global _ACTIVE, _PREVIOUS
    if _ACTIVE == 0 and F.scaled_dot_product_attention is not _dispatch:
        _PREVIOUS = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _dispatch
    _ACTIVE += 1


def _deactivate() -> None:
    """One fewer (hold _ROUTE_LOCK): put the previous function back after the last, unless
    something replaced the dispatcher since (it then passes calls through)."""
    global _ACTIVE
    _ACTIVE -= 1
    if _ACTIVE == 0 and F.scaled_dot_product_attention is _dispatch:
        F.scaled_dot_product_attention = _PREVIOUS


def enter_route(route: Route):
    """Route this thread's torch SDPA calls with `route` until exit_route(token) (a processor
    call). While torch.compile traces: swaps the attribute instead (returns what was there)."""
    if torch.compiler.is_compiling():
        previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = route
        return previous
    frame = _Frame(route)
    stack = _LOCAL.__dict__.setdefault("stack", [])
    with _ROUTE_LOCK:
        stack.append(frame)
        _activate()
    return frame


def exit_route(token) -> int | None:
    """End what enter_route began; returns the SDPA calls it routed (None while tracing)."""
    if torch.compiler.is_compiling():
        F.scaled_dot_product_attention = token
        return None
    stack = _LOCAL.stack
    with _ROUTE_LOCK:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is token:
                del stack[i]
                _deactivate()
                break
    return token.calls


class _Patch:
    """An active patch(); also a context manager that ends it on exit (in any order)."""

    def __init__(self, precision: str, backend: str):
        global _PATCHES
        self.route = Route(precision, backend)
        with _ROUTE_LOCK:
            _PATCHES = _PATCHES + (self,)
            _activate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _PATCHES
        with _ROUTE_LOCK:
            if self in _PATCHES:
                _PATCHES = tuple(p for p in _PATCHES if p is not self)
                _deactivate()


def patch(precision: str = "fp8", backend: str = "auto") -> _Patch:
    """Route torch.nn.functional.scaled_dot_product_attention through xjfast.sdpa, now, in every
    thread.

    `with patch(): ...` ends it on exit; a plain `patch()` lasts until `unpatch()`. Nested patches
    apply the newest one's settings, and may end in any order.
    """
    return _Patch(precision, backend)


def unpatch() -> None:
    """End every patch(); torch's own scaled_dot_product_attention is back once no diffusers
    processor call (xjfast.integrations.diffusers) is running."""
    global _PATCHES
    with _ROUTE_LOCK:
        patches, _PATCHES = _PATCHES, ()
        for _ in patches:
            _deactivate()


def is_patched() -> bool:
    """Whether torch's SDPA, called from this thread now, goes through xjfast."""
    if F.scaled_dot_product_attention is not _dispatch:
        return False
    return bool(getattr(_LOCAL, "stack", None)) or bool(_PATCHES)
