"""The benchmark harness in its CPU mode (tiny shapes, reference backend), so it never rots."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import xjfast  # noqa: F401  (registers the ops)
from xjfast.backends import implementations

from backends import GPU_CHECK_EXCLUSIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_mode_writes_a_complete_results_file(tmp_path):
    # keep what PYTHONPATH holds (gpu_check.sh puts carried wheels, diffusers, there)
    env = dict(os.environ, XJFAST_BENCH_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for name in ("TRITON_INTERPRET",) + GPU_CHECK_EXCLUSIONS:
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "bench.run", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    results = json.loads(path.read_text())
    assert "errors" not in results
    assert results["environment"]["device"]["kind"] == "cpu" and results["environment"]["xjfast_commit"]
    assert results["roofline"]["copy"]["GB/s"] > 0
    timed = [r for r in results["attention"] if "median_ms" in r]
    assert {"xjfast-reference-fp8", "xjfast-reference-bf16", "torch-sdpa-math"} <= {r["impl"] for r in timed}
    for r in timed:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and 0.9 < r["cosine"] <= 1
    # every registered backend appears: timed, or skipped with the reason (no GPU here)
    for op, rows in (("temporal_attention", results["attention"]), ("kv_cache_commit", results["memory_bound"]),
                     ("denoise_step", results["memory_bound"])):
        seen = {r["backend"]: r for r in rows if r.get("op") == op}
        assert set(seen) == set(implementations(op)), op
        assert all("GB/s" in r or "TFLOP/s" in r or r["skipped"] for r in seen.values())
        assert "median_ms" in seen["reference"] and "CUDA device" in seen["triton"]["skipped"]
    assert {r["op"] for r in results["memory_bound"]} == {"kv_cache_commit", "kv_cache_compact", "denoise_step"}
    profile = results["stream"]["profile"]  # where the step's time goes (on the CPU: by op)
    assert profile["ms_per_pass"] > 0 and abs(sum(f["share"] for f in profile["families"].values()) - 1) < 1e-6
    assert "gemm" in profile["families"] and profile["top"][0]["ms_per_pass"] > 0
    engines = {r["engine"] for r in results["stream"]["rows"] if "steady_model_fps" in r}
    assert engines == {"xjfast-fp8", "baseline-sdpa-bf16"}
    for r in results["stream"]["rows"]:  # the steady state: every block past the warm-up, none of it
        assert r["steady_blocks"] == r["steady"] and r["blocks"] == r["passes"] > r["steady"]
        assert 0 < r["steady_interval_p50_ms"] <= r["steady_interval_p99_ms"]
    drop_in = results["diffusers_wan"]
    if importlib.util.find_spec("diffusers") is None:
        assert "not installed" in drop_in["skipped"]
    else:  # the reference backend in bf16 precision mode: diffusers' own output up to float32 rounding
        [row] = drop_in["rows"]
        assert row["diffusers_default"]["median_ms"] > 0 and row["xjfast"]["bf16"]["rel_l2"] < 1e-5
    assert set(results["sections_s"]) == {"roofline", "attention", "memory_bound", "diffusers_wan", "stream"}
    if importlib.util.find_spec("matplotlib") is not None:  # the plots, and drawn again from the file alone
        pngs = sorted(p.name for p in tmp_path.glob("*.png"))
        assert pngs == sorted(results["plots"]) and len(pngs) == 2
        for p in tmp_path.glob("*.png"):
            p.unlink()
        subprocess.run([sys.executable, "-m", "bench.plots", str(path)], cwd=ROOT, env=env, check=True)
        assert sorted(p.name for p in tmp_path.glob("*.png")) == pngs


def test_first_launch_reports_what_to_leave_out():
    """bench/first_launch.py, whose last two lines gpu_check.sh reads: without a GPU there is nothing
    to launch and nothing to leave out."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU gpu_check.sh runs it for real")
    said = subprocess.run([sys.executable, "-m", "bench.first_launch"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert said == ["no CUDA GPU is visible to torch: nothing to launch", "XJFAST_DISABLE=",
                    "XJFAST_CUDA_ATTENTION_SKIP="]


def test_first_launch_leaves_out_what_fails_or_hangs(monkeypatch, capsys):
    """The verdicts gpu_check.sh acts on, from real child processes (the harness's CPU mode): a child
    that runs is ok, one that raises is FAILED and disabled, one past the time limit is killed and
    reported HUNG; a CUDA attention path goes to the skip list instead."""
    sys.path.insert(0, ROOT)
    from bench import first_launch
    monkeypatch.setenv("XJFAST_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("XJFAST_STAGE_LIMIT_S", raising=False)  # gpu_check.sh's, which would cap LIMIT_S below
    monkeypatch.chdir(ROOT)
    first_launch.main([("denoise_step:reference", {}), ("no_such_op:triton", {})])
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("first launch of denoise_step:reference: ok")
    assert said[1].startswith("first launch of no_such_op:triton: FAILED (exit status 1): KeyError")
    assert said[2:] == ["XJFAST_DISABLE=no_such_op:triton", "XJFAST_CUDA_ATTENTION_SKIP="]
    monkeypatch.setattr(first_launch, "LIMIT_S", 0.01)
    first_launch.main([("path:ws", {})])
    assert capsys.readouterr().out.splitlines() == [
        "first launch of path:ws: HUNG: killed after 0.01 s", "XJFAST_DISABLE=", "XJFAST_CUDA_ATTENTION_SKIP=ws"]


def test_first_launch_children_end_before_the_stage_does(monkeypatch):
    """gpu_check.sh's stage limit (XJFAST_STAGE_LIMIT_S) caps each child's, leaving the parent time
    to say what to leave out; without one, LIMIT_S."""
    sys.path.insert(0, ROOT)
    from bench import first_launch
    monkeypatch.delenv("XJFAST_STAGE_LIMIT_S", raising=False)
    assert first_launch.child_limit() == first_launch.LIMIT_S
    for stage, child in ((500, first_launch.LIMIT_S), (75, 75 - first_launch.STAGE_MARGIN_S), (12, 10)):
        monkeypatch.setenv("XJFAST_STAGE_LIMIT_S", str(stage))
        assert first_launch.child_limit() == child


def test_a_figure_that_failed_is_printed_and_fails_the_run():
    """A benchmark records a failed figure in its row and goes on; the run then names it and exits
    1, so that gpu_check.sh's log does not call the benchmarks ok (a peer that cannot run is
    "skipped", not failed)."""
    sys.path.insert(0, ROOT)
    from bench.run import failed_figures
    results = {
        "environment": {"error": "not a figure"},
        "attention": [{"op": "temporal_attention", "impl": "xjfast-triton-fp8", "case": "q1-c3", "TFLOP/s": 1.0},
                      {"op": "temporal_attention", "impl": "xjfast-cuda-fp8", "case": "q1-c3", "error": "RuntimeError: x"},
                      {"op": "temporal_attention", "impl": "flashinfer", "case": "q1-c3", "skipped": "not installed"}],
        "stream": {"rows": [{"engine": "xjfast-fp8", "steps": 1, "precompile_error": None},
                            {"engine": "xjfast-fp8", "steps": 4, "precompile_error": "CompilationError: y"}],
                   "memory": {"error": "OutOfMemoryError: z"}},
    }
    assert failed_figures(results) == ["attention temporal_attention xjfast-cuda-fp8 q1-c3: error: RuntimeError: x",
                                       "stream xjfast-fp8: precompile_error: CompilationError: y",
                                       "stream.memory: error: OutOfMemoryError: z"]
    assert failed_figures({"attention": results["attention"][::2]}) == []


def test_readme_tables_come_from_results_files(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.readme_tables import tables
    assert "No GPU results yet" in tables(str(tmp_path))


def _gpu_results(name, date, capability, rows):
    return {"environment": {"device": {"name": name, "kind": "cuda", "capability": capability}, "date": date},
            "attention": [r for r in rows if r["op"] == "temporal_attention"],
            "memory_bound": [r for r in rows if r["op"] != "temporal_attention"]}


def test_ranking_comes_from_the_newest_results_per_capability(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.readme_tables import rank_backends, ranking_file

    def row(op, case, backend, ms):
        return {"op": op, "case": case, "backend": backend, "impl": f"xjfast-{backend}", "median_ms": ms}
    rows = [row("temporal_attention", "fp8", "triton", 2.0), row("temporal_attention", "fp8", "cuda", 1.0),
            row("temporal_attention", "bf16", "triton", 3.0),  # cuda covers fp8 only: judged where it runs
            {"op": "temporal_attention", "case": "bf16", "backend": "cuda", "skipped": "fp8 only"},
            row("denoise_step", "s", "triton", 0.5), row("denoise_step", "s", "cuda", 0.6),
            row("denoise_step", "s", "reference", 4.0)]
    assert rank_backends(_gpu_results("H100", "2026-11-01", "9.0", rows)) == {
        "temporal_attention": ["cuda", "triton"], "denoise_step": ["triton", "cuda", "reference"]}
    older = [row("denoise_step", "s", "cuda", 0.1), row("denoise_step", "s", "triton", 0.5)]
    for name, data in (("h100-new.json", _gpu_results("H100", "2026-11-02", "9.0", rows)),
                       ("h200-old.json", _gpu_results("H200", "2026-10-01", "9.0", older)),
                       ("b200.json", _gpu_results("B200", "2026-10-01", "10.0", older))):
        (tmp_path / name).write_text(json.dumps(data))
    ranking = ranking_file(str(tmp_path))
    assert ranking["denoise_step"]["9.0"] == {"order": ["triton", "cuda", "reference"],
                                              "source": "bench/results/h100-new.json", "gpu": "H100"}
    assert ranking["denoise_step"]["10.0"]["order"] == ["cuda", "triton"]
    assert "10.0" not in ranking["temporal_attention"]


def test_a_case_one_backend_ran_alone_does_not_rank_it(tmp_path):
    """The bf16 attention only Triton runs: scored 1.0 in each of those cases, it would overtake a
    CUDA kernel that is faster where both ran; it is ranked by the cases it shares."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import rank_backends

    def row(case, backend, ms):
        return {"op": "temporal_attention", "case": case, "backend": backend, "median_ms": ms}
    rows = [row("a-fp8", "triton", 1.0), row("a-fp8", "cuda", 1.05), row("b-fp8", "triton", 1.2),
            row("b-fp8", "cuda", 1.0)] + [row(f"{c}-bf16", "triton", 2.0) for c in "abcdef"]
    rows.append({"op": "denoise_step", "case": "s", "backend": "reference", "median_ms": 4.0})
    assert rank_backends(_gpu_results("H100", "2026-11-01", "9.0", rows)) == {
        "temporal_attention": ["cuda", "triton"], "denoise_step": ["reference"]}


def test_the_fastest_cuda_attention_path_ranks_the_backend_and_becomes_autos(tmp_path, monkeypatch):
    """On sm_90 the CUDA attention is timed per path (XJFAST_CUDA_ATTENTION_CORE): the ranking
    orders the paths, judges the cuda backend by the fastest, and cuda_core() picks that path for a
    GPU of that capability (the environment variable still wins)."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import rank_backends, rank_cuda_attention_paths, ranking_file
    from xjfast import _ext, backends
    from xjfast.ops import temporal_attention as ta

    def row(case, backend, ms, core=None):
        return {"op": "temporal_attention", "case": case, "backend": backend, "median_ms": ms,
                **({"core": core} if core else {})}
    rows = [row("a", "triton", 1.0), row("a", "cuda", 1.5, "wgmma"), row("a", "cuda", 0.8, "ws"),
            row("a", "cuda", 3.0, "mma"), row("b", "triton", 2.0), row("b", "cuda", 2.2, "wgmma"),
            row("b", "cuda", 1.6, "ws"), row("b", "cuda", 5.0, "mma")]
    results = _gpu_results("H100", "2026-11-01", "9.0", rows)
    assert rank_cuda_attention_paths(results) == ["ws", "wgmma", "mma"]
    assert rank_backends(results) == {"temporal_attention": ["cuda", "triton"]}
    (tmp_path / "h100.json").write_text(json.dumps(results))
    ranking = ranking_file(str(tmp_path))
    assert ranking[ta.CUDA_CORE_RANKING]["9.0"]["order"] == ["ws", "wgmma", "mma"]

    monkeypatch.setattr(backends, "ranking", lambda: ranking)
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90a", "100a"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("XJFAST_CUDA_ATTENTION_CORE", raising=False)
    monkeypatch.delenv("XJFAST_CUDA_ATTENTION_SKIP", raising=False)
    gpu = torch.device("cuda", 0)
    assert ta.cuda_core(gpu) == "ws"
    assert ta.cuda_core(None) == "auto"
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_SKIP", "ws")  # gpu_check.sh: its first launch failed
    assert ta.cuda_core(gpu) == "wgmma"
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_SKIP", "ws,wgmma,mma")
    assert ta.cuda_core(gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_SKIP", "ws")
    assert ta.cuda_core(gpu) == "mma"  # nothing ranked for sm_100, where mma.sync is the one path
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_CORE", "wgmma")  # an explicit path wins
    assert ta.cuda_core(gpu) == "wgmma"
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_CORE", "tma")
    with pytest.raises(ValueError, match="XJFAST_CUDA_ATTENTION_CORE"):
        ta.cuda_core(None)
    monkeypatch.delenv("XJFAST_CUDA_ATTENTION_CORE")
    monkeypatch.setenv("XJFAST_CUDA_ATTENTION_SKIP", "ws,tma")
    with pytest.raises(ValueError, match="XJFAST_CUDA_ATTENTION_SKIP"):
        ta.cuda_core(gpu)


def test_the_fastest_triton_attention_configuration_is_ranked_for_auto(tmp_path):
    """The first attention case also times the Triton kernel per candidate configuration: those rows
    rank the configurations (what config() then runs on that capability), not the backend, which is
    judged by the configuration it ran."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import rank_backends, rank_triton_attention_configs, ranking_file
    from xjfast.kernels import temporal_attention as kernel

    def row(case, backend, ms, config=None):
        return {"op": "temporal_attention", "case": case, "backend": backend, "median_ms": ms,
                **({"config": config} if config else {})}
    rows = [row("a", "triton", 1.2), row("a", "cuda", 1.0), row("a", "triton", 0.9, "64,64,8,2"),
            row("a", "triton", 1.2, "64,32,4,1"), row("b", "triton", 2.0), row("b", "cuda", 2.4),
            dict(row("a", "triton", 0.1), unsplit=True)]  # timed beside: ranks nothing
    results = _gpu_results("H100", "2026-11-01", "9.0", rows)
    assert rank_triton_attention_configs(results) == ["64,64,8,2", "64,32,4,1"]
    assert rank_backends(results) == {"temporal_attention": ["cuda", "triton"]}
    (tmp_path / "h100.json").write_text(json.dumps(results))
    ranking = ranking_file(str(tmp_path))
    assert ranking[kernel.CONFIG_RANKING]["9.0"]["order"] == ["64,64,8,2", "64,32,4,1"]
    assert kernel.ranked_config((9, 0), ranking) == (64, 64, 8, 2)  # not the first candidate: ranked


class _FakeNVML:
    """NVML as nvidia-ml-py exposes it, on a machine where the power reading is refused."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.calls = []

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(uuid)
        return "handle"

    def nvmlDeviceGetClockInfo(self, h, which):
        return {1: 1980, 2: 2619}[which]

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 41

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0

    def nvmlSystemGetDriverVersion(self):
        return b"580.159.04"


def test_nvml_readings_survive_a_refused_reading(monkeypatch):
    sys.path.insert(0, ROOT)
    import torch

    from bench import harness
    fake = _FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"uuid": "1234-abcd"})())
    out = harness.nvml_readings(torch.device("cuda", 0))
    assert out["sm_clock_mhz"] == 1980 and out["temperature_c"] == 41 and "power_w" not in out
    assert "Not Supported" in out["nvml_failed"]["power_w"]
    assert fake.calls == ["init", "GPU-1234-abcd", "shutdown"]
    fixed = harness.nvml_readings(torch.device("cuda", 0), fixed=True)
    assert fixed["driver"] == "580.159.04"  # bytes from older bindings, text in the results


def test_sanitize_launches_every_op_with_valid_arguments(capsys):
    """The launches compute-sanitizer runs on a GPU, with the reference on the CPU: every op has
    one, and every argument is one the op accepts (a typo here would cost the GPU run)."""
    sys.path.insert(0, ROOT)
    from bench import sanitize
    from xjfast.backends import registered_ops
    assert sanitize.main(device="cpu", backends=["reference"]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed
    for op in registered_ops():
        assert f"sanitize {op}/reference (" in printed


def test_a_section_the_budget_left_no_time_for_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    """gpu_check.sh calls the benchmarks failed when bench.run exits 1: a section that found the
    budget spent is listed apart from errors, and the run still exits 0."""
    sys.path.insert(0, ROOT)
    from bench import run
    monkeypatch.setenv("XJFAST_BENCH_DEVICE", "cpu")
    assert run.main([str(tmp_path), "--only", "roofline,memory_bound", "--budget", "0"]) == 0
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    results = json.loads(path.read_text())
    assert "errors" not in results and set(results["skipped_sections"]) == {"roofline", "memory_bound"}
    assert "time budget was spent" in capsys.readouterr().out


ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def test_only_a_sticky_cuda_error_counts_as_a_lost_context(monkeypatch):
    """A fault that ends every later launch (the synchronize after it fails) is a lost context;
    a working context, or CUDA never started, is not."""
    sys.path.insert(0, ROOT)
    from bench import harness
    cuda = torch.device("cuda")
    assert harness.context_error(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert harness.context_error(cuda) is None
    harness.fail_if_context_lost(cuda, "anywhere")  # a figure that failed without breaking it: no raise

    def sticky(device=None):
        raise RuntimeError(f"{ILLEGAL_ADDRESS}\nCUDA kernel errors might be asynchronously reported")
    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    assert harness.context_error(cuda) == f"RuntimeError: {ILLEGAL_ADDRESS}"
    with pytest.raises(harness.ContextLost, match="lost at xjfast-cuda-fp8 D=128: RuntimeError: CUDA error") as lost:
        harness.fail_if_context_lost(cuda, "xjfast-cuda-fp8 D=128", harness.leave_out_name("temporal_attention", "cuda"))
    assert lost.value.leave_out == "temporal_attention:cuda"
    assert harness.leave_out_name("temporal_attention", "cuda", "wgmma") == "path:wgmma"
    assert harness.leave_out_name("denoise_step", "reference") is None  # the definition is never left out
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert harness.context_error(cuda) is None  # CUDA never started here: nothing to lose


def test_a_lost_cuda_context_ends_its_section_and_the_rest_go_on_in_a_new_process(tmp_path, monkeypatch):
    """A fault that breaks the CUDA context in one implementation: its section keeps the figures
    before it and ends; the later sections run in a new process (exec, the same pid) that adds to
    the same results file without the implementation that faulted; the run exits 1."""
    sys.path.insert(0, ROOT)
    import xjfast.ops.kv_cache_commit as commit_op
    from bench import harness, kernels, run
    monkeypatch.setenv("XJFAST_BENCH_DEVICE", "cpu")
    monkeypatch.delenv("XJFAST_DISABLE", raising=False)
    faulted = []

    def faulting_commit(*args, backend, **kwargs):  # the CUDA commit traps on this GPU
        faulted.append(backend)
        raise RuntimeError(ILLEGAL_ADDRESS)
    real_backends = kernels.backends
    monkeypatch.setattr(kernels, "backends", lambda op, device: [("cuda", None)] if op == "kv_cache_commit" else
                        real_backends(op, device))
    monkeypatch.setattr(commit_op, "kv_cache_commit", faulting_commit)
    monkeypatch.setattr(harness, "context_error", lambda device=None: f"RuntimeError: {ILLEGAL_ADDRESS}" if faulted
                        else None)
    monkeypatch.setattr(run, "context_error", harness.context_error)

    class Exec(Exception):
        pass

    def execve(executable, argv, env):
        raise Exec(executable, argv, env)
    monkeypatch.setattr(os, "execve", execve)
    argv = [str(tmp_path), "--only", "roofline,memory_bound,diffusers_wan", "--budget", "600"]
    with pytest.raises(Exec) as restart:
        run.main(argv)
    executable, new_argv, env = restart.value.args
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    results = json.loads(path.read_text())
    assert faulted == ["cuda"]  # the section ended at the fault: the ops after the commit never ran
    [row] = results["memory_bound"]
    assert row["backend"] == "cuda" and ILLEGAL_ADDRESS in row["error"]
    assert "ContextLost" in results["errors"]["memory_bound"] and "kv_cache_commit cuda" in results["errors"]["memory_bound"]
    assert results["roofline"]["copy"]["GB/s"] > 0 and "diffusers_wan" not in results
    assert results["restarts"] == [{"after": "memory_bound", "sections": ["diffusers_wan"],
                                    "left_out": "kv_cache_commit:cuda"}]
    assert executable == sys.executable and new_argv[:3] == [sys.executable, "-m", "bench.run"]
    assert new_argv[3:3 + len(argv)] == argv and env["XJFAST_DISABLE"] == "kv_cache_commit:cuda"
    extra = new_argv[3 + len(argv):]
    assert extra[:4] == ["--only", "diffusers_wan", "--resume", str(path)] and extra[4] == "--budget"
    assert 0 < float(extra[5]) < 600

    monkeypatch.undo()  # the new process: a working context, the faulting implementation left out
    monkeypatch.setenv("XJFAST_BENCH_DEVICE", "cpu")
    monkeypatch.setenv("XJFAST_DISABLE", env["XJFAST_DISABLE"])
    assert run.main(new_argv[3:]) == 1  # the fault stays an error of the run
    resumed = json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".json"] == [path.name]
    assert resumed["environment"] == results["environment"] and resumed["restarts"] == results["restarts"]
    assert resumed["memory_bound"] == results["memory_bound"] and "diffusers_wan" in resumed
    assert set(resumed["sections_s"]) == {"roofline", "memory_bound", "diffusers_wan"}


def test_a_test_that_broke_the_cuda_context_ends_its_xdist_worker(monkeypatch):
    """The tests stage on a GPU runs under pytest-xdist: a failure that left the CUDA context broken
    ends that worker (xdist starts another for the tests after it); any other failure, a working
    context, or a session without xdist goes on."""
    import conftest
    sys.path.insert(0, ROOT)
    from bench import harness
    exits, lost = [], []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(harness, "context_error", lambda device=None: lost[0] if lost else None)
    report = types.SimpleNamespace(failed=True, nodeid="tests/test_x.py::test_y")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    conftest.pytest_runtest_logreport(report)  # an ordinary failure: the context works
    lost.append(f"RuntimeError: {ILLEGAL_ADDRESS}")
    conftest.pytest_runtest_logreport(types.SimpleNamespace(failed=False, nodeid="tests/test_x.py::test_z"))
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    conftest.pytest_runtest_logreport(report)  # no xdist: no other process to go on in
    assert exits == []
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    conftest.pytest_runtest_logreport(report)
    assert exits == [conftest.WORKER_ENDED_BY_A_LOST_CONTEXT]


def test_resume_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys):
    sys.path.insert(0, ROOT)
    from bench import run
    (tmp_path / "other.json").write_text("[1, 2]")
    for name in ("other.json", "missing.json"):
        with pytest.raises(SystemExit):
            run.main(["--device", "cpu", "--resume", str(tmp_path / name)])
        assert "--resume: " in capsys.readouterr().err


def test_attention_stops_taking_cases_when_the_budget_is_spent():
    """The most telling case always runs; the next is skipped, saying why, when no time is left."""
    sys.path.insert(0, ROOT)
    import torch

    from bench import kernels
    rows = kernels.attention(torch.device("cpu"), {}, budget=lambda: -1.0)
    first, second = kernels.attention_cases(False)
    assert any(r["query_frames"] == first["query_frames"] and "median_ms" in r for r in rows)
    [skipped] = [r for r in rows if r["query_frames"] == second["query_frames"]]
    assert "time budget" in skipped["skipped"]


def test_step_profile_sorts_kernels_into_families_and_sums_them_per_pass():
    """GPU kernel names as the profiler reports them (Triton's, CUDA C++'s, cuBLAS', torch's) land
    in the family that says what is in the way; the families add up to the whole."""
    sys.path.insert(0, ROOT)
    from bench.step_profile import breakdown, kernel_family
    families = {
        "temporal_attention_kernel": "temporal_attention", "attention_combine_kernel": "temporal_attention",
        "void (anonymous namespace)::temporal_attention_ws_kernel<128>(WsArgs)": "temporal_attention",
        "attention_mass_kernel": "temporal_attention", "kv_cache_commit_kernel": "kv_cache",
        "void kv_cache_compact_kernel(CompactArgs)": "kv_cache", "denoise_step_kernel": "denoise_step",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "gemm", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "gemm",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>(Flash_fwd_params)": "torch_attention",
        "Memcpy DtoD (Device -> Device)": "copy", "Memset (Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other"}
    for name, family in families.items():
        assert kernel_family(name) == family, name
    out = breakdown([("temporal_attention_kernel", 3.0), ("nvjet_tst_192x192", 1.0), ("nvjet_tst_192x192", 1.0),
                     ("temporal_attention_kernel", 3.0), ("Memset (Device)", 0.5), ("triton_poi_fused_add", 1.5)],
                    passes=2)
    assert out["ms_per_pass"] == 5.0 and out["launches_per_pass"] == 3.0
    assert list(out["families"]) == ["temporal_attention", "gemm", "other", "copy"]  # largest first
    assert out["families"]["gemm"] == {"ms_per_pass": 1.0, "share": 0.2}
    assert out["top"][0] == {"name": "temporal_attention_kernel", "family": "temporal_attention", "ms_per_pass": 3.0,
                             "launches_per_pass": 1.0}


def test_stream_keeps_what_it_measured_and_skips_what_no_longer_fits():
    """Each row is handed to the checkpoint as it is measured (a stage cut off from outside keeps
    them); once the budget cannot hold another, every later row says so instead of running."""
    sys.path.insert(0, ROOT)
    from bench import stream
    left = iter([60.0] + [0.0] * 100)  # time for the first row only
    saved = []
    out = stream.measure(torch.device("cpu"), lambda msg: None, budget=lambda: next(left),
                         checkpoint=lambda partial: saved.append(json.loads(json.dumps(partial))))
    first, *rest = out["rows"]
    assert first["steady_model_fps"] > 0 and first["steady_blocks"] == first["steady"]
    assert rest and all("time budget" in r["skipped"] for r in rest)
    assert out["speculation"] and all("time budget" in r["skipped"] for r in out["speculation"])
    assert saved[0]["rows"][0]["steady_model_fps"] == first["steady_model_fps"] and saved[-1] == out


def test_xjfast_bench_runs_the_sections_and_shapes_asked_for(tmp_path, capsys, monkeypatch):
    """`xjfast bench` from the installed package: only the sections named, every combination of the
    shape options as an attention case, and the run marked as such in the results."""
    from xjfast.cli import main
    monkeypatch.delenv("XJFAST_BENCH_BUDGET_S", raising=False)
    assert main(["bench", str(tmp_path), "--device", "cpu", "--only", "roofline,attention", "--heads", "3",
                 "--head-dim", "64", "--frame-tokens", "16", "--query-frames", "1,2", "--cached-frames", "1,3"]) == 0
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert set(results["sections_s"]) == {"roofline", "attention"} and "stream" not in results
    assert results["run"] == {"sections": ["roofline", "attention"], "shape": {
        "heads": [3], "head_dim": [64], "frame_tokens": [16], "query_frames": [1, 2], "cached_frames": [1, 3]}}
    timed = [r for r in results["attention"] if r.get("impl") == "xjfast-reference-fp8"]
    assert sorted((r["H"], r["D"], r["T"], r["query_frames"], r["cached"]) for r in timed) == [
        (3, 64, 16, 1, 1), (3, 64, 16, 1, 3), (3, 64, 16, 2, 1), (3, 64, 16, 2, 3)]
    assert all(r["median_ms"] > 0 and r["cosine"] > 0.99 for r in timed)
    assert "xjfast-reference-fp8" in capsys.readouterr().out  # the summary table


@pytest.mark.parametrize("args, message", [
    (["--only", "attention,speed"], "--only: expected sections from roofline, attention"),
    (["--head-dim", "96"], "--head-dim: expected 64 and/or 128"),
    (["--heads", "2,4"], "--heads: expected one value"),
    (["--cached-frames", "0"], "--cached-frames: expected positive integers"),
    (["--device", "tpu:x"], "--device: expected a torch device"),
])
def test_xjfast_bench_names_a_bad_option(tmp_path, capsys, args, message):
    from xjfast.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(tmp_path), "--device", "cpu"] + args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU where there is none")
def test_xjfast_bench_refuses_a_gpu_that_is_not_there(tmp_path, capsys):
    from xjfast.cli import main
    with pytest.raises(SystemExit):
        main(["bench", str(tmp_path), "--device", "cuda"])
    assert "no CUDA GPU is usable here" in capsys.readouterr().err


def test_partial_and_custom_shape_runs_stay_out_of_the_readme_and_the_ranking(tmp_path):
    """A newer `xjfast bench --only ...` or custom-shape file must not stand for the GPU in place of
    the newest whole run at the stream shapes."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import SECTIONS, ranking_file

    def results(date, ms, run):
        rows = [{"op": "denoise_step", "case": "s", "backend": b, "impl": f"xjfast-{b}", "median_ms": t}
                for b, t in zip(("triton", "cuda"), ms)]
        return dict(_gpu_results("H100", date, "9.0", rows), run=run)
    shape = {"heads": [4], "head_dim": [64], "frame_tokens": [64], "query_frames": [1], "cached_frames": [2]}
    for name, data in (("whole.json", results("2026-11-01", (0.5, 0.6), {"sections": list(SECTIONS), "shape": None})),
                       ("only.json", results("2026-11-02", (0.6, 0.5), {"sections": ["memory_bound"], "shape": None})),
                       ("shape.json", results("2026-11-03", (0.6, 0.5), {"sections": list(SECTIONS), "shape": shape}))):
        (tmp_path / name).write_text(json.dumps(data))
    assert ranking_file(str(tmp_path))["denoise_step"]["9.0"]["source"] == "bench/results/whole.json"


def test_a_wheel_carries_the_benchmarks_and_runs_xjfast_bench_outside_the_checkout(tmp_path):
    """What a user of a wheel gets: bench/ installed as xjfast.bench, `xjfast bench` running from it
    (no checkout around: the results carry the package's version instead of a commit)."""
    import zipfile
    env = dict(os.environ, XJFAST_CUDA_ARCHS="")  # the pure-Python wheel: seconds, no nvcc
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "dist"), ROOT], env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("xjfast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"xjfast/bench/run.py", "xjfast/bench/kernels.py", "xjfast/kernels/temporal_attention.py"} <= names
        assert not any(n.startswith("bench/") or n.endswith((".sh", ".json")) and "/bench/" in n for n in names)
        z.extractall(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), XJFAST_BENCH_DEVICE="cpu")
    env.pop("XJFAST_BENCH_BUDGET_S", None)
    run = subprocess.run([sys.executable, "-c", "import sys, xjfast.cli; print(xjfast.cli.__file__); "
                          "sys.exit(xjfast.cli.main(['bench', 'out', '--only', 'roofline']))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.startswith(str(tmp_path / "site"))  # the wheel's package, not the checkout's
    [path] = (tmp_path / "out").glob("*.json")
    results = json.loads(path.read_text())
    assert results["environment"]["xjfast_commit"] == "v0.1.0" and results["roofline"]["copy"]["GB/s"] > 0


@pytest.mark.parametrize("cfg", [dict(steps=1, frames_per_block=1, sink=1, window=3),
                                 dict(steps=2, frames_per_block=3, sink=1, window=3)])
def test_stream_steady_state_starts_after_the_capture_block(cfg):
    """The stream benchmark's steady state leaves out the first block, the cache filling, the
    static step's eager warm-up passes and the block that captures the graph (whose time carries
    the capture: as a steady block it was the p99): the static step's first pass, here on the CPU
    where it runs eagerly, starts the warm-up."""
    sys.path.insert(0, ROOT)
    from bench.stream import warm_up_blocks
    from xjfast.engine import CacheConfig, StreamGenerator
    from xjfast.engine.static_step import WARMUP_PASSES
    from xjfast.models import build
    model, decoder, encoder, preset = build("tiny")
    g = StreamGenerator(model, decoder, CacheConfig(cfg["sink"], cfg["window"]), steps=cfg["steps"],
                        frames_per_block=cfg["frames_per_block"], latent_hw=preset.latent_hw, text_encoder=encoder,
                        cuda_graph=True)
    g.set_prompt("a lighthouse")
    block = 0
    while not g.stats()["cuda_graph"]["static_steps_eager"]:
        g.step()
        block += 1
    assert warm_up_blocks(cfg) == (block - 1) + WARMUP_PASSES + 1


def test_gpu_timing_keeps_no_memory_and_times_the_device_asked_for(monkeypatch):
    """harness.time_ms's GPU path on the CPU, torch.cuda faked: the L2 flush buffer is freed on
    return (kept, it counted in the stream's peak memory), and the events and the spin kernel are
    issued on the device timed (torch issues them on the current one: cuda:0 for a cuda:1 run)."""
    import contextlib
    import time
    import weakref
    sys.path.insert(0, ROOT)
    from bench import harness
    current, issued = [0], []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            issued.append(("event", current[0]))
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return 1e3 * (end.t - self.t)

    @contextlib.contextmanager
    def device(d):
        before = current[0]
        current[0] = torch.device(d).index if torch.device(d).index is not None else before
        try:
            yield
        finally:
            current[0] = before
    buffers, empty = [], torch.empty

    def empty_on_cpu(*size, **kw):  # the flush buffer, allocated on the CPU
        t = empty(*size, **dict(kw, device="cpu"))
        buffers.append(weakref.ref(t))
        return t
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: issued.append(("sleep", current[0])))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(clock_rate=1_980_000))
    monkeypatch.setattr(torch, "empty", empty_on_cpu)
    monkeypatch.setattr(harness, "FLUSH_BYTES", 1 << 10)
    timing = harness.time_ms(lambda: None, [()], torch.device("cuda", 1), reps=4)
    assert timing["samples"] == 4 and timing["median_ms"] >= 0
    assert len(issued) == 9 and {d for _, d in issued} == {1}
    assert buffers and all(ref() is None for ref in buffers)


def test_stream_rows_own_their_first_frame_and_peak_memory(monkeypatch):
    """A stream row's time to first frame is a fresh stream's in the warm process (the run's own
    first block carries what the process does once, e.g. Triton compiles, in the first row only),
    and an earlier row's engine (a StreamGenerator is a reference cycle) is freed before the next
    row's peak memory is counted."""
    import gc
    import time
    sys.path.insert(0, ROOT)
    from bench import stream
    from xjfast.engine import StreamGenerator
    from xjfast.models import build
    model, decoder, _, preset = build("tiny")
    prompt = torch.randn(preset.text_tokens, preset.dit.text_dim, generator=torch.Generator().manual_seed(0))
    forward, once = model.forward, []

    def first_call_slow(*args, **kwargs):  # a process's one-time work
        if not once:
            once.append(time.sleep(2.0))
        return forward(*args, **kwargs)
    engines_alive = []
    monkeypatch.setattr(model, "forward", first_call_slow)
    monkeypatch.setattr(stream, "on_gpu", lambda device: True)  # peak memory is read on a GPU only
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: engines_alive.append(
        sum(type(o) is StreamGenerator for o in gc.get_objects())))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    cfg = dict(steps=1, frames_per_block=1, sink=1, window=1, steady=1)
    gc.disable()  # what an explicit collection frees, and nothing else
    try:
        rows = [stream._recorded(stream._run, model, decoder, preset, torch.device("cpu"), stream.ENGINES[name],
                                 cfg, prompt) for name in stream.ENGINES]
    finally:
        gc.enable()
    assert all("error" not in r for r in rows), rows
    assert engines_alive == [1, 1]
    assert rows[0]["cold_time_to_first_frame_ms"] >= 2000 > rows[0]["time_to_first_frame_ms"]
    assert all(r["precompiled_kernels"] == 0 and r["precompile_s"] >= 0 and r["precompile_error"] is None
               for r in rows)  # the CPU: no Triton


