"""Test session setup: GPU tests skip cleanly without a GPU; Triton kernels run in Triton's CPU
interpreter when there is no GPU (set before anything imports triton), and the CUDA kernels in
xjfast._C's CPU build (tests/simt_extension.py)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers beside the tests

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # @triton.jit picks interpreted or compiled when a module is imported: import the kernels now,
    # so that a test that unsets TRITON_INTERPRET (test_info's fake GPU) cannot be the first to
    # import one and leave compiled helpers for the interpreted kernels after it
    try:
        import importlib
        import pkgutil

        import xjfast.kernels
        for module in pkgutil.iter_modules(xjfast.kernels.__path__):
            importlib.import_module(f"xjfast.kernels.{module.name}")
    except ImportError:  # no Triton: the Triton tests skip
        pass


def gpu_tests_first(items: list) -> list:
    """The gpu-marked tests first, each group in its collection order: on a GPU, what only a GPU
    can check runs before a time limit (gpu_check.sh's tests stage) may cut the suite off."""
    return sorted(items, key=lambda item: item.get_closest_marker("gpu") is None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items[:] = gpu_tests_first(items)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        gpu = item.get_closest_marker("gpu")
        # gpu(simt=True): CPU-sized, so its backend="cuda" case also runs on xjfast._C's CPU build
        if gpu is not None and not (gpu.kwargs.get("simt") and item.get_closest_marker("simt") is not None):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cuda_on_the_cpu(request, monkeypatch):
    """A test of backend "cuda" marked simt (backends.fast_backends without a GPU) runs the CUDA
    backend on CPU tensors, through xjfast._C compiled for the CPU (tests/simt_extension.py); with
    XJFAST_SIMT_RACECHECK=1, through its racecheck build (a launch with a hazard fails with it)."""
    if request.node.get_closest_marker("simt") is not None:
        import simt_extension
        simt_extension.use(monkeypatch, racecheck=os.environ.get("XJFAST_SIMT_RACECHECK") == "1")


WORKER_ENDED_BY_A_LOST_CONTEXT = 87  # the exit status of a worker ended by pytest_runtest_logreport


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook has sent the report to the controller
def pytest_runtest_logreport(report):
    """Under pytest-xdist: a test whose failure broke the CUDA context (a fault in a kernel) ends
    its worker, so that xdist runs the tests after it in a fresh worker, each with a working
    context, instead of failing every one of them with the same sticky error. Without xdist the
    session goes on (there is no other process to go on in)."""
    if not report.failed or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.harness import context_error
    if (error := context_error()) is not None:
        sys.stderr.write(f"{report.nodeid} broke the CUDA context ({error}): worker "
                         f"{os.environ['PYTEST_XDIST_WORKER']} ends, a fresh one runs the tests after it\n")
        sys.stderr.flush()
        os._exit(WORKER_ENDED_BY_A_LOST_CONTEXT)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test shapes are too small to split across threads; on a busy 2-core machine two torch
    threads make the suite several times slower (and the H.264 encoder runs threads of its own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
