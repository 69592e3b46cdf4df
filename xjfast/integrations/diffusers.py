"""xjfast attention inside diffusers' video transformers, through their public set_attn_processor.

Each attention processor is replaced by a copy of itself whose class is a subclass of its own
(made once per processor class): its __call__ runs diffusers' own __call__ (projections, norms and
rotary unchanged; the signature diffusers inspects to filter kwargs is the original's) with
torch's scaled_dot_product_attention routed through xjfast.sdpa for that call, in that thread (see
xjfast.integrations.sdpa). Self-attention runs on xjfast's kernels; what xjfast does not
accelerate (text cross-attention of another length, masks) stays on torch, counted as fallbacks.
Being the processor that runs, the copy takes the attributes diffusers sets on processors after
enable() (set_attention_backend, enable_parallelism), which disable() carries back; it survives
copy.deepcopy and pickling; torch.compile(fullgraph=True) traces it.

Limits: diffusers' attention backends other than torch's SDPA (set_attention_backend("flex"),
DIFFUSERS_ATTN_BACKEND=flash, ...) never call torch's SDPA, so enable() refuses a model set to one,
and a processor call that made no SDPA call is counted (fallback_counts()) and warned about.
HunyuanVideo passes its text padding mask (a bool key-padding mask that keeps a prefix of the
keys) to every attention call: xjfast.sdpa accelerates it (its token refiner's square mask over the
text alone stays on torch).
diffusers is optional: pip install xjfast[diffusers].
"""
from __future__ import annotations

import copyreg
import functools
import threading

from xjfast.integrations import sdpa as _sdpa
from xjfast.integrations.sdpa import Route, check_settings

SUPPORTED = ("WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel")
# diffusers attention backends whose implementation calls torch.nn.functional.scaled_dot_product_attention
TORCH_SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


class _ProcessorType(type):
    """XjfastAttnProcessor(original, precision, backend) builds the routing copy of `original`;
    isinstance(p, XjfastAttnProcessor) holds for every such copy."""

    def __call__(cls, original, precision: str = "fp8", backend: str = "auto"):
        return _wrap(original, Route(precision, backend))

    def __instancecheck__(cls, obj) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub) -> bool:
        return sub is cls or getattr(sub, "_xjfast_base", None) is not None


class XjfastAttnProcessor(metaclass=_ProcessorType):
    """A diffusers attention processor routed through xjfast: `XjfastAttnProcessor(original,
    precision, backend)` returns a copy of `original` of a subclass of its class."""


_CLASSES: dict = {}
_CLASSES_LOCK = threading.Lock()


def _routing_class(base: type) -> type:
    """The subclass of processor class `base` whose __call__ routes torch's SDPA (one per class)."""
    with _CLASSES_LOCK:
        cls = _CLASSES.get(base)
        if cls is None:
            cls = _CLASSES[base] = _make_routing_class(base)
    return cls


def _make_routing_class(base: type) -> type:
    base_call = base.__call__

    @functools.wraps(base_call)  # its __wrapped__: diffusers reads the original's signature
    def __call__(self, *args, **kwargs):
        token = _sdpa.enter_route(self._xjfast_route)
        try:
            out = base_call(self, *args, **kwargs)
        finally:
            calls = _sdpa.exit_route(token)
        if calls == 0:  # eager only (None while tracing)
            _bypassed(self)
        return out

    def __reduce_ex__(self, protocol):  # deepcopy and pickle rebuild through the base class
        reduced = base.__reduce_ex__(self, protocol)
        if isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and reduced[1][:1] == (type(self),):
            return (_new_routing, (base,) + tuple(reduced[1][1:])) + tuple(reduced[2:])
        return reduced

    return type(f"Xjfast{base.__name__}", (base,), {
        "__call__": __call__, "__reduce_ex__": __reduce_ex__, "_xjfast_base": base, "__module__": __name__,
        "__doc__": f"{base.__name__} with torch's SDPA routed through xjfast.sdpa during its calls."})


def _new_routing(base: type, *args):
    cls = _routing_class(base)
    return cls.__new__(cls, *args)