def test_memory_bound_bytes_count_every_tensor_the_op_moves():
    """kv_cache_commit reads bf16 K, V and writes e4m3 pages and every scale (k_scale too): the GB/s
    figure is those bytes over the median time."""
    sys.path.insert(0, ROOT)
    from bench import kernels
    rows = kernels.memory_bound(torch.device("cpu"), {"copy": {"GB/s": 1.0}})
    [commit] = [r for r in rows if r["op"] == "kv_cache_commit" and r["backend"] == "reference"]
    H, D, T = 2, 64, 32  # CPU mode: one frame
    moved = T * H * D * (2 * 2 + 2 * 1) + 4 * H + 2 * 4 * H * D
    assert commit["GB/s"] * 1e9 * commit["median_ms"] / 1e3 == pytest.approx(moved, rel=1e-9)
    assert commit["fraction_of_ceiling"] == pytest.approx(commit["GB/s"])


def test_attention_fractions_are_of_the_ceiling_of_the_precision_run(monkeypatch):
    """xjfast's FP8 rows and an 8-bit peer (SageAttention: INT8 Q.K, FP8 P.V) against the FP8 GEMM
    rate; bf16 rows and bf16 peers against bf16's; each row names its ceiling."""
    sys.path.insert(0, ROOT)
    from bench import kernels

    def peer(q):
        return lambda: q.clone()
    monkeypatch.setattr(kernels, "_peers", lambda case, cache, frames, q, k, v, *_: {
        "sageattention": peer(q), "flash-attn": peer(q)})
    shape = dict(heads=[2], head_dim=[64], frame_tokens=[16], query_frames=[1], cached_frames=[1])
    rows = kernels.attention(torch.device("cpu"), {"gemm_fp8": {"TFLOP/s": 2.0}, "gemm_bf16": {"TFLOP/s": 1.0}},
                             shape=shape)
    by_impl = {r["impl"]: r for r in rows if "TFLOP/s" in r}
    for impl, ceiling, rate in (("xjfast-reference-fp8", "gemm_fp8", 2.0), ("sageattention", "gemm_fp8", 2.0),
                                ("xjfast-reference-bf16", "gemm_bf16", 1.0), ("flash-attn", "gemm_bf16", 1.0)):
        row = by_impl[impl]
        assert row["ceiling"] == ceiling and row["fraction_of_ceiling"] == pytest.approx(row["TFLOP/s"] / rate), impl


