"""compute-sanitizer's racecheck, without a GPU: xjfast._C's CPU build with the kernels compiled
under gcc's ThreadSanitizer instrumentation, whose calls tests/simt/racecheck.cpp answers with a
happens-before race detector over the shared memory of each CTA or cluster (and the global memory
their threads touch). A launch with two accesses of a byte by different threads, one a write, that
no barrier, cluster barrier, __syncwarp, mbarrier wait or cp.async wait orders fails with the
hazard, as does a wgmma operand read no fence.proxy.async covers, or a CTA that exits while a
cluster peer may still read its shared memory. Control kernels (tests/simt/race_controls.cpp) show
that each kind of hazard is seen, and that the ordering silences it."""
import ctypes
import re
import subprocess

import pytest
import torch

import simt_extension

pytestmark = [pytest.mark.simt,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, gpu_check.sh runs compute-sanitizer's "
                                 "racecheck on the kernels themselves"),
              pytest.mark.skipif(simt_extension.unavailable_reason() is not None,
                                 reason=str(simt_extension.unavailable_reason()))]


def symbolized(report: str) -> str:
    """`report` with each "pc 0x... in LIBRARY" followed by its function and source line."""
    def line(match):
        where = subprocess.run(["addr2line", "-f", "-C", "-e", match[2], match[1]], capture_output=True,
                               text=True).stdout.split("\n")
        return f"{match[0]}: {' at '.join(w for w in where[:2] if w)}"
    return re.sub(r"pc (0x[0-9a-f]+) in (\S+?)(?=\))", line, report)


@pytest.fixture
def racecheck(monkeypatch):
    return simt_extension.use(monkeypatch, racecheck=True)


SHARED = "(read-after-write|write-after-read) hazard at byte \\d+ of the dynamic shared memory"
CONTROLS = {  # control -> the hazard its unordered version makes (the two accesses in either order)
    "neighbours": SHARED,
    "overwrite": SHARED,
    "static_neighbours": "(read-after-write|write-after-read) hazard at byte \\d+ of the static shared memory",
    "global_neighbours": "(read-after-write|write-after-read) hazard at global memory",
    "lanes": SHARED + ": thread \\d+ \\(warp (\\d+)\\).* thread \\d+ \\(warp \\2\\)",  # within one warp
    "mbarrier": SHARED,
    "mbarrier_init": "read-after-write hazard at byte 0 of the dynamic shared memory: thread \\d+ \\(warp \\d\\) "
                     "reads it \\(mbarrier.arrive\\) and thread 0 \\(warp 0\\) wrote it",
    "cp_async": SHARED,
    "tma": "write-after-read hazard at byte 128 of the dynamic shared memory: a TMA load issued by thread 0 \\(warp 0\\) writes",
    "wgmma_operands": "read-after-write \\(no fence.proxy.async between the generic write and the async-proxy "
                      "read\\) hazard at byte \\d+ of the dynamic shared memory: thread \\d+ \\(warp \\d+\\) reads it "
                      "\\(a wgmma operand\\)",
    # the peer exits before the read, or after it with nothing ordering the read first
    "cluster_peer": "(an access of byte \\d+ of the static shared memory of the cluster's CTA \\d by thread \\d+ "
                    "\\(warp \\d\\) of the cluster's CTA \\d after that CTA exited|the cluster's CTA \\d exits while "
                    "thread \\d+ \\(warp \\d\\) of the cluster's CTA \\d may still access byte \\d+ of the static)",
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_a_control_kernel_races_without_its_ordering_and_not_with_it(racecheck, control):
    run = ctypes.CDLL(racecheck.__file__).xj_simt_race_control
    run.restype = ctypes.c_char_p
    assert run(control.encode(), 1).decode() == ""
    report = run(control.encode(), 0).decode()
    assert re.search("racecheck: " + CONTROLS[control], report), report


def test_every_cuda_kernel_orders_its_memory(racecheck, monkeypatch, capsys):
    """bench/sanitize.py's launches of every CUDA kernel: each attention path, the cache commit (a
    CTA per frame, and a cluster of 3), the compaction in one CTA, in a cluster of 3 and unstaged (a
    full buffer whose kept slots move), denoise_step."""
    from bench import sanitize
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # all three paths
    status = sanitize.main(device="cpu", backends=["cuda"])
    out = capsys.readouterr().out
    assert status == 0, symbolized(out)
    launched = [line for line in out.splitlines() if line.endswith(": launched")]
    for kernel in ("denoise_step", "kv_cache_commit", "kv_cache_compact", "wgmma path", "ws path", "mma path"):
        assert any(kernel in line for line in launched), out


@pytest.mark.parametrize("core", ["mma", "wgmma", "ws"])
def test_each_attention_path_orders_its_memory_on_every_case(racecheck, core):
    """test_temporal_attention's masking, cache, keep-buffer (attention mass) and lag cases."""
    from test_temporal_attention import CASES, case_inputs, run_backend, uncovered
    ran = []
    for name, spec in CASES.items():
        q, k, v, caches = case_inputs(spec)
        if uncovered("cuda", q, k, v, caches[0], **spec["kwargs"]) is None:
            try:
                run_backend("cuda", q, k, v, caches[0], core=core, **spec["kwargs"])
            except RuntimeError as exc:
                pytest.fail(f"{name}: {symbolized(str(exc))}")
            ran.append(name)
    assert {"speculative-pass-lagged", "cache-keep-tokens", "cache-batch-fp32-ragged"} <= set(ran), ran