def _wrap(original, route: Route):
    """A shallow copy of `original` (unwrapped first if it is a routing copy) routed with `route`."""
    original = _unwrap(original)
    base = type(original)
    wrapped = _new_routing(base)
    wrapped.__dict__.update(original.__dict__)
    wrapped._xjfast_route = route
    return wrapped


def _state(processor) -> dict:
    return {k: v for k, v in processor.__dict__.items() if k != "_xjfast_route"}


def _unwrap(processor):
    """A routing copy as a processor of its base class with the same state; anything else as is."""
    base = getattr(type(processor), "_xjfast_base", None)
    if base is None:
        return processor
    plain = base.__new__(base)
    plain.__dict__.update(_state(processor))
    return plain


def _backend_name(processor) -> str | None:
    """The diffusers attention backend `processor` dispatches to (None: it calls torch directly)."""
    if not hasattr(processor, "_attention_backend"):
        return None
    backend = processor._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
            backend = _AttentionBackendRegistry._active_backend
        except (ImportError, AttributeError):
            return None
    return str(getattr(backend, "value", backend))


def _bypassed(processor) -> None:
    """A processor call that made no torch SDPA call: counted and warned once."""
    base = type(processor)._xjfast_base.__name__
    backend = _backend_name(processor)
    if backend is not None and backend not in TORCH_SDPA_BACKENDS:
        reason = f"diffusers attention backend {backend!r}, which does not call torch's scaled_dot_product_attention"
        fix = "; model.set_attention_backend('native') routes it"
    else:
        reason, fix = f"{base} made no call through torch.nn.functional.scaled_dot_product_attention", ""
    _sdpa._fallback(reason, f"xjfast.integrations.diffusers: {base} ran without calling torch's "
                            f"scaled_dot_product_attention, so xjfast accelerated nothing in it (reason: {reason}){fix} "
                            f"(counted in xjfast.integrations.sdpa.fallback_counts(), warned once)")


def _check_model(model) -> None:
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise TypeError(f"model: expected one of {', '.join(SUPPORTED)}, got {kind}")


def enable(model, precision: str = "fp8", backend: str = "auto") -> dict:
    """Install xjfast attention processors on `model`; returns the processors it replaced (what
    disable() takes). Re-enabling replaces the settings, never stacks."""
    _check_model(model)
    check_settings(precision, backend)
    current = model.attn_processors
    for proc in current.values():
        name = _backend_name(proc)
        if name is not None and name not in TORCH_SDPA_BACKENDS:
            raise ValueError(
                f"model: its diffusers attention backend is {name!r} (set_attention_backend or "
                f"DIFFUSERS_ATTN_BACKEND), which does not call torch's scaled_dot_product_attention, so xjfast "
                f"could accelerate nothing; call model.set_attention_backend('native') before enable()")
    route = Route(precision, backend)
    replaced, wrapped = {}, {}
    for name, proc in current.items():
        if id(proc) not in wrapped:  # a processor shared by layers stays shared
            wrapped[id(proc)] = (_unwrap(proc), _wrap(proc, route))
        replaced[name] = wrapped[id(proc)][0]
    model.set_attn_processor({name: wrapped[id(proc)][1] for name, proc in current.items()})
    return replaced


def disable(model, replaced: dict | None = None) -> None:
    """Restore `replaced` (what enable returned), or unwrap every xjfast processor. What diffusers
    set on the running processors meanwhile (set_attention_backend, ...) is carried back onto them."""
    _check_model(model)
    if replaced is not None and not isinstance(replaced, dict):
        raise TypeError(f"replaced: expected the dict of processors enable() returned, got {type(replaced).__name__}")
    for name, original in (replaced or {}).items():
        if original is not None and not callable(original):
            raise TypeError(f"replaced[{name!r}]: expected an attention processor (as enable() returned), got "
                            f"{type(original).__name__}")
    restore, unwrapped = {}, {}
    for name, proc in model.attn_processors.items():
        original = (replaced or {}).get(name)
        if isinstance(proc, XjfastAttnProcessor):
            if original is not None and type(original) is type(proc)._xjfast_base:
                original.__dict__.clear()
                original.__dict__.update(_state(proc))
            elif original is None:
                original = unwrapped.setdefault(id(proc), _unwrap(proc))
        restore[name] = proc if original is None else original
    model.set_attn_processor(restore)
