"""Child process of test_sass.py's compile_only test: Triton's JIT (not its interpreter) driven by
a stand-in CUDA driver that names an sm_90 GPU, so that launches inside compile_only() compile
for real, on threads, with no GPU. Prints one JSON line: the kernels each pass compiled and the
cubins the JIT caches hold afterwards."""
import json
import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class StandInCuda:
    """What Triton's JIT asks the driver before a launch; a launch itself would fail."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(StandInCuda())
assert "TRITON_INTERPRET" not in os.environ
from xjfast.kernels import denoise_step as denoise, kv_cache_commit as commit  # noqa: E402
from xjfast.kernels.launch import compile_only  # noqa: E402

commit.sm_count = lambda device: 132  # torch would ask the GPU


def launches():
    x, out = torch.randn(1, 4, 1, 16, 16), torch.empty(1, 4, 1, 16, 16)
    coef = torch.ones(1)
    for x_next in (out.clone(), None):  # two variants: with and without re-noising
        denoise.denoise_step(x, x, coef, 5, 0, (1, 1, 1), out, x_next)
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    pages = [torch.empty(2, 1, 64, 2, 64, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = [torch.empty(2, 1, 2), torch.empty(2, 1, 2, 64), torch.empty(2, 1, 2, 64)]
    commit.kv_cache_commit(k, k, *pages, *scales, torch.arange(1, dtype=torch.int32))


with compile_only(int(sys.argv[1])) as first:
    launches()
with compile_only() as second:
    launches()
cached = [kernel for module in (denoise, commit) for name in dir(module) if name.endswith("_kernel")
          for caches in getattr(module, name).device_caches.values() for kernel in caches[0].values()]
print(json.dumps({"first": len(first), "second": len(second),
                  "cubins": sum(len(getattr(k, "asm", {}).get("cubin", b"")) > 0 for k in cached)}))