def test_readme_tables_show_fractions_memory_and_what_was_not_measured(tmp_path):
    """The README's tables carry each attention figure's fraction of its ceiling, the stream's peak
    memory and memory after 100 and 1,000 frames, every implementation not measured with the
    reason (peers that are not installed and runs that failed included), and the stream rows whose
    frames came out NaN or inf."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import tables
    case = {"H": 12, "D": 128, "T": 1560, "query_frames": 2, "cached": 12}
    timed = {"median_ms": 2.0, "min_ms": 1.9, "max_ms": 2.1, "rel_l2": 0.01}
    data = _gpu_results("H100", "2026-11-01", "9.0", [
        dict(case, op="temporal_attention", backend="triton", impl="xjfast-triton-fp8", case="c-fp8", **timed,
             **{"TFLOP/s": 500.0}, fraction_of_ceiling=0.4, ceiling="gemm_fp8"),
        dict(case, op="temporal_attention", backend="cuda", impl="xjfast-cuda[ws]-fp8", case="c-fp8",
             error="RuntimeError: boom"),
        dict(case, op="temporal_attention", impl="sageattention", skipped="not installed")])
    data["stream"] = {"preset": "wan2.1-1.3b", "rows": [dict(
        engine="xjfast-fp8", steps=1, frames_per_block=1, sink=1, window=8, steady_model_fps=100.0,
        steady_end_to_end_fps=90.0, time_to_first_frame_ms=120.0, steady_interval_p50_ms=40.0,
        steady_interval_p99_ms=50.0, peak_memory_gib=6.25, latent_frames=40, nonfinite_frames=0,
        first_nonfinite_frame=None, precompiled_kernels=7, precompile_s=4.25), dict(
        engine="xjfast-fp8", steps=4, frames_per_block=3, sink=1, window=8, steady_model_fps=100.0,
        steady_end_to_end_fps=90.0, time_to_first_frame_ms=120.0, steady_interval_p50_ms=40.0,
        steady_interval_p99_ms=50.0, peak_memory_gib=6.25, latent_frames=42, nonfinite_frames=30,
        first_nonfinite_frame=12, precompile_error="RuntimeError: boom")],
        "memory": {"allocated_after_100_frames": 3 * 2 ** 30, "allocated_after_1000_frames": 3 * 2 ** 30,
                   "flat": True},
        "speculation": [dict(video="256x256", speculate=0, drafter="extrapolate", model_fps=300.0, end_to_end_fps=250.0,
                             depth=0, acceptance_rate=None, frames_per_pass=1.0),
                        dict(video="256x256", speculate="auto", drafter="shallow:4", model_fps=420.5,
                             end_to_end_fps=333.0, depth=3, acceptance_rate=0.875, frames_per_pass=2.6),
                        dict(video="480x832", speculate=4, drafter="shallow:4", skipped="not run: 3 s left")],
        "profile": dict(engine="xjfast-fp8", steps=1, frames_per_block=1, sink=1, window=8, passes=3,
                        ms_per_pass=9.5, launches_per_pass=1201, cuda_graph_in_use=True,
                        families={"gemm": {"ms_per_pass": 6.0, "share": 0.63},
                                  "temporal_attention": {"ms_per_pass": 3.5, "share": 0.37}},
                        top=[{"name": "nvjet_tst_192x192", "family": "gemm", "ms_per_pass": 2.25},
                             {"name": "temporal_attention_kernel", "family": "temporal_attention",
                              "ms_per_pass": 3.5}])}
    (tmp_path / "h100.json").write_text(json.dumps(data))
    text = tables(str(tmp_path))
    assert "| 256x256 | 0 | - | 0 | 300.0 | 250.0 | - | 1.00 |" in text
    assert "| 256x256 | auto | shallow:4 | 3 | 420.5 | 333.0 | 88% | 2.60 |" in text
    assert "speculation 480x832, depth 4, shallow:4 (not run: 3 s left)" in text
    assert "9.50 ms of kernels in 1201 launches per pass" in text and "CUDA graph replayed" in text
    assert "| gemm | 6.000 | 63% | `nvjet_tst_192x192` (2.250 ms) |" in text
    assert "| temporal_attention | 3.500 | 37% | `temporal_attention_kernel` (3.500 ms) |" in text
    assert "| xjfast-triton-fp8 | 128 | 2 | 12 | 500.0 | 40% of FP8 GEMM | 2.000 | 1.00e-02 |" in text
    assert "sageattention (not installed)" in text and "xjfast-cuda[ws]-fp8 (RuntimeError: boom)" in text
    assert "| 6.25 |" in text and "3.000 and 3.000 GiB (flat)" in text
    assert ("NaN or inf frames (those rows time a broken stream): stream xjfast-fp8, 4 step(s), 3 frame(s)/block, "
            "sink+window 1+8 (30 of 42 latent frames, the first 12).") in text
    assert ("Before its first frame, `precompile()` readied the stream's 7 Triton kernels in 4.2 s (stream "
            "xjfast-fp8, 1 step(s), 1 frame(s)/block, sink+window 1+8: the run's first") in text
    assert ("`precompile()` failed, and the stream compiled its kernels as it launched them: stream xjfast-fp8, "
            "4 step(s), 3 frame(s)/block, sink+window 1+8 (RuntimeError: boom).") in text


def test_readme_tables_list_the_stream_and_drop_in_rows_not_measured(tmp_path):
    """A stream row that failed (e.g. out of memory) or was cut by the budget, and a drop-in row or
    precision that was, are named with the reason instead of vanishing from the tables."""
    sys.path.insert(0, ROOT)
    from bench.readme_tables import tables
    data = _gpu_results("H100", "2026-11-01", "9.0", [])
    data["stream"] = {"preset": "wan2.1-1.3b", "rows": [
        dict(engine="xjfast-fp8", steps=1, frames_per_block=1, sink=1, window=8, error="OutOfMemoryError: boom"),
        dict(engine="baseline-sdpa-bf16", steps=4, frames_per_block=1, sink=1, window=8, skipped="not run: 3 s left")]}
    data["diffusers_wan"] = {"model": "Wan", "rows": [
        dict(latent_frames=1, tokens=1560, diffusers_default={"median_ms": 9.0}, xjfast={"fp8": {"error": "E: x"}}),
        dict(latent_frames=21, skipped="out of the run's time budget (2 s left)")]}
    (tmp_path / "h100.json").write_text(json.dumps(data))
    text = tables(str(tmp_path))
    for expected in ("stream xjfast-fp8, 1 step(s), 1 frame(s)/block, sink+window 1+8 (OutOfMemoryError: boom)",
                     "stream baseline-sdpa-bf16, 4 step(s), 1 frame(s)/block, sink+window 1+8 (not run: 3 s left)",
                     'diffusers Wan, 1 latent frame(s), enable(precision="fp8") (E: x)',
                     "diffusers Wan, 21 latent frame(s) (out of the run's time budget (2 s left))"):
        assert expected in text, expected
    data["diffusers_wan"] = {"skipped": "diffusers is not installed"}
    (tmp_path / "h100.json").write_text(json.dumps(data))
    assert "diffusers Wan (diffusers is not installed)" in tables(str(tmp_path))


def test_results_of_a_modified_checkout_are_marked_dirty(tmp_path):
    """The results file names the commit it measured: tracked changes make it "<commit>-dirty"
    (untracked files, such as a build or the results themselves, do not)."""
    from bench.harness import _commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "setup.py").write_text("# a checkout of ours\n")
    git("add", "setup.py")
    git("commit", "-q", "-m", "x")
    head = git("rev-parse", "--short=10", "HEAD")
    (tmp_path / "results.json").write_text("{}")
    assert _commit(str(tmp_path)) == head
    (tmp_path / "setup.py").write_text("# changed\n")
    assert _commit(str(tmp_path)) == f"{head}-dirty"
    (tmp_path / "setup.py").write_text("# a checkout of ours\n")
    (tmp_path / "setup.py").chmod(0o755)  # a copy that lost or changed modes measured the same code
    assert _commit(str(tmp_path)) == head


def test_on_a_gpu_the_gpu_tests_run_first():
    """gpu_check.sh's tests stage may be cut off by its time limit: the suite then orders the
    gpu-marked tests (what only the GPU run checks) first, each group in collection order."""
    from conftest import gpu_tests_first

    class Item:
        def __init__(self, name, gpu):
            self.name, self.gpu = name, gpu

        def get_closest_marker(self, name):
            return "marker" if name == "gpu" and self.gpu else None
    items = [Item("a", False), Item("b", True), Item("c", False), Item("d", True)]
    assert [i.name for i in gpu_tests_first(items)] == ["b", "d", "a", "c"]


def run_gpu_check(tmp_path, **env) -> tuple:
    """bench/gpu_check.sh against stand-ins for a 16-core H100 machine's tools (nvidia-smi, nproc,
    compute-sanitizer, python3), which record how they were called and succeed: what runs is the
    script's own logic (stage order and selection, time limits, pytest workers). Returns
    (exit status, stderr, gpu-check.log, the stand-ins' calls)."""
    bin_dir, calls, out = tmp_path / "bin", tmp_path / "calls", tmp_path / "out"
    bin_dir.mkdir(parents=True)
    stubs = {
        "nvidia-smi": 'case "$*" in *compute_cap,*) echo "NVIDIA H100 80GB HBM3, 580.65, 9.0";; '
                      '*compute_cap*) echo 9.0;; *memory.total*) echo 81559;; esac',
        "nproc": "echo 16",
        # SANITIZER_REFUSES: as compute-sanitizer answers on a gVisor runtime
        "compute-sanitizer": f'echo "compute-sanitizer $*" >> {calls}; '
                             '[ -z "$SANITIZER_REFUSES" ] || { echo "========= Error: Device not supported"; exit 1; }',
        # HANG: a substring of the calls that hang
        "python": f'echo "python $*" >> {calls}; [ -n "$HANG" ] && case "$*" in *"$HANG"*) sleep 60;; esac; exit 0',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    # not the knobs of a gpu-check this suite may itself run under (make gpu-check STAGES=...)
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("STAGES", "TOTAL_S", "XJFAST_CUDA_ARCHS", "XJFAST_STAGE_LIMIT_S")}
    run = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out)], capture_output=True,
                         text=True, timeout=120, env=dict(inherited, PATH=f"{bin_dir}:{os.environ['PATH']}",
                                                          PYTHON=str(bin_dir / "python"), **env))
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    return run.returncode, run.stderr, log, calls.read_text().splitlines() if calls.exists() else []


