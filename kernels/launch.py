"""How xjfast's kernels are launched: with the compile options that `python -m xjfast.tools.sass`
also compiles with (what runs is what the SASS checks saw, whatever Triton's defaults are), or,
inside `compile_only()`, compiled in parallel and not run (StreamGenerator.precompile)."""
from __future__ import annotations

import contextlib
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor

import triton

# FMA contraction: the online softmax computes each exponent as one FMA (scale, bias and running
# max folded per row), and the dequantizations fold the same way. Left to Triton, it is on up to
# 3.9, which warns about it once per process, and off from 3.10 (TRITON_DEFAULT_FP_FUSION).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)

_compile_only = contextvars.ContextVar("xjfast_compile_only", default=False)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs, **COMPILE_OPTIONS); inside compile_only(), its compile only."""
    if _compile_only.get():
        kernel.run(*args, grid=grid, warmup=True, **kwargs, **COMPILE_OPTIONS)
    else:
        kernel[grid](*args, **kwargs, **COMPILE_OPTIONS)


@contextlib.contextmanager
def compile_only(threads: int | None = None):
    """Inside: launches compile their kernel (on `threads` threads, default one per core this
    process may run on; Triton's compiler and ptxas release the GIL) and run nothing, so their
    outputs are left as allocated. On leaving, every compile has finished and later launches find
    their kernels compiled. Yields a list that then holds one entry per kernel compiled (a launch
    of a compiled kernel adds none; under the interpreter nothing compiles)."""
    compiled = []
    token = _compile_only.set(True)
    try:
        with ThreadPoolExecutor(threads or len(os.sched_getaffinity(0))) as pool, \
                triton.AsyncCompileMode(pool) as mode:
            yield compiled
            compiled.extend(mode.future_kernels)
    finally:
        _compile_only.reset(token)
