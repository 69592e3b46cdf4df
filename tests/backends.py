"""Which implementations of an op the tests can run here, and per-backend tolerances."""
import pytest
import torch

import simt_extension

from xjfast.backends import implementations, unusable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# What gpu_check.sh's first launches may set for every later stage: tests that fake a GPU, or
# expect every implementation registered, unset them.
GPU_CHECK_EXCLUSIONS = ("XJFAST_DISABLE", "XJFAST_CUDA_ATTENTION_SKIP")


def fast_backends(op: str):
    """pytest params for every non-reference implementation of `op`; unusable ones (no such device,
    too old a GPU, XJFAST_DISABLE) skip with the reason. Without a GPU, "cuda" runs the kernels of
    xjfast._C compiled for the CPU (marked simt: conftest's cuda_on_the_cpu), as "triton" runs
    Triton's interpreter."""
    params = []
    for name in implementations(op):
        if name == "reference":
            continue
        marks = []
        if name == "cuda" and DEVICE.type == "cpu":
            reason = simt_extension.unavailable_reason()
            marks.append(pytest.mark.simt)
        else:
            reason = unusable_reason(op, name, DEVICE)
        marks.append(pytest.mark.skipif(reason is not None, reason=str(reason)))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def poisoned(shape, dtype, device=DEVICE):
    """A buffer full of NaN (or the most negative value for integers): an element a kernel forgets
    to write cannot pass for a right answer."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device).to(dtype)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
