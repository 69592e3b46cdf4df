"""The compiled extension xjfast._C: device queries, errors as exceptions, SASS for each arch."""
import os
import shutil
import subprocess

import pytest
import torch

C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built (no nvcc, or XJFAST_CUDA_ARCHS empty)")


def test_built_archs_and_device_count():
    assert C.built_archs() and all(a.rstrip("af").isdigit() for a in C.built_archs())
    count = C.device_count()
    assert isinstance(count, int) and count >= 0
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
        assert C.compute_capability(0) == torch.cuda.get_device_capability(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_cuda_errors_become_exceptions():
    assert C.device_count() == 0
    with pytest.raises(C.CudaError, match="cudaDeviceGetAttribute"):
        C.compute_capability(0)


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, or the one inside Triton's wheel."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = ""
    for candidate in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump", bundled):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_sass_of_every_arch_is_embedded():
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither the CUDA toolkit's nor Triton's")
    listing = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    for arch in C.built_archs():
        assert f"sm_{arch}" in listing, listing
