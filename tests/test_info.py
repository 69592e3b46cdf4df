"""xjfast info: reports what can run here and why not, without raising on a CPU machine."""
import pytest
import torch

from xjfast import _ext
from xjfast.backends import backend_unavailable_reason
from xjfast.info import collect_info, format_info


def test_collect_info_on_this_machine():
    info = collect_info()
    assert info["xjfast"] == "0.1.0" and info["torch"] == torch.__version__
    assert info["backends"]["reference"] is None
    for name in ("triton", "cuda"):
        assert info["backends"][name] is None or (isinstance(info["backends"][name], str) and info["backends"][name])
    if _ext.extension() is None:
        assert info["extension_archs"] == [] and "xjfast._C" in info["extension_reason"]
    else:
        assert info["extension_archs"] == _ext.built_archs() and info["extension_reason"] is None
    text = format_info(info)
    assert "xjfast 0.1.0" in text and "backend reference: usable" in text and "backend cuda" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what is reported where there is no GPU")
def test_no_gpu_is_reported_with_the_reason():
    info = collect_info()
    assert info["gpus"] == [] and info["gpu_reason"]
    assert info["backends"]["cuda"]  # a sentence, e.g. "no CUDA GPU is visible to torch"
    assert f"GPU: none ({info['gpu_reason']})" in format_info(info)


def test_a_gpu_is_formatted():
    info = collect_info()
    info.update(gpus=[{"name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "memory_gib": 79.2,
                       "extension_reason": None}], driver="580.159.04", gpu_reason=None)
    assert "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, 79.2 GiB, driver 580.159.04" in format_info(info)


def test_cuda_backend_on_a_cpu_device_says_why():
    reason = backend_unavailable_reason("cuda", "cpu")
    assert reason and ("CUDA device" in reason or "xjfast._C" in reason)


def test_arch_matching():
    # "a": exactly that compute capability; plain and "f": same major, equal or higher minor.
    assert _ext.arch_runs_on("90a", (9, 0)) and not _ext.arch_runs_on("90a", (10, 0))
    assert _ext.arch_runs_on("100a", (10, 0)) and not _ext.arch_runs_on("100a", (10, 3))
    assert _ext.arch_runs_on("89", (8, 9)) and not _ext.arch_runs_on("89", (9, 0))
    assert _ext.arch_runs_on("80", (8, 6)) and not _ext.arch_runs_on("86", (8, 0))
    assert _ext.arch_runs_on("100f", (10, 3)) and not _ext.arch_runs_on("100f", (12, 0))
    with pytest.raises(ValueError, match="arch"):
        _ext.arch_runs_on("sm_90", (9, 0))


def test_capability_reason_names_the_archs(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (type("C", (), {"built_archs": staticmethod(lambda: ["90a"])}), None))
    assert _ext.capability_reason((9, 0)) is None
    reason = _ext.capability_reason((10, 0))
    assert "sm_90a" in reason and "10.0" in reason and 'XJFAST_CUDA_ARCHS="100a"' in reason
