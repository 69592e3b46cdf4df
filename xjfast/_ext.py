"""Loads the compiled extension `xjfast._C`, remembering precisely why it is absent, and tells
whether the SASS it holds runs on a given GPU."""
from __future__ import annotations

import functools
import importlib
import re

_ARCH = re.compile(r"(\d+)([af]?)")


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


def built_archs() -> list[str]:
    """The archs whose SASS `xjfast._C` embeds (["90a", "100a"]), [] when it is absent."""
    ext = extension()
    return list(ext.built_archs()) if ext is not None else []


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("90a", "100a", "100f", "89") runs on a GPU of `capability`.

    An "a" (architecture-specific) build runs only on exactly that compute capability; a plain
    or "f" (family) build on the same major version with an equal or higher minor one.
    """
    match = _ARCH.fullmatch(arch)
    if match is None:
        raise ValueError(f"arch: expected digits with an optional 'a' or 'f' suffix (like '90a'), got {arch!r}")
    major, minor = divmod(int(match.group(1)), 10)
    if match.group(2) == "a":
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]


def capability_reason(capability: tuple[int, int]) -> str | None:
    """None when `xjfast._C` is built and has SASS that runs on a GPU of `capability`, else why not."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    built = built_archs()
    if any(arch_runs_on(arch, capability) for arch in built):
        return None
    major, minor = capability
    held = ", ".join(f"sm_{arch}" for arch in built) or "no architecture"
    # the architecture-specific build ("a": wgmma on sm_90a) exists from sm_90 on; sm_89a does not
    arch = f"{major}{minor}{'a' if major >= 9 else ''}"
    return (f"xjfast._C holds SASS for {held}, none of which runs on this GPU (compute capability "
            f"{major}.{minor}); rebuild with XJFAST_CUDA_ARCHS=\"{arch}\"")
