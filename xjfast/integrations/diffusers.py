"""xjfast attention inside diffusers' video transformers, through their public set_attn_processor.

Each attention processor is wrapped: the wrapper runs diffusers' own processor (its projections,
norms and rotary, unchanged) with torch's scaled_dot_product_attention routed through
xjfast.sdpa, so self-attention runs on xjfast's kernels and what xjfast does not accelerate (text
cross-attention of another length, masks) stays on torch — counted as fallbacks.
diffusers is optional: pip install xjfast[diffusers].
"""
from __future__ import annotations

import functools

from xjfast.integrations.sdpa import check_settings, patch

SUPPORTED = ("WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel")


class XjfastAttnProcessor:
    """Wraps a diffusers attention processor; `original` is the processor it wraps."""

    def __init__(self, original, precision: str = "fp8", backend: str = "auto"):
        self.original, self.precision, self.backend = original, precision, backend

        @functools.wraps(original.__call__)
        def routed(*args, **kwargs):
            with patch(precision, backend):
                return original(*args, **kwargs)

        # diffusers reads `processor.__call__`'s signature to pass only the kwargs it accepts:
        # the instance attribute carries the original's signature (through __wrapped__)
        self.__call__ = routed

    def __call__(self, *args, **kwargs):
        return self.__dict__["__call__"](*args, **kwargs)

    def __getattr__(self, name):  # attributes diffusers sets or reads on processors
        return getattr(self.__dict__["original"], name)


def _check_model(model) -> None:
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise TypeError(f"model: expected one of {', '.join(SUPPORTED)}, got {kind}")


def enable(model, precision: str = "fp8", backend: str = "auto") -> dict:
    """Install xjfast attention processors on `model`; returns the processors it replaced."""
    _check_model(model)
    check_settings(precision, backend)
    replaced = {name: proc.original if isinstance(proc, XjfastAttnProcessor) else proc
                for name, proc in model.attn_processors.items()}
    model.set_attn_processor({name: XjfastAttnProcessor(proc, precision, backend) for name, proc in replaced.items()})
    return replaced


def disable(model, replaced: dict | None = None) -> None:
    """Restore `replaced` (what enable returned), or unwrap every xjfast processor."""
    _check_model(model)
    if replaced is None:
        replaced = {name: proc.original if isinstance(proc, XjfastAttnProcessor) else proc
                    for name, proc in model.attn_processors.items()}
    model.set_attn_processor(replaced)
