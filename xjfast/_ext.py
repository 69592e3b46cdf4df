"""Loads the compiled extension `xjfast._C`, remembering precisely why it is absent."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("xjfast._C"), None
    except ImportError as exc:  # not built (no nvcc / XJFAST_CUDA_ARCHS="") or unloadable
        return None, f"xjfast._C is not importable ({exc}); build with nvcc and XJFAST_CUDA_ARCHS set"


def extension():
    """The `xjfast._C` module, or None when it was not built."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """None when `xjfast._C` is importable, else the reason it is not."""
    return _load()[1]


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("90a", "100a", "89") runs on a GPU of `capability`.

    An "a" (architecture-specific) build runs only on exactly that compute capability; a plain
    or "f" (family) build on the same major version with an equal or higher minor one.
    """
    major, minor = divmod(int(arch.rstrip("af")), 10)
    if arch.endswith("a"):
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]
