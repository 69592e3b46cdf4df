"""First launches of the CUDA attention's paths on this GPU, each in a process of its own under a
time limit, before gpu_check.sh's tests, sanitizer and benchmarks. A path that hangs (a pipeline
waiting forever on an mbarrier) or crashes (a sticky CUDA error poisons the rest of its process)
costs this stage seconds instead of costing a later stage everything after it; gpu_check.sh then
leaves it out (XJFAST_CUDA_ATTENTION_SKIP) and the later stages run whole, saying why.

    python -m bench.first_launch        every path this GPU runs (xjfast.ops.temporal_attention.
                                        cuda_paths): one verdict line each, then the last line
                                        XJFAST_CUDA_ATTENTION_SKIP=<the paths that failed, comma-separated>
    python -m bench.first_launch PATH   one launch of PATH against the reference (what each child runs)
"""
from __future__ import annotations

import subprocess
import sys

import torch

LIMIT_S = 40  # per path: the imports, a CUDA context and one small launch take ~10 s
MAX_REL_L2 = 0.05  # FP8 against the reference simulating it: ~1e-2 at worst; garbage is ~1


def launch(path: str) -> int:
    """One FP8 attention over a cache with sink, window and keep buffer (80-token frames: partial
    tiles) plus two block-causal query frames, on `path`; 0 when it matches the reference."""
    import xjfast
    from bench.harness import accuracy, cuda_attention_core
    H, D, T = 2, 128, 80
    torch.manual_seed(0)
    cache = xjfast.StreamingKVCache(1, 1, H, D, T, sink_frames=1, window_frames=2, keep_tokens=24, device="cuda",
                                    backend="reference")  # only the attention is on trial
    for _ in range(4):
        cache.commit(0, *(torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
    q, k, v = (torch.randn(1, 2 * T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run(backend):
        return xjfast.temporal_attention(q, k, v, block_tokens=T, kv_cache=cache, layer=0, backend=backend)
    with cuda_attention_core(path):
        out = run("cuda")
    torch.cuda.synchronize()
    rel_l2 = accuracy(out, run("reference"))["rel_l2"]
    ok = bool(torch.isfinite(out).all()) and rel_l2 < MAX_REL_L2
    print(f"{path}: rel L2 {rel_l2:.3g} against the reference (bound {MAX_REL_L2})")
    return 0 if ok else 1


def main() -> int:
    from xjfast.backends import unusable_reason
    from xjfast.ops.temporal_attention import cuda_paths
    reason = unusable_reason("temporal_attention", "cuda", "cuda")
    failed = []
    if reason is not None:
        print(f"the CUDA attention does not run here: {reason}")
    else:
        for path in cuda_paths(torch.device("cuda")):
            try:
                child = subprocess.run([sys.executable, "-m", "bench.first_launch", path], capture_output=True,
                                       text=True, timeout=LIMIT_S)
                said = (child.stdout + child.stderr).strip().splitlines()
                verdict = ("ok" if child.returncode == 0 else f"FAILED (exit status {child.returncode})") + (
                    f": {said[-1]}" if said else "")
                failed += [] if child.returncode == 0 else [path]
            except subprocess.TimeoutExpired:
                verdict = f"HUNG: killed after {LIMIT_S} s"
                failed.append(path)
            print(f"first launch of the CUDA attention's {path} path: {verdict}", flush=True)
    print(f"XJFAST_CUDA_ATTENTION_SKIP={','.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1]) if len(sys.argv) > 1 else main())
