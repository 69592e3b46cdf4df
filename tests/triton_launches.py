"""Records each launch of xjfast's Triton kernels with the key Triton looks its compiled kernel up
by: Triton's own specialization of the arguments (dtypes; integers equal to 1 or divisible by 16;
pointers 16-byte aligned, unless the kernel says not to) for an sm_90 target, and its constexprs
and compile options. Under the interpreter, which compiles nothing, it tells which compiles a GPU
would make, and when."""
from __future__ import annotations

import collections
import functools

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)


@functools.cache
def _binder(kernel):
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(jit.signature, jit.params, make_backend(TARGET))


class Launches:
    """monkeypatches the kernels' class (Triton's JITFunction, or its interpreter's) to record every
    launch as a Launch, under the `phase` set at the time."""

    Launch = collections.namedtuple("Launch", "phase kernel key constexprs options compile_only")

    def __init__(self, monkeypatch, kernel_class):
        self.records, self.phase = [], None
        run = kernel_class.run

        def recording_run(kernel, *args, grid, warmup, **kwargs):
            _, specialization, options = _binder(kernel)(*args, **kwargs)
            constexprs = tuple(value for kind, value in specialization if kind == "constexpr")
            self.records.append(self.Launch(self.phase, kernel.fn.__name__, (str(specialization), str(options)),
                                            (constexprs, str(options)), options, warmup))
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel_class, "run", recording_run)

    def keys(self, compile_only: bool) -> set:
        return {(r.kernel, r.key) for r in self.records if r.compile_only == compile_only}