def stage_lines(log: str) -> list:
    """[(stage, limit in s)] in the order the stages started."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^=== (.+?) \(at \d+ s, limit (\d+) s\)", log, re.M)]


def test_gpu_check_runs_every_stage_in_order_within_its_limits(tmp_path):
    rc, stderr, log, calls = run_gpu_check(tmp_path, TOTAL_S="520")
    assert rc == 0, stderr + log
    stages = [name for name, _ in stage_lines(log) if name != "wheels"]  # wheels: only where .whl/ was fetched
    assert stages == ["build", "info", "first launches", "tests", "compute-sanitizer memcheck",
                      "compute-sanitizer racecheck", "benchmarks"], log
    assert log.count(": ok in ") == len(stage_lines(log)), log
    assert dict(stage_lines(log))["build"] == 180 and dict(stage_lines(log))["tests"] == 200
    # one worker per 10 GiB of the H100's 80 GB (7), within half of the 16 cores
    assert any(c.startswith("python -m pytest ") and " -n 7 " in c and " --ignore=tests/test_sass.py " in c
               and c.endswith(" tests") for c in calls), calls
    assert sum(c.startswith("compute-sanitizer --tool ") and c.endswith("-m bench.sanitize") for c in calls) == 2
    assert f"python -m bench.run {tmp_path / 'out'}" in calls


def test_gpu_check_runs_the_stages_asked_for_and_gives_the_others_time_to_them(tmp_path):
    """STAGES=tests: no sanitizer or benchmark, and the build is no longer held short for them."""
    _, _, full_log, _ = run_gpu_check(tmp_path / "all", TOTAL_S="300")
    # 300 s less the 285 the later stages need (290 where .whl/ holds wheels to install)
    assert dict(stage_lines(full_log))["build"] <= 15
    rc, stderr, log, calls = run_gpu_check(tmp_path / "tests", TOTAL_S="300", STAGES="tests")
    assert rc == 0, stderr + log
    assert [n for n, _ in stage_lines(log) if n != "wheels"] == ["build", "info", "first launches", "tests"]
    assert dict(stage_lines(log))["build"] == 180
    assert not any(c.startswith("compute-sanitizer") or "bench.run" in c for c in calls), calls


def test_a_hung_stage_is_cut_off_at_its_limit_and_the_others_still_run(tmp_path):
    # 300 s leave the build 10 or 15 s (the later stages' minimums take the rest)
    rc, stderr, log, calls = run_gpu_check(tmp_path, TOTAL_S="300", HANG="pip install -q --no-build-isolation")
    assert rc == 1, stderr + log
    [(name, limit)] = stage_lines(log)[:1]
    assert name == "build" and re.search(rf"=== build: TIMED OUT after {limit} s", log), log
    assert [n for n, _ in stage_lines(log)[1:] if n != "wheels"] == ["info", "first launches", "tests",
                                                                     "compute-sanitizer memcheck",
                                                                     "compute-sanitizer racecheck", "benchmarks"]
    assert log.count(": ok in ") == len(stage_lines(log)) - 1, log


def test_a_sanitizer_that_refuses_the_gpu_costs_one_stage_and_says_why(tmp_path):
    rc, stderr, log, calls = run_gpu_check(tmp_path, TOTAL_S="520", SANITIZER_REFUSES="1")
    assert rc == 1, stderr + log
    assert "=== compute-sanitizer memcheck: FAILED (exit status 1)" in log
    assert '=== compute-sanitizer racecheck: SKIPPED (compute-sanitizer does not support this machine\'s GPU: ' \
           '"Device not supported")' in log
    assert sum(c.startswith("compute-sanitizer ") for c in calls) == 1
    assert [n for n, _ in stage_lines(log)][-1] == "benchmarks" and "benchmarks: ok in " in log


def test_gpu_check_refuses_a_stage_it_does_not_have(tmp_path):
    rc, stderr, log, calls = run_gpu_check(tmp_path, STAGES="tests,bench")
    assert rc == 2 and "STAGES" in stderr and "'tests,bench'" in stderr and calls == []
