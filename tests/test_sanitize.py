"""compute-sanitizer's memcheck, without a GPU: bench/sanitize.py's small launches of every CUDA
kernel (each attention path, the cache commit in a cluster, the compaction staged and unstaged,
denoise_step) on xjfast._C's CPU build compiled with AddressSanitizer (tests/simt_memcheck.py),
which reports any access outside the tensors torch allocated or a CTA's dynamic shared memory."""
import functools
import os
import subprocess
import sys

import pytest
import torch

import simt_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def asan_preload() -> str | None:
    """LD_PRELOAD for ASan's runtime (first, as it must be) and libstdc++ (so that ASan intercepts
    C++ throws in a python that does not link it), or None where the compiler has no ASan."""
    if simt_extension.unavailable_reason() is not None:
        return None
    paths = [subprocess.run([simt_extension.CXX, f"-print-file-name={name}"], capture_output=True,
                            text=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    return " ".join(paths) if all(os.path.isabs(p) and os.path.exists(p) for p in paths) else None


def memcheck(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=asan_preload(), ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=23")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "simt_memcheck.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


pytestmark = [pytest.mark.simt,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, gpu_check.sh runs compute-sanitizer's "
                                 "memcheck on the kernels themselves"),
              pytest.mark.skipif(asan_preload() is None, reason="no AddressSanitizer runtime (g++ -fsanitize=address)")]


def test_every_cuda_kernel_stays_inside_its_buffers():
    done = memcheck()
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "ERROR: AddressSanitizer" not in log, log[-6000:]
    launched = [line for line in done.stdout.splitlines() if line.endswith(": launched")]
    for kernel in ("denoise_step", "kv_cache_commit", "kv_cache_compact", "wgmma path", "ws path", "mma path"):
        assert any(kernel in line for line in launched), done.stdout


def test_a_write_past_an_output_is_reported_with_its_kernel():
    done = memcheck("--overflow")
    assert done.returncode == 23, done.stdout + done.stderr[-6000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in done.stderr and "denoise_step_kernel" in done.stderr
