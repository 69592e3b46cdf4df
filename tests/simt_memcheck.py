"""bench/sanitize.py's small launches of every CUDA kernel (each attention path included), run on
xjfast._C's CPU build compiled with AddressSanitizer: compute-sanitizer's memcheck, without a GPU.
An access outside a tensor torch allocated, or outside a CTA's dynamic shared memory, stops the
process with ASan's report naming the kernel. Run by tests/test_sanitize.py, in a process whose
LD_PRELOAD puts ASan's runtime first (as it must be); the exit status is bench.sanitize's.
`--overflow` makes one launch write past its output instead."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/

import simt_extension  # noqa: E402


def overflow() -> None:
    """A denoise_step whose x0 is one element short, handed to the launcher past the op's checks:
    the kernel's last write lands outside it, which ASan must report (the check can fail)."""
    from xjfast.ops.denoise_step import denoise_step_cuda
    x = torch.randn(1, 16, 2, 10, 14, dtype=torch.bfloat16)
    short = torch.empty(x.numel() - 1, dtype=x.dtype)
    denoise_step_cuda(x, torch.randn_like(x), torch.rand(1, 4), None, 0, (1, 2, 2), short, None)


def main(args: list[str]) -> int:
    from bench import sanitize
    with pytest.MonkeyPatch.context() as monkeypatch:
        simt_extension.use(monkeypatch, sanitize=True)
        if args == ["--overflow"]:
            overflow()
            return 0
        # the emulated GPU is an sm_90 (so cuda_paths() lists its three attention paths, as an H100's)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        return sanitize.main(device="cpu", backends=["cuda"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
