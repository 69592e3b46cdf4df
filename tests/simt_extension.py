"""xjfast._C compiled for the CPU: csrc/ built by the host compiler with tests/simt's runtime, so
the CUDA backend's kernels (the mma.sync attention and its attention mass, the cache commit and
compaction with their clusters, denoise_step, and the attention's sm_90a paths: wgmma, and the
warp-specialized kernel with TMA and mbarriers) run here, each CTA as fibers, through the same
bindings and Python launchers as on a GPU.

`load()` builds once per source state (cached under build/simt/<hash>/) and returns the module;
`use(monkeypatch)` makes the CUDA backend's launchers call it with CPU tensors. Two more builds check
the kernels as compute-sanitizer does: `sanitize` (AddressSanitizer: memcheck, tests/simt_memcheck.py)
and `racecheck` (the kernels compiled with gcc's ThreadSanitizer instrumentation, whose calls
tests/simt/racecheck.cpp answers with a race detector over the memory of each CTA or cluster:
racecheck).
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMT = os.path.join(ROOT, "tests", "simt")
CXX = shutil.which("g++") or shutil.which("c++")
SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer"]
# racecheck: every source knows it (XJ_SIMT_RACECHECK); the kernels' own code (csrc/*.cu and the
# control kernels of tests/simt/race_controls.cpp) is instrumented, with line tables for the reports
RACECHECK = ["-DXJ_SIMT_RACECHECK"]
RACECHECK_KERNELS = ["-fsanitize=thread", "-g1"]
ARCHS = "90a"  # the emulated device is an sm_90 whose _C holds sm_90a code (wgmma, TMA), as on an H100


def cuda_include() -> str | None:
    """The CUDA toolkit's headers (types and the fp8/bf16 host conversions), or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                 shutil.which("nvcc") and os.path.dirname(os.path.dirname(shutil.which("nvcc")))):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp8.h")):
            return os.path.join(home, "include")
    return None


def unavailable_reason() -> str | None:
    if CXX is None:
        return "no host C++ compiler (g++)"
    if cuda_include() is None:
        return "no CUDA toolkit headers (CUDA_HOME or /usr/local/cuda)"
    return None


def _sources() -> list[str]:
    # the emulator's objects first: of a template instantiation both it and an instrumented kernel
    # object hold, the linker keeps the first, and the emulator's own must not report its accesses
    emulator = sorted(glob.glob(os.path.join(SIMT, "*.cpp")))
    return ([s for s in emulator if not _instrumented(s)] + sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))) +
            [os.path.join(ROOT, "csrc", "bindings.cpp")] + [s for s in emulator if _instrumented(s)])


def _instrumented(source: str) -> bool:
    return source.endswith(".cu") or os.path.basename(source) == "race_controls.cpp"


def _flags(sanitize: bool = False, racecheck: bool = False) -> list[str]:
    import pybind11
    # its own C++ namespace: pybind11 translates a C++ exception type to the Python class of the
    # module that registered it last, which must stay xjfast._C's for xjfast._C's errors
    return ["-std=c++17", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-DXJ_SIMT", "-Dxjfast=xjfast_simt",
            f"-DXJFAST_BUILT_ARCHS=\"{ARCHS}\"",
            "-include", os.path.join(SIMT, "prelude.h"), "-I", os.path.join(SIMT, "include"),
            "-I", os.path.join(ROOT, "csrc"), "-I", cuda_include(), "-I", pybind11.get_include(),
            "-I", sysconfig.get_paths()["include"]] + (SANITIZE if sanitize else []) + (RACECHECK if racecheck else [])


def _digest(flags: list[str]) -> str:
    """Of the compiler, the flags and every file of csrc/ and tests/simt/."""
    h = hashlib.sha256(" ".join([CXX, *flags]).encode())
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "*")) + glob.glob(os.path.join(SIMT, "**", "*"),
                                                                             recursive=True)):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    return h.hexdigest()[:16]


def _compile(source: str, obj: str, flags: list[str]) -> None:
    language = "c++" if source.endswith(".cu") else "none"
    if "-DXJ_SIMT_RACECHECK" in flags and _instrumented(source):
        flags = flags + RACECHECK_KERNELS
    done = subprocess.run([CXX, *flags, "-x", language, "-c", source, "-o", obj], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {os.path.relpath(source, ROOT)} for the CPU failed:\n{done.stderr[-6000:]}")


@functools.lru_cache(maxsize=None)
def load(sanitize: bool = False, racecheck: bool = False):
    """The CPU build of xjfast._C (built on first use, cached by the sources' hash); `sanitize`:
    built with AddressSanitizer, for a process that LD_PRELOADs its runtime (tests/simt_memcheck.py);
    `racecheck`: a launch that makes a hazard fails with it."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if sanitize and racecheck:
        raise ValueError("one of sanitize and racecheck")
    flags = _flags(sanitize, racecheck)
    out = os.path.join(ROOT, "build", "simt", _digest(flags))
    library = os.path.join(out, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(library):
        os.makedirs(out, exist_ok=True)
        objects = [os.path.join(out, os.path.basename(s) + ".o") for s in _sources()]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            list(pool.map(_compile, _sources(), objects, [flags] * len(objects)))
        partial = library + f".{os.getpid()}"
        subprocess.run([CXX, "-shared", *objects, "-o", partial, "-lpthread", *(SANITIZE if sanitize else [])],
                       check=True)
        os.replace(partial, library)  # whole or absent, whatever another process does
    # a package name per build: Python hands out an extension module once per name
    flavor = "_asan" if sanitize else "_racecheck" if racecheck else ""
    spec = importlib.util.spec_from_file_location(f"xjfast_simt{flavor}._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use(monkeypatch, sanitize: bool = False, racecheck: bool = False):
    """backend="cuda" runs the CPU build (with AddressSanitizer: `sanitize`; racecheck: `racecheck`)
    on CPU tensors: the ops resolve it as on a GPU (supports() included) and its launchers pass the
    default stream handle (0). Returns the module."""
    from xjfast import _ext, backends
    from xjfast.ops import _cuda
    module = load(sanitize, racecheck)
    on_gpu = backends.backend_unavailable_reason
    monkeypatch.setattr(_ext, "_load", lambda: (module, None))
    monkeypatch.setattr(_cuda, "stream_handle", lambda device: 0)
    monkeypatch.setattr(backends, "backend_unavailable_reason", lambda backend, device=None: (
        None if backend == "cuda" and torch.device(device or "cpu").type == "cpu" else on_gpu(backend, device)))
    return module
