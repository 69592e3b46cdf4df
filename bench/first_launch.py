"""First launches of every GPU implementation on this GPU, each in a process of its own under a time
limit, all at once, before gpu_check.sh's tests, sanitizer and benchmarks. An implementation that
hangs (a pipeline waiting forever on an mbarrier) or crashes (a sticky CUDA error poisons the rest
of its process) costs this stage seconds instead of costing a later stage everything after it;
gpu_check.sh then leaves it out (XJFAST_DISABLE for an op's backend, XJFAST_CUDA_ATTENTION_SKIP for
one path of the CUDA attention) and the later stages run whole, saying why.

    python -m bench.first_launch            every implementation this GPU runs: the small launches
                                            of bench/sanitize.py per op and backend, and each CUDA
                                            attention path against the reference; one verdict line
                                            each, then the lines XJFAST_DISABLE=<op:backend,...> and
                                            XJFAST_CUDA_ATTENTION_SKIP=<path,...> of what failed
    python -m bench.first_launch OP:BACKEND one child: bench/sanitize.py's launches of OP on BACKEND
    python -m bench.first_launch path:PATH  one child: the CUDA attention on PATH against the reference
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

LIMIT_S = 90  # per child: the imports, a CUDA context, Triton compiles and a few small launches
STAGE_MARGIN_S = 15  # what the parent needs after its children, to print what to leave out


def child_limit() -> float:
    """LIMIT_S, or less where gpu_check.sh's stage (XJFAST_STAGE_LIMIT_S) would not outlast it: the
    parent must outlive its children, or it is killed before saying which to leave out."""
    stage = os.environ.get("XJFAST_STAGE_LIMIT_S")
    return LIMIT_S if not stage else max(10.0, min(LIMIT_S, float(stage) - STAGE_MARGIN_S))
DEVICE = os.environ.get("XJFAST_BENCH_DEVICE", "cuda")  # "cpu": the harness checks itself in CI
MAX_REL_L2 = 0.05  # FP8 against the reference simulating it: ~1e-2 at worst; garbage is ~1


def launch_path(path: str) -> int:
    """One FP8 attention over a cache with sink, window and keep buffer (80-token frames: partial
    tiles) plus two block-causal query frames, on CUDA attention path `path`; 0 when it matches the
    reference."""
    import xjfast
    from .harness import accuracy, cuda_attention_core
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
    print(f"rel L2 {rel_l2:.3g} against the reference (bound {MAX_REL_L2})")
    return 0 if bool(torch.isfinite(out).all()) and rel_l2 < MAX_REL_L2 else 1


def launch_op(op: str, backend: str) -> int:
    """bench/sanitize.py's small launches of `op` on `backend`; 0 when each ran (or said it does not
    cover its arguments)."""
    from .sanitize import launches
    from xjfast.errors import BackendUnavailable
    torch.manual_seed(0)
    for label, call in launches(op, backend, DEVICE):
        try:
            call()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        except BackendUnavailable:  # an implementation covering part of the op
            continue
        print(f"{label}: launched")
    return 0


def children() -> list[tuple[str, dict]]:
    """(argument, environment) of each child for this GPU."""
    from xjfast.backends import implementations, registered_ops, unusable_reason
    from xjfast.ops.temporal_attention import cuda_core, cuda_paths
    out = []
    for op in registered_ops():
        for backend in implementations(op):
            if backend != "reference" and unusable_reason(op, backend, "cuda") is None:
                # the CUDA attention's default path only: the others have their own children
                others = [p for p in cuda_paths("cuda") if p != cuda_core("cuda")]
                out.append((f"{op}:{backend}", {"XJFAST_CUDA_ATTENTION_SKIP": ",".join(others)}))
    if unusable_reason("temporal_attention", "cuda", "cuda") is None:
        out += [(f"path:{p}", {}) for p in cuda_paths("cuda")]
    return out


def run_child(argument: str, env: dict) -> tuple[str, bool]:
    limit = child_limit()
    try:
        child = subprocess.run([sys.executable, "-m", f"{__package__}.first_launch", argument], capture_output=True,
                               text=True, timeout=limit, env=dict(os.environ, **env))
        said = (child.stdout + child.stderr).strip().splitlines()
        verdict = "ok" if child.returncode == 0 else f"FAILED (exit status {child.returncode})"
        return verdict + (f": {said[-1]}" if said else ""), child.returncode == 0
    except subprocess.TimeoutExpired:
        return f"HUNG: killed after {limit:g} s", False


def main(todo: list[tuple[str, dict]] | None = None) -> int:
    """Runs `todo` (default: children() on a GPU, nothing without one) and prints the verdicts."""
    if todo is None and not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch: nothing to launch")
    todo = todo if todo is not None else children() if torch.cuda.is_available() else []
    with ThreadPoolExecutor(max_workers=max(len(todo), 1)) as pool:  # one GPU, many small processes
        verdicts = list(pool.map(lambda child: run_child(*child), todo))
    disable, skip = [], []
    for (argument, _), (verdict, ok) in zip(todo, verdicts):
        print(f"first launch of {argument}: {verdict}")
        if not ok:
            (skip if argument.startswith("path:") else disable).append(argument.removeprefix("path:"))
    print(f"XJFAST_DISABLE={','.join(disable)}")
    print(f"XJFAST_CUDA_ATTENTION_SKIP={','.join(skip)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.exit(main())
    kind, _, name = sys.argv[1].partition(":")
    sys.exit(launch_path(name) if kind == "path" else launch_op(kind, name))
