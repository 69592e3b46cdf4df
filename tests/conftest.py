"""Test session setup: GPU tests skip cleanly without a GPU; Triton kernels run in Triton's CPU
interpreter when there is no GPU (set before anything imports triton)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers beside the tests

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test shapes are too small to split across threads; on a busy 2-core machine two torch
    threads make the suite several times slower (and the H.264 encoder runs threads of its own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
