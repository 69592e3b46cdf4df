"""xjfast info: reports what can run here and why not, without raising on a CPU machine."""
import torch

from xjfast import _ext
from xjfast.info import collect_info, format_info


def test_collect_info_on_this_machine():
    info = collect_info()
    assert info["backends"]["reference"] is None
    for name in ("triton", "cuda"):
        assert info["backends"][name] is None or isinstance(info["backends"][name], str)
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"] and "GPU: none" in format_info(info)
    text = format_info(info)
    assert "xjfast 0.1.0" in text and "backend cuda" in text


def test_arch_matching():
    assert _ext.arch_runs_on("90a", (9, 0)) and not _ext.arch_runs_on("90a", (10, 0))
    assert _ext.arch_runs_on("100a", (10, 0)) and not _ext.arch_runs_on("100a", (10, 3))
    assert _ext.arch_runs_on("89", (8, 9)) and not _ext.arch_runs_on("89", (9, 0))
